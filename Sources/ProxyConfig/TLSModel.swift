// TLS settings as read from Envoy's `DownstreamTlsContext` and `UpstreamTlsContext` (v3
// `transport_socket`, v2 `tls_context`). Plain values: the I/O layer turns them into NIOSSL
// contexts, and reads the files again when they change.

/// Envoy's `config.core.v3.DataSource` for certificates and keys: a file, read at start-up and
/// again when it changes, or text inline in the configuration.
public enum TLSDataSource: Sendable, Hashable, CustomStringConvertible {
  case file(String)
  case inline(String)

  /// The file to watch, if the data comes from one.
  public var path: String? {
    if case .file(let path) = self { return path }
    return nil
  }

  public var description: String {
    switch self {
    case .file(let path): return path
    case .inline: return "inline_string"
    }
  }
}

/// One `tls_certificates` entry: a certificate chain (leaf first) and its private key.
public struct TLSCertificate: Sendable, Hashable {
  public var certificateChain: TLSDataSource
  public var privateKey: TLSDataSource
  /// `password`: the passphrase of an encrypted private key.
  public var password: TLSDataSource?

  public init(certificateChain: TLSDataSource, privateKey: TLSDataSource, password: TLSDataSource? = nil) {
    self.certificateChain = certificateChain
    self.privateKey = privateKey
    self.password = password
  }
}

/// `tls_params` version bounds, spelled as Envoy spells them (`TLSv1_2`, any letter case).
public enum TLSProtocolVersion: String, Sendable, Hashable, CaseIterable {
  case auto = "TLS_AUTO"
  case v1_0 = "TLSV1_0"
  case v1_1 = "TLSV1_1"
  case v1_2 = "TLSV1_2"
  case v1_3 = "TLSV1_3"
}

/// `tls_params`.
public struct TLSParameters: Sendable, Hashable {
  public var minimumVersion: TLSProtocolVersion?
  public var maximumVersion: TLSProtocolVersion?
  /// BoringSSL cipher names (`ECDHE-RSA-AES128-GCM-SHA256`, `[A|B]` groups); TLS 1.3 suites are
  /// not configurable, as in Envoy.
  public var cipherSuites: [String]
  public var ecdhCurves: [String]

  public init(
    minimumVersion: TLSProtocolVersion? = nil, maximumVersion: TLSProtocolVersion? = nil,
    cipherSuites: [String] = [], ecdhCurves: [String] = []
  ) {
    self.minimumVersion = minimumVersion
    self.maximumVersion = maximumVersion
    self.cipherSuites = cipherSuites
    self.ecdhCurves = ecdhCurves
  }
}

/// One `match_typed_subject_alt_names` entry (or a v2 `match_subject_alt_names` one, which
/// matches DNS names).
public struct SubjectAltNameMatcher: Sendable, Hashable {
  public enum NameType: String, Sendable, Hashable, CaseIterable {
    case dns = "DNS"
    case uri = "URI"
    case email = "EMAIL"
    case ipAddress = "IP_ADDRESS"
  }

  public var type: NameType
  public var matcher: StringMatcher

  public init(type: NameType, matcher: StringMatcher) {
    self.type = type
    self.matcher = matcher
  }
}

/// `validation_context`: how the peer's certificate is checked.
public struct CertificateValidation: Sendable, Hashable {
  /// `trusted_ca`: the roots the peer's chain must lead to.
  public var trustedCA: TLSDataSource?
  /// The peer's certificate must carry a subject alternative name that one of these matches
  /// (none: any name).
  public var subjectAltNames: [SubjectAltNameMatcher]

  public init(trustedCA: TLSDataSource?, subjectAltNames: [SubjectAltNameMatcher] = []) {
    self.trustedCA = trustedCA
    self.subjectAltNames = subjectAltNames
  }
}

/// A filter chain's `DownstreamTlsContext`.
public struct DownstreamTLS: Sendable, Hashable {
  public var certificate: TLSCertificate
  /// `alpn_protocols`: offered in this order (`h2`, `http/1.1`); empty means no ALPN, as in Envoy,
  /// and the HTTP version is then told by the first bytes (`codec_type: AUTO`).
  public var alpnProtocols: [String]
  public var parameters: TLSParameters
  public var requireClientCertificate: Bool
  public var validation: CertificateValidation?
  /// How long a client may take to finish its handshake (`transport_socket_connect_timeout`
  /// of the filter chain; 10 s when unset, where Envoy waits without a limit).
  public var handshakeTimeout: ProxyDuration
  /// Where it was configured (`file:line path`), for messages about its files.
  public var origin: String

  public static let defaultHandshakeTimeout = ProxyDuration.seconds(10)

  public init(
    certificate: TLSCertificate, alpnProtocols: [String] = [], parameters: TLSParameters = .init(),
    requireClientCertificate: Bool = false, validation: CertificateValidation? = nil,
    handshakeTimeout: ProxyDuration = DownstreamTLS.defaultHandshakeTimeout, origin: String = ""
  ) {
    self.certificate = certificate
    self.alpnProtocols = alpnProtocols
    self.parameters = parameters
    self.requireClientCertificate = requireClientCertificate
    self.validation = validation
    self.handshakeTimeout = handshakeTimeout
    self.origin = origin
  }

  /// Every file it reads: these are watched for changes.
  public var files: [String] {
    [self.certificate.certificateChain.path, self.certificate.privateKey.path, self.certificate.password?.path,
      self.validation?.trustedCA?.path].compactMap { $0 }
  }
}

/// A cluster's `UpstreamTlsContext`.
public struct UpstreamTLS: Sendable, Hashable {
  /// `sni`: the server name sent in the handshake (none when unset, as in Envoy).
  public var sni: String?
  /// A client certificate, for backends that require one (mutual TLS).
  public var certificate: TLSCertificate?
  /// `alpn_protocols`; `h2` when empty, since the proxy speaks HTTP/2 to every backend.
  public var alpnProtocols: [String]
  public var parameters: TLSParameters
  /// Without a validation context the backend's certificate is not checked (as in Envoy).
  public var validation: CertificateValidation?
  public var origin: String

  public init(
    sni: String? = nil, certificate: TLSCertificate? = nil, alpnProtocols: [String] = [],
    parameters: TLSParameters = .init(), validation: CertificateValidation? = nil, origin: String = ""
  ) {
    self.sni = sni
    self.certificate = certificate
    self.alpnProtocols = alpnProtocols
    self.parameters = parameters
    self.validation = validation
    self.origin = origin
  }

  public var files: [String] {
    [self.certificate?.certificateChain.path, self.certificate?.privateKey.path, self.certificate?.password?.path,
      self.validation?.trustedCA?.path].compactMap { $0 }
  }
}
