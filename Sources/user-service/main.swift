import ArgumentParser
import Foundation
import UserService

@main
struct UserServiceCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "user-service",
    abstract: "The demo.User gRPC service (login, logout) and the demo.Echo test service, on plaintext HTTP/2."
  )

  @Option(name: .long, help: "Address to listen on.")
  var host: String = "0.0.0.0"

  @Option(name: .long, help: "Port to listen on (0 picks a free one).")
  var port: Int = 50051

  @Option(name: .long, help: "Name this replica reports in every reply (default: the host name and port).")
  var replica: String?

  func run() async throws {
    let replica = self.replica ?? ProcessInfo.processInfo.environment["REPLICA"]
      ?? "\(ProcessInfo.processInfo.hostName):\(self.port)"
    try await BackendServer.run(host: self.host, port: self.port, replica: replica) { port in
      print("user-service replica \(replica) listening on \(self.host):\(port)")
      fflush(nil)
    }
  }
}
