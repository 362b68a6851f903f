/// A gRPC status code (grpc/doc/statuscodes.md), as `grpc-status` carries it. A backend may send
/// a number outside the 17 defined ones: it is kept as it came, and named by its number.
public struct GRPCStatus: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
  public var rawValue: Int

  public init(rawValue: Int) { self.rawValue = rawValue }

  /// From a `grpc-status` value; nil if it is not a number.
  public init?(headerValue: some StringProtocol) {
    guard let code = Int(headerValue) else { return nil }
    self.rawValue = code
  }

  /// From an upper-case name (`UNAVAILABLE`, and Envoy's spelling `CANCELED` too).
  public init?(name: String) {
    if name == "CANCELED" {
      self = .cancelled
      return
    }
    guard let code = Self.snakeNames.firstIndex(of: name) else { return nil }
    self.rawValue = code
  }

  public static let ok = GRPCStatus(rawValue: 0)
  public static let cancelled = GRPCStatus(rawValue: 1)
  public static let unknown = GRPCStatus(rawValue: 2)
  public static let invalidArgument = GRPCStatus(rawValue: 3)
  public static let deadlineExceeded = GRPCStatus(rawValue: 4)
  public static let notFound = GRPCStatus(rawValue: 5)
  public static let alreadyExists = GRPCStatus(rawValue: 6)
  public static let permissionDenied = GRPCStatus(rawValue: 7)
  public static let resourceExhausted = GRPCStatus(rawValue: 8)
  public static let failedPrecondition = GRPCStatus(rawValue: 9)
  public static let aborted = GRPCStatus(rawValue: 10)
  public static let outOfRange = GRPCStatus(rawValue: 11)
  public static let unimplemented = GRPCStatus(rawValue: 12)
  public static let internalError = GRPCStatus(rawValue: 13)
  public static let unavailable = GRPCStatus(rawValue: 14)
  public static let dataLoss = GRPCStatus(rawValue: 15)
  public static let unauthenticated = GRPCStatus(rawValue: 16)

  /// The value of a `grpc-status` header or trailer.
  public var headerValue: String { String(self.rawValue) }

  public var description: String { self.snakeName }

  /// `UNAVAILABLE`: Envoy's `%GRPC_STATUS(SNAKE_STRING)%`.
  public var snakeName: String {
    Self.snakeNames.indices.contains(self.rawValue) ? Self.snakeNames[self.rawValue] : String(self.rawValue)
  }

  /// `Unavailable`: Envoy's `%GRPC_STATUS%` (its CAMEL_STRING form).
  public var camelName: String {
    Self.camelNames.indices.contains(self.rawValue) ? Self.camelNames[self.rawValue] : String(self.rawValue)
  }

  /// The status for an HTTP status when the response carries none (Envoy's table:
  /// `Grpc::Utility::httpToGrpcStatus`, which has no 431 row).
  public init(httpStatus code: Int) {
    switch code {
    case 400: self = .internalError
    case 401: self = .unauthenticated
    case 403: self = .permissionDenied
    case 404: self = .unimplemented
    case 429, 502, 503, 504: self = .unavailable
    default: self = .unknown
    }
  }

  static let camelNames = ["OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented", "Internal",
    "Unavailable", "DataLoss", "Unauthenticated"]
  static let snakeNames = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
    "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"]
}
