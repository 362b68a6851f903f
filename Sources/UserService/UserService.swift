import GRPCCore

/// The `demo.User` service: logs demo users in and out. Every reply names the replica that
/// answered, in the `replica` field and in the `x-replica` response header, so a caller can see
/// calls spread over replicas.
public struct UserService: Demo_User.ServiceProtocol {
  /// The demo accounts: user name to password.
  public static let accounts: [String: String] = ["demo": "demo123", "admin": "123456"]

  public let replica: String

  public init(replica: String) {
    self.replica = replica
  }

  public func login(
    request: ServerRequest<Demo_LoginReq>,
    context: ServerContext
  ) async throws -> ServerResponse<Demo_LoginRes> {
    let username = request.message.username
    guard !username.isEmpty else {
      throw RPCError(code: .invalidArgument, message: "username is required")
    }
    guard let password = Self.accounts[username], password == request.message.password else {
      throw RPCError(
        code: .unauthenticated,
        message: "wrong username or password",
        metadata: ["x-replica": "\(self.replica)"]
      )
    }
    var reply = Demo_LoginRes()
    reply.code = "0"
    reply.res = "welcome, \(username)"
    reply.replica = self.replica
    return ServerResponse(message: reply, metadata: ["x-replica": "\(self.replica)"])
  }

  public func logout(
    request: ServerRequest<Demo_LogoutReq>,
    context: ServerContext
  ) async throws -> ServerResponse<Demo_LogoutRes> {
    guard !request.message.username.isEmpty else {
      throw RPCError(code: .invalidArgument, message: "username is required")
    }
    var reply = Demo_LogoutRes()
    reply.code = "0"
    reply.res = "goodbye, \(request.message.username)"
    reply.replica = self.replica
    return ServerResponse(message: reply, metadata: ["x-replica": "\(self.replica)"])
  }
}
