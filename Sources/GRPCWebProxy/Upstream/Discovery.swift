#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import NIOCore
import NIOPosix
import ProxyConfig

/// Finds the endpoints of each cluster: the listed addresses for STATIC, every A/AAAA record for
/// STRICT_DNS (re-resolved every `dns_refresh_rate`), the first for LOGICAL_DNS.
struct Discovery: Sendable {
  let clusters: [Cluster]
  let threadPool: NIOThreadPool
  let logger: Logger

  /// Resolves every cluster once. A name that does not resolve yet leaves its cluster empty
  /// (calls get "no healthy upstream") until a later refresh finds it.
  func resolveAll(on eventLoop: any EventLoop) async -> [String: [HostAndPort]] {
    var result: [String: [HostAndPort]] = [:]
    for cluster in self.clusters {
      result[cluster.name] = (try? await self.resolve(cluster, on: eventLoop)) ?? []
    }
    return result
  }

  func resolve(_ cluster: Cluster, on eventLoop: any EventLoop) async throws -> [HostAndPort] {
    var endpoints: [HostAndPort] = []
    for endpoint in cluster.endpoints {
      let host = endpoint.host
      let (v4, v6) = try await self.threadPool.runIfActive(eventLoop: eventLoop) { Self.lookup(host) }.get()
      let addresses: [String]
      switch cluster.dnsLookupFamily {
      case .v4Only: addresses = v4
      case .v6Only: addresses = v6
      case .auto: addresses = v6.isEmpty ? v4 : v6
      case .v4Preferred: addresses = v4.isEmpty ? v6 : v4
      case .all: addresses = v4 + v6
      }
      if addresses.isEmpty {
        self.logger.warning("cluster '\(cluster.name)': '\(host)' did not resolve")
        continue
      }
      switch cluster.type {
      case .logicalDNS:
        endpoints.append(HostAndPort(host: addresses[0], port: endpoint.port))
      case .staticAddresses, .strictDNS:
        endpoints.append(contentsOf: addresses.map { HostAndPort(host: $0, port: endpoint.port) })
      }
    }
    var seen = Set<HostAndPort>()
    return endpoints.filter { seen.insert($0).inserted }
  }

  private static func text(_ cString: [CChar]) -> String {
    String(decoding: cString.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  /// Every address of a host name, IPv4 and IPv6 apart, without duplicates.
  static func lookup(_ host: String) -> (v4: [String], v6: [String]) {
    var hints = addrinfo()
    hints.ai_family = AF_UNSPEC
    #if canImport(Darwin)
    hints.ai_socktype = SOCK_STREAM
    #else
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    #endif
    var result: UnsafeMutablePointer<addrinfo>?
    guard getaddrinfo(host, nil, &hints, &result) == 0, let first = result else { return ([], []) }
    defer { freeaddrinfo(first) }
    var v4: [String] = []
    var v6: [String] = []
    var pointer: UnsafeMutablePointer<addrinfo>? = first
    while let info = pointer {
      var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
      if info.pointee.ai_family == AF_INET {
        info.pointee.ai_addr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
          var addr = sin.pointee.sin_addr
          inet_ntop(AF_INET, &addr, &buffer, socklen_t(buffer.count))
        }
        let text = Self.text(buffer)
        if !v4.contains(text) { v4.append(text) }
      } else if info.pointee.ai_family == AF_INET6 {
        info.pointee.ai_addr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin6 in
          var addr = sin6.pointee.sin6_addr
          inet_ntop(AF_INET6, &addr, &buffer, socklen_t(buffer.count))
        }
        let text = Self.text(buffer)
        if !v6.contains(text) { v6.append(text) }
      }
      pointer = info.pointee.ai_next
    }
    return (v4, v6)
  }
}
