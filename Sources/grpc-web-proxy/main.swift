import ArgumentParser
import Foundation
import GRPCWebProxy
import Logging
import NIOCore
import NIOPosix
import ProxyConfig
import ServiceLifecycle
import SwiftProtobuf
import UserService

@main
struct GRPCWebProxyCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "grpc-web-proxy",
    abstract: "A gRPC-Web proxy that reads Envoy's YAML: browsers' gRPC-Web in, native gRPC out.",
    discussion: """
      With -c, runs the listeners and clusters of an Envoy-shaped YAML file (the http_connection_manager \
      with grpc_web, cors and router filters). Without it, runs an embedded default: the proxy on \
      127.0.0.1:8080 in front of an in-process demo.User service.
      """
  )

  enum Mode: String, ExpressibleByArgument {
    case serve
    case validate
  }

  @Option(name: [.customShort("c"), .customLong("config-path")], help: "The Envoy-shaped YAML configuration file.")
  var configPath: String?

  @Option(name: .long, help: "serve (default), or validate: check the configuration and exit 0 or 1, like envoy --mode validate.")
  var mode: Mode = .serve

  @Option(name: [.customShort("l"), .customLong("log-level")], help: "trace, debug, info, warning, error or critical.")
  var logLevel: String = "info"

  @Option(name: .long, help: "Event loop threads (Envoy's worker count). Default: one per CPU the process may use (its affinity mask, capped by a cgroup CPU quota).")
  var concurrency: Int?

  @Option(name: .long, help: "Embedded default only: the address the proxy listens on.")
  var listen: String = "127.0.0.1:8080"

  @Option(name: .long, help: "Embedded default only: the admin address (GET /ready, /clusters).")
  var adminListen: String = "127.0.0.1:9901"

  @Option(name: .long, help: "Embedded default only: the folder of the demo web page (default: ./web-demo, else the one beside the sources, else /usr/share/grpc-web-proxy/web-demo).")
  var webRoot: String?

  @Option(name: .customLong("drain-time-s"), help: "On SIGTERM or SIGINT: seconds calls in progress may go on (while /ready answers 503 and no connection is accepted) before those still open end with grpc-status 14 \"proxy shutting down\".")
  var drainTimeSeconds: Double = 5

  @Option(name: .long, help: "Do not serve: GET http://HOST:PORT/ready and exit 0 if it answers 200 (a container health check).")
  var probeReady: String?

  @Flag(name: .long, help: "Print the embedded default configuration and exit.")
  var printDefaultConfig = false

  @Option(name: .customLong("base-id"), help: .hidden)
  var baseID: Int?

  func run() async throws {
    RuntimeLogLevel.current = RuntimeLogLevel.parse(self.logLevel) ?? .info
    LoggingSystem.bootstrap { label in
      // The level can change at run time (the admin port's /logging?level=).
      AdjustableLogHandler(StreamLogHandler.standardError(label: label))
    }
    let logger = Logger(label: "grpc-web-proxy")
    if let target = self.probeReady {
      let (host, port) = try Self.parseListen(target, option: "--probe-ready")
      let (ok, text) = await ReadyProbe.get(host: host, port: port)
      print(text)
      if !ok { throw ExitCode(1) }
      return
    }
    let (listenHost, listenPort) = try Self.parseListen(self.listen, option: "--listen")
    let admin = try Self.parseListen(self.adminListen, option: "--admin-listen")
    let page = try Self.pageFiles(webRoot: self.webRoot)
    let defaultConfig = { (backendPort: Int) in
      EmbeddedDefault.yaml(listenHost: listenHost, listenPort: listenPort, backendPort: backendPort,
        adminHost: admin.0, adminPort: admin.1, page: page)
    }

    if self.printDefaultConfig {
      print(defaultConfig(50051))
      return
    }

    if let path = self.configPath {
      let loaded: LoadedConfiguration
      do {
        loaded = try ConfigLoader.load(file: path)
      } catch {
        Self.stderr("error: \(error)")
        throw ExitCode(1)
      }
      for warning in loaded.warnings { logger.warning("\(path): \(warning)") }
      if self.mode == .validate {
        print("configuration '\(path)' OK")
        return
      }
      try await self.serve(loaded.configuration, logger: logger, backend: nil, page: [])
      return
    }

    // The embedded default: the User service in-process on a free port, the proxy in front.
    let (portStream, portContinuation) = AsyncStream<Int>.makeStream()
    try await withThrowingDiscardingTaskGroup { group in
      group.addTask {
        do {
          try await BackendServer.run(host: "127.0.0.1", port: 0, replica: "embedded") { port in
            portContinuation.yield(port)
            portContinuation.finish()
          }
        } catch where Task.isCancelled {
          // Stopped because the proxy stopped: not an error.
        }
      }
      var iterator = portStream.makeAsyncIterator()
      guard let backendPort = await iterator.next() else { throw ExitCode(1) }
      let yaml = defaultConfig(backendPort)
      let loaded = try ConfigLoader.load(yaml: yaml)
      try await self.serve(loaded.configuration, logger: logger, backend: backendPort, page: page)
      group.cancelAll()
    }
  }

  private func serve(_ configuration: ProxyConfiguration, logger: Logger, backend: Int?, page: [EmbeddedDefault.PageFile]) async throws {
    let threads = self.concurrency ?? CPUBudget.defaultEventLoops()
    let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
    guard self.drainTimeSeconds >= 0, self.drainTimeSeconds.isFinite else {
      throw ValidationError("--drain-time-s takes a number of seconds, 0 or more")
    }
    let drainTime = Duration.milliseconds(Int64(self.drainTimeSeconds * 1000))
    let tracing: ProxyTracing
    do {
      tracing = try ProxyTracing(configuration: configuration, logger: logger)
    } catch {
      Self.stderr("error: \(error)")
      try? await group.shutdownGracefully()
      throw ExitCode(1)
    }
    let server = ProxyServer(configuration: configuration, group: group, logger: logger, drainTime: drainTime, tracing: tracing) { listeners in
      guard backend != nil, let first = listeners.first else { return }
      Self.printWelcome(host: first.host, port: first.port, page: !page.isEmpty)
    }
    let services = ServiceGroup(
      // Services stop in reverse order: the proxy drains first, then the span exporters flush.
      configuration: .init(services: tracing.services.map { .init(service: $0) } + [.init(service: server)],
        gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
    )
    do {
      try await services.run()
    } catch {
      Self.stderr("error: \(error)")
      try? await group.shutdownGracefully()
      throw ExitCode(1)
    }
    try await group.shutdownGracefully()
  }

  private static func parseListen(_ text: String, option: String) throws -> (String, Int) {
    guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else {
      throw ValidationError("\(option) takes HOST:PORT, e.g. 127.0.0.1:8080")
    }
    return (String(text[..<colon]), port)
  }

  /// The demo page's files, from the first folder that has an index.html.
  private static func pageFiles(webRoot: String?) throws -> [EmbeddedDefault.PageFile] {
    let sourceTree = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
      .deletingLastPathComponent().appendingPathComponent("web-demo").path
    let candidates = webRoot.map { [$0] }
      ?? [FileManager.default.currentDirectoryPath + "/web-demo", sourceTree, "/usr/share/grpc-web-proxy/web-demo"]
    let files = FileManager.default
    guard let root = candidates.first(where: { files.fileExists(atPath: $0 + "/index.html") }) else {
      if let webRoot { throw ValidationError("--web-root \(webRoot): no index.html there") }
      return []
    }
    let absolute = URL(fileURLWithPath: root).standardizedFileURL.path
    var page: [EmbeddedDefault.PageFile] = []
    for name in (try? files.contentsOfDirectory(atPath: absolute))?.sorted() ?? [] {
      guard let type = EmbeddedDefault.contentType(forFileName: name) else { continue }
      let file = absolute + "/" + name
      if name == "index.html" { page.append(.init(path: "/", file: file, contentType: type)) }
      page.append(.init(path: "/" + name, file: file, contentType: type))
    }
    return page
  }

  private static func printWelcome(host: String, port: Int, page: Bool) {
    var request = Demo_LoginReq()
    request.username = "demo"
    request.password = "demo123"
    let payload = (try? request.serializedBytes() as [UInt8]) ?? []
    var frame: [UInt8] = [0]
    let length = UInt32(payload.count)
    frame += [UInt8(length >> 24), UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF)]
    frame += payload
    let body = Data(frame).base64EncodedString()
    let browser = page ? "  open http://\(host):\(port)/ in a browser: the demo page logs in and out through the proxy\n" : ""
    print("""
      grpc-web-proxy is serving the demo.User service at http://\(host):\(port)
      \(browser)\
        accounts: demo / demo123, admin / 123456
        try a login from a shell (a gRPC-Web text request; the reply is binary, shown with cat -v):
          curl -s http://\(host):\(port)/demo.User/login -H 'content-type: application/grpc-web-text' \\
               -H 'x-grpc-web: 1' --data '\(body)' | cat -v
        or point a gRPC-Web client (grpc-web, protobuf-ts, connect-web) at http://\(host):\(port)
      Press Ctrl-C to stop.
      """)
    fflush(nil)
  }

  private static func stderr(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
  }
}
