import Foundation
import ProxyConfig
import Testing
import Yams

/// Every config of the public corpus (read in place from ../shared): the v2 and v3 ones load,
/// the v1 one is refused with the file, path and line.
@Suite struct CorpusTests {
  static let directory = sharedDirectory.appendingPathComponent("envoy-corpus/configs")

  static var files: [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []).filter { $0.hasSuffix(".yaml") }.sorted()
  }

  @Test(.enabled(if: sharedAvailable, "../shared/envoy-corpus is not beside the checkout"))
  func everyV2AndV3ConfigLoads() throws {
    // The template's placeholders, as its deployment fills them.
    setenv("listenPort", "8080", 1)
    setenv("nodeAddress", "127.0.0.1", 1)
    setenv("nodePort", "50211", 1)
    var loaded = 0
    var refused: [String] = []
    var certificatesMissing: [String] = []
    for name in Self.files {
      let path = Self.directory.appendingPathComponent(name).path
      do {
        let config = try ConfigLoader.load(file: path).configuration
        #expect(!config.listeners.isEmpty, "\(name): no listener")
        loaded += 1
      } catch where Self.isCertificateFile(error) {
        // Its certificates live in its own repository, not here; as Envoy would, the loader
        // names the file. Everything else must load: with the TLS blocks left out, it does.
        certificatesMissing.append(name)
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let config = try ConfigLoader.load(yaml: try Self.withoutTLS(text)).configuration
        #expect(!config.listeners.isEmpty, "\(name): no listener")
        loaded += 1
      } catch {
        refused.append(name)
        #expect(error.file == path && error.line != nil, "\(name): \(error)")
      }
    }
    #expect(Self.files.count == 50)
    #expect(loaded == 49, "refused: \(refused)")
    #expect(refused == ["44-negator-envoy-grpc-web-v1-downstream.yaml"])
    #expect(!certificatesMissing.isEmpty)
  }

  static func isCertificateFile(_ error: ConfigError) -> Bool {
    (error.path.contains("transport_socket") || error.path.contains("tls_context")) && error.message.contains("cannot read")
  }

  /// The YAML with every `transport_socket` and `tls_context` removed.
  static func withoutTLS(_ text: String) throws -> String {
    func strip(_ node: Node) -> Node {
      switch node {
      case .mapping(let m):
        let pairs = m.filter { !["transport_socket", "tls_context"].contains($0.key.string ?? "") }.map { ($0.key, strip($0.value)) }
        return .mapping(Node.Mapping(pairs))
      case .sequence(let s):
        return .sequence(Node.Sequence(s.map(strip)))
      default:
        return node
      }
    }
    // Duplicate keys (config 31) would stop Yams: the loader's own reading keeps the last one.
    var source = text
    while true {
      do {
        guard let node = try Yams.compose(yaml: source) else { return text }
        return try Yams.serialize(node: strip(node))
      } catch let YamlError.duplicatedKeysInMapping(keys, context) {
        guard let key = keys.first, let shorter = ConfigLoader.droppingBlock(key: key, line: context.mark.line, in: source) else { throw YamlError.duplicatedKeysInMapping(duplicates: keys, context: context) }
        source = shorter
      }
    }
  }

  @Test(.enabled(if: sharedAvailable, "../shared/envoy-corpus is not beside the checkout"))
  func oddButMeaningfulConfigsLoadWithWarnings() throws {
    let mapping = try ConfigLoader.load(file: Self.directory.appendingPathComponent("28-damondouglas-grpc-flutter-web-example-k8s-configmap.yaml").path)
    #expect(mapping.warnings.contains { $0.message.contains("read as a list of one filter") && $0.line == 10 })
    let pipe = try ConfigLoader.load(file: Self.directory.appendingPathComponent("08-oasisprotocol-oasis-sdk-core-playground.yaml").path)
    #expect(pipe.configuration.clusters[0].endpoints[0].unixSocketPath?.hasSuffix("internal.sock") == true)
  }

  @Test func unsetTemplatePlaceholderNamesTheVariable() {
    let yaml = ConfigLoaderTests.minimal(connectTimeout: "1s").replacingOccurrences(of: "port_value: 9000", with: "port_value: $UNSET_BACKEND_PORT_FOR_TEST")
    #expect { try ConfigLoader.load(yaml: yaml) } throws: { error in
      let e = error as? ConfigError
      return e?.message.contains("UNSET_BACKEND_PORT_FOR_TEST is not set in the environment") == true && e?.line == 34
    }
  }

  @Test func duplicateKeysKeepTheLastAndKeepLineNumbers() throws {
    let yaml = ConfigLoaderTests.minimal(connectTimeout: "1s").replacingOccurrences(of: "    type: STATIC\n", with: "    type: STRICT_DNS\n    type: STATIC\n")
    let loaded = try ConfigLoader.load(yaml: yaml)
    #expect(loaded.configuration.clusters[0].type == .staticAddresses)
    #expect(loaded.warnings.contains { $0.message.contains("duplicate key 'type'") && $0.line == 25 }, "\(loaded.warnings)")
    // A later error still names its real line.
    let bad = yaml.replacingOccurrences(of: "connect_timeout: 1s", with: "connect_timeout: 5")
    #expect { try ConfigLoader.load(yaml: bad) } throws: { ($0 as? ConfigError)?.line == 28 }
  }
}
