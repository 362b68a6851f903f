import Foundation
import ProxyConfig
import Testing

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
    for name in Self.files {
      let path = Self.directory.appendingPathComponent(name).path
      do {
        let config = try ConfigLoader.load(file: path).configuration
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
  }

  @Test(.enabled(if: sharedAvailable, "../shared/envoy-corpus is not beside the checkout"))
  func oddButMeaningfulConfigsLoadWithWarnings() throws {
    let duplicate = try ConfigLoader.load(file: Self.directory.appendingPathComponent("31-salrashid123-grpc_web_and_transcoding_with_envoy-proxy.yaml").path)
    #expect(duplicate.warnings.contains { $0.message.contains("duplicate key 'transport_socket'") && $0.line != nil })
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
