import ArgumentParser
import Dispatch
import Foundation
import UserService

@main
struct UserServiceCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "user-service",
    abstract: "The demo.User gRPC service (login, logout), the demo.Echo test service and grpc.health.v1, on HTTP/2, plaintext or TLS.",
    discussion: """
      Signals: SIGTERM or SIGINT reports NOT_SERVING, lets running calls finish and exits; SIGUSR1 \
      reports NOT_SERVING and SIGUSR2 SERVING again (to try health checking by hand).
      """
  )

  @Option(name: .long, help: "Address to listen on.")
  var host: String = "0.0.0.0"

  @Option(name: .long, help: "Port to listen on (0 picks a free one).")
  var port: Int = 50051

  @Option(name: .long, help: "Name this replica reports in every reply (default: $REPLICA, else the host name and port).")
  var replica: String?

  @Option(name: .long, help: "Listen on this unix socket path instead of --host and --port.")
  var unixSocket: String?

  @Option(name: .long, help: "The HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS to announce (default: the transport's).")
  var maxConcurrentStreams: Int?

  @Option(name: .long, help: "Serve TLS with this PEM certificate chain (with --tls-key); plaintext without it.")
  var tlsCert: String?

  @Option(name: .long, help: "The PEM private key of --tls-cert.")
  var tlsKey: String?

  @Option(name: .long, help: "With --tls-cert: require client certificates signed by this PEM CA (mutual TLS).")
  var tlsCa: String?

  @Option(name: .long, help: "Do not serve: run a grpc.health.v1 Check against HOST:PORT and exit 0 if it is SERVING (a container health check).")
  var probe: String?

  @Option(name: .long, help: "With --probe: the service name to check (default: the whole server).")
  var service: String = ""

  func run() async throws {
    if let target = self.probe {
      guard let colon = target.lastIndex(of: ":"), let port = Int(target[target.index(after: colon)...]) else {
        throw ValidationError("--probe takes HOST:PORT, e.g. 127.0.0.1:50051")
      }
      switch await HealthProbe.check(host: String(target[..<colon]), port: port, service: self.service) {
      case .serving:
        print("SERVING")
      case .notServing(let why):
        print("not serving: \(why)")
        throw ExitCode(1)
      }
      return
    }

    let replica = self.replica ?? ProcessInfo.processInfo.environment["REPLICA"]
      ?? "\(ProcessInfo.processInfo.hostName):\(self.port)"
    var tls: BackendServer.TLSFiles?
    switch (self.tlsCert, self.tlsKey) {
    case (let cert?, let key?): tls = .init(certificateChain: cert, privateKey: key, clientCA: self.tlsCa)
    case (nil, nil): if self.tlsCa != nil { throw ValidationError("--tls-ca needs --tls-cert and --tls-key") }
    default: throw ValidationError("--tls-cert and --tls-key go together")
    }
    let server = BackendServer(host: self.host, port: self.port, replica: replica, maxConcurrentStreams: self.maxConcurrentStreams,
      tls: tls, unixSocket: self.unixSocket)
    let sources = Self.onSignals([SIGTERM, SIGINT]) { server.beginGracefulShutdown() }
      + Self.onSignals([SIGUSR1]) { server.health.set(serving: false) }
      + Self.onSignals([SIGUSR2]) { server.health.set(serving: true) }
    defer { sources.forEach { $0.cancel() } }
    try await server.run { port in
      print("user-service replica \(replica) listening on \(self.unixSocket.map { "unix:\($0)" } ?? "\(self.host):\(port)")")
      fflush(nil)
    }
  }

  private static func onSignals(_ signals: [Int32], _ action: @escaping @Sendable () -> Void) -> [any DispatchSourceSignal] {
    signals.map { number in
      signal(number, SIG_IGN)
      let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
      source.setEventHandler(handler: action)
      source.resume()
      return source
    }
  }
}
