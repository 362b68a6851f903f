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

/// What one DNS refresh of a cluster found.
enum DiscoveryOutcome: Sendable, Equatable {
  /// The endpoints, and the shortest record TTL when the resolver tells it.
  case endpoints([HostAndPort], ttl: Duration?)
  /// The names exist but have no address of the family asked for: the cluster empties only if
  /// this repeats, as a Swarm task list can be empty for a moment.
  case empty
  /// The lookup failed (no answer, SERVFAIL, NXDOMAIN): the last endpoints are kept.
  case failure(String)
}

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
      if case .endpoints(let endpoints, _) = await self.resolve(cluster, on: eventLoop) {
        result[cluster.name] = endpoints
      } else {
        result[cluster.name] = []
      }
    }
    return result
  }

  func resolve(_ cluster: Cluster, on eventLoop: any EventLoop) async -> DiscoveryOutcome {
    var endpoints: [HostAndPort] = []
    var failures: [String] = []
    var ttl: UInt32?
    for endpoint in cluster.endpoints {
      if endpoint.unixSocketPath != nil {
        endpoints.append(endpoint)
        continue
      }
      let host = endpoint.host
      let addresses: [String]
      if !cluster.dnsResolvers.isEmpty {
        // The cluster's own DNS servers: TTLs, and NXDOMAIN told apart from SERVFAIL.
        let resolver = DNSResolver(servers: cluster.dnsResolvers, group: eventLoop)
        switch await resolver.resolve(host, family: cluster.dnsLookupFamily) {
        case .addresses(let records):
          addresses = records.map(\.address)
          if let shortest = records.map(\.ttl).min() { ttl = min(ttl ?? shortest, shortest) }
        case .nxDomain:
          failures.append("\(host): NXDOMAIN")
          continue
        case .failure(let reason):
          failures.append(reason)
          continue
        }
      } else {
        let lookup: Lookup
        do {
          lookup = try await self.threadPool.runIfActive(eventLoop: eventLoop) { Self.lookup(host) }.get()
        } catch {
          failures.append("\(host): \(error)")
          continue
        }
        if let failure = lookup.failure {
          failures.append("\(host): \(failure)")
          continue
        }
        switch cluster.dnsLookupFamily {
        case .v4Only: addresses = lookup.v4
        case .v6Only: addresses = lookup.v6
        case .auto: addresses = lookup.v6.isEmpty ? lookup.v4 : lookup.v6
        case .v4Preferred: addresses = lookup.v4.isEmpty ? lookup.v6 : lookup.v4
        case .all: addresses = lookup.v4 + lookup.v6
        }
      }
      if addresses.isEmpty { continue }
      switch cluster.type {
      case .logicalDNS:
        endpoints.append(HostAndPort(host: addresses[0], port: endpoint.port))
      case .staticAddresses, .strictDNS:
        endpoints.append(contentsOf: addresses.map { HostAndPort(host: $0, port: endpoint.port) })
      }
    }
    var seen = Set<HostAndPort>()
    endpoints = endpoints.filter { seen.insert($0).inserted }
    // One name without an answer keeps the whole last set: its endpoints are not known to be gone.
    if !failures.isEmpty { return .failure(failures.joined(separator: "; ")) }
    if !endpoints.isEmpty { return .endpoints(endpoints, ttl: ttl.map { .seconds(Int64($0)) }) }
    return .empty
  }

  struct Lookup: Sendable {
    var v4: [String] = []
    var v6: [String] = []
    /// Set when the resolver could not answer (as opposed to: the name has no address).
    var failure: String?
  }

  private static func text(_ cString: [CChar]) -> String {
    String(decoding: cString.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  /// Every address of a host name, IPv4 and IPv6 apart, without duplicates.
  static func lookup(_ host: String) -> Lookup {
    var hints = addrinfo()
    hints.ai_family = AF_UNSPEC
    #if canImport(Darwin)
    hints.ai_socktype = SOCK_STREAM
    #else
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    #endif
    var result: UnsafeMutablePointer<addrinfo>?
    let code = getaddrinfo(host, nil, &hints, &result)
    guard code == 0, let first = result else {
      // "No address" (EAI_NODATA, -5, a GNU extension Swift's Glibc module does not export) is
      // an empty answer. "No such name" keeps the last endpoints like any failure: a Swarm name
      // can be unknown for a moment while its tasks are replaced. (glibc often reports an empty
      // answer as "no such name" too; `dns_resolvers` tells them apart.)
      if code == -5 { return Lookup() }
      return Lookup(failure: String(cString: gai_strerror(code)))
    }
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
    return Lookup(v4: v4, v6: v6)
  }
}
