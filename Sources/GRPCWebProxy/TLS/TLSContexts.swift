import Foundation
import Logging
import NIOSSL
import ProxyConfig
import Synchronization

/// A NIOSSL context built from configured files, rebuilt when they change.
///
/// Each new connection takes `current`; a connection keeps the context it started with, so a
/// rotated certificate reaches new connections without a restart and without touching the
/// connections already open. A rebuild that fails (a key written after its certificate, a
/// truncated file) keeps the previous context and is tried again at the next check.
final class ReloadableTLSContext: Sendable {
  /// What the context serves, for log lines ("listener 'https' filter chain 0").
  let name: String
  /// The counter prefix its reloads are counted under.
  let statPrefix: String
  private let files: [String]
  private let build: @Sendable () throws -> NIOSSLContext
  private let state: Mutex<State>

  private struct State {
    var context: NIOSSLContext
    var stamps: [FileStamp?]
    var failedStamps: [FileStamp?]?
  }

  /// - Throws: `ProxyError` naming the configuration when the first build fails.
  init(name: String, statPrefix: String, origin: String, files: [String], build: @escaping @Sendable () throws -> NIOSSLContext) throws {
    self.name = name
    self.statPrefix = statPrefix
    self.files = files
    self.build = build
    let stamps = files.map(FileStamp.init(path:))
    do {
      self.state = Mutex(State(context: try build(), stamps: stamps))
    } catch {
      throw ProxyError(message: "\(name): \(origin): cannot set up TLS: \(TLSErrorText.describe(error))")
    }
  }

  var current: NIOSSLContext { self.state.withLock { $0.context } }

  /// Rebuilds the context if a file changed since the last build. Called every second or so,
  /// off the event loops.
  func reloadIfChanged(status: ProxyStatus, logger: Logger) {
    let stamps = self.files.map(FileStamp.init(path:))
    let (changed, alreadyFailed) = self.state.withLock { ($0.stamps != stamps, $0.failedStamps == stamps) }
    guard changed, !alreadyFailed else { return }
    do {
      let context = try self.build()
      self.state.withLock {
        $0.context = context
        $0.stamps = stamps
        $0.failedStamps = nil
      }
      status.count("\(self.statPrefix).ssl.context_reload")
      logger.info("\(self.name): certificate files changed; new connections use the new certificates")
    } catch {
      self.state.withLock { $0.failedStamps = stamps }
      status.count("\(self.statPrefix).ssl.context_reload_error")
      logger.warning("\(self.name): certificate files changed but cannot be used (\(TLSErrorText.describe(error))); keeping the previous certificates")
    }
  }
}

/// What tells a file's change: modification time, size and inode (a Kubernetes secret is
/// replaced by swapping a symlink, which changes the inode the path leads to).
private struct FileStamp: Hashable {
  var modified: Date?
  var size: Int?
  var inode: Int?

  init?(path: String) {
    guard let attributes = try? FileManager.default.attributesOfItem(atPath: path) else { return nil }
    self.modified = attributes[.modificationDate] as? Date
    self.size = (attributes[.size] as? NSNumber)?.intValue
    self.inode = (attributes[.systemFileNumber] as? NSNumber)?.intValue
  }
}

/// Builds NIOSSL configurations from the TLS settings of the configuration.
enum TLSContextFactory {
  static func serverContext(_ tls: DownstreamTLS) throws -> NIOSSLContext {
    let (chain, key) = try self.certificate(tls.certificate)
    var configuration = TLSConfiguration.makeServerConfiguration(
      certificateChain: chain.map { .certificate($0) },
      privateKey: .privateKey(key)
    )
    configuration.applicationProtocols = tls.alpnProtocols
    try self.apply(tls.parameters, to: &configuration, defaultMaximum: .tlsv13)
    if let validation = tls.validation, let ca = validation.trustedCA {
      configuration.trustRoots = .certificates(try self.certificates(ca))
      configuration.certificateVerification = tls.requireClientCertificate ? .noHostnameVerification : .optionalVerification
      // Lets a browser offer only the client certificates this CA signed.
      configuration.sendCANameList = true
    } else {
      configuration.certificateVerification = .none
    }
    return try NIOSSLContext(configuration: configuration)
  }

  static func clientContext(_ tls: UpstreamTLS) throws -> NIOSSLContext {
    var configuration = TLSConfiguration.makeClientConfiguration()
    configuration.applicationProtocols = tls.alpnProtocols
    // Envoy's default for upstream connections is TLS 1.2 at most.
    try self.apply(tls.parameters, to: &configuration, defaultMaximum: .tlsv12)
    if let certificate = tls.certificate {
      let (chain, key) = try self.certificate(certificate)
      configuration.certificateChain = chain.map { .certificate($0) }
      configuration.privateKey = .privateKey(key)
    }
    if let ca = tls.validation?.trustedCA {
      configuration.trustRoots = .certificates(try self.certificates(ca))
      // Envoy checks names only through match_typed_subject_alt_names, not against the SNI.
      configuration.certificateVerification = .noHostnameVerification
    } else {
      configuration.certificateVerification = .none
    }
    return try NIOSSLContext(configuration: configuration)
  }

  private static func apply(_ parameters: TLSParameters, to configuration: inout TLSConfiguration, defaultMaximum: TLSVersion) throws {
    configuration.minimumTLSVersion = self.version(parameters.minimumVersion) ?? .tlsv12
    configuration.maximumTLSVersion = self.version(parameters.maximumVersion) ?? defaultMaximum
    if configuration.minimumTLSVersion == .tlsv13, configuration.maximumTLSVersion == .tlsv12 {
      configuration.maximumTLSVersion = .tlsv13
    }
    if !parameters.cipherSuites.isEmpty {
      configuration.cipherSuites = parameters.cipherSuites.joined(separator: ":")
    }
    if !parameters.ecdhCurves.isEmpty {
      configuration.curves = try parameters.ecdhCurves.map { name in
        switch name.uppercased() {
        case "X25519": return .x25519
        case "P-256", "PRIME256V1", "SECP256R1": return .secp256r1
        case "P-384", "SECP384R1": return .secp384r1
        case "P-521", "SECP521R1": return .secp521r1
        case "X25519MLKEM768": return .x25519_MLKEM768
        default: throw TLSSetupError(message: "ecdh curve '\(name)' is not known (X25519, P-256, P-384, P-521, X25519MLKEM768)")
        }
      }
    }
  }

  private static func version(_ version: TLSProtocolVersion?) -> TLSVersion? {
    switch version {
    case .v1_0: return .tlsv1
    case .v1_1: return .tlsv11
    case .v1_2: return .tlsv12
    case .v1_3: return .tlsv13
    case .auto, nil: return nil
    }
  }

  static func bytes(_ source: TLSDataSource) throws -> [UInt8] {
    switch source {
    case .inline(let text):
      return Array(text.utf8)
    case .file(let path):
      guard let data = FileManager.default.contents(atPath: path) else {
        throw TLSSetupError(message: "cannot read '\(path)'")
      }
      return Array(data)
    }
  }

  static func certificates(_ source: TLSDataSource) throws -> [NIOSSLCertificate] {
    let certificates: [NIOSSLCertificate]
    do {
      certificates = try NIOSSLCertificate.fromPEMBytes(self.bytes(source))
    } catch let error as TLSSetupError {
      throw error
    } catch {
      throw TLSSetupError(message: "'\(source)' holds no PEM certificate that can be read (\(TLSErrorText.describe(error)))")
    }
    guard !certificates.isEmpty else { throw TLSSetupError(message: "'\(source)' holds no PEM certificate") }
    return certificates
  }

  private static func certificate(_ certificate: TLSCertificate) throws -> ([NIOSSLCertificate], NIOSSLPrivateKey) {
    let chain = try self.certificates(certificate.certificateChain)
    let keyBytes = try self.bytes(certificate.privateKey)
    let key: NIOSSLPrivateKey
    do {
      if let password = certificate.password {
        let secret = try self.bytes(password).filter { $0 != UInt8(ascii: "\n") && $0 != UInt8(ascii: "\r") }
        key = try NIOSSLPrivateKey(bytes: keyBytes, format: .pem) { setter in setter(secret) }
      } else {
        key = try NIOSSLPrivateKey(bytes: keyBytes, format: .pem)
      }
    } catch {
      throw TLSSetupError(message: "'\(certificate.privateKey)' holds no PEM private key that can be read"
        + (certificate.password == nil ? " (an encrypted key needs 'password')" : " with the given password"))
    }
    return (chain, key)
  }
}

struct TLSSetupError: Error, CustomStringConvertible {
  var message: String
  var description: String { self.message }
}

/// Short, readable descriptions of NIOSSL and BoringSSL errors for log lines and gRPC messages.
enum TLSErrorText {
  /// The BoringSSL reason codes of an error (`CERTIFICATE_VERIFY_FAILED`), or its description.
  static func reasons(_ error: any Error) -> [String] {
    let stack: NIOBoringSSLErrorStack
    switch error {
    case NIOSSLError.handshakeFailed(let inner), NIOSSLError.shutdownFailed(let inner):
      switch inner {
      case .sslError(let s), .unknownError(let s), .invalidSNIName(let s), .failedToSetALPN(let s): stack = s
      default: return ["\(inner)"]
      }
    case BoringSSLError.sslError(let s), BoringSSLError.unknownError(let s):
      stack = s
    default:
      return []
    }
    // "Error: 268435581 error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED at
    // ssl/handshake.cc:298" -> "CERTIFICATE_VERIFY_FAILED".
    return stack.map { entry in
      let text = "\(entry)"
      let message = text.range(of: " at ").map { String(text[..<$0.lowerBound]) } ?? text
      return message.split(separator: ":").last.map(String.init) ?? message
    }
  }

  static func describe(_ error: any Error) -> String {
    if let setup = error as? TLSSetupError { return setup.message }
    let reasons = self.reasons(error)
    if !reasons.isEmpty { return reasons.joined(separator: ", ") }
    if let ssl = error as? NIOSSLError {
      switch ssl {
      case .uncleanShutdown: return "the peer closed the connection during the handshake"
      case .failedToLoadCertificate: return "a certificate cannot be read"
      case .failedToLoadPrivateKey: return "a private key cannot be read"
      default: return "\(ssl)"
      }
    }
    return "\(error)"
  }
}
