import ProxyConfig

/// What a DNS answer changes in a cluster's endpoints.
///
/// Docker's embedded DNS (like most round-robin DNS) answers `tasks.<service>` with the same
/// addresses in a new order on every lookup. Only a different set of endpoints is a change: the
/// same set in another order neither rebuilds the cluster nor writes a log line.
struct EndpointSetChange: Equatable, CustomStringConvertible {
  /// Every endpoint of the new answer, sorted, for the log.
  var now: [HostAndPort]
  var added: [HostAndPort]
  var removed: [HostAndPort]

  /// nil when `new` holds the same endpoints as `old`, in whatever order.
  init?(from old: [HostAndPort], to new: [HostAndPort]) {
    let oldSet = Set(old)
    let newSet = Set(new)
    guard oldSet != newSet else { return nil }
    let byName = { (a: HostAndPort, b: HostAndPort) in a.description < b.description }
    self.now = newSet.sorted(by: byName)
    self.added = newSet.subtracting(oldSet).sorted(by: byName)
    self.removed = oldSet.subtracting(newSet).sorted(by: byName)
  }

  var description: String {
    var text = "endpoints now " + (now.isEmpty ? "none" : now.map(\.description).joined(separator: ", "))
    var parts: [String] = []
    if !added.isEmpty { parts.append("added " + added.map(\.description).joined(separator: ", ")) }
    if !removed.isEmpty { parts.append("removed " + removed.map(\.description).joined(separator: ", ")) }
    if !parts.isEmpty { text += " (" + parts.joined(separator: "; ") + ")" }
    return text
  }
}
