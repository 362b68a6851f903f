import NIOHPACK
import ProxyConfig

extension HeaderMutations {
  /// Removes, then adds, as Envoy does within one level. `%REQ(name)%` takes its value from
  /// `request`; a value that comes out empty is left out unless `keep_empty_value` says otherwise.
  public func apply(to headers: inout HPACKHeaders, request: HPACKHeaders) {
    for name in self.remove { headers.remove(name: name) }
    for add in self.add {
      let value = Self.resolve(add.value, request: request)
      if value.isEmpty && !add.keepEmptyValue { continue }
      switch add.action {
      case .APPEND_IF_EXISTS_OR_ADD:
        headers.add(name: add.name, value: value)
      case .ADD_IF_ABSENT:
        if !headers.contains(name: add.name) { headers.add(name: add.name, value: value) }
      case .OVERWRITE_IF_EXISTS_OR_ADD:
        headers.replaceOrAdd(name: add.name, value: value)
      case .OVERWRITE_IF_EXISTS:
        if headers.contains(name: add.name) { headers.replaceOrAdd(name: add.name, value: value) }
      }
    }
  }

  public static func apply(_ levels: [HeaderMutations], to headers: inout HPACKHeaders, request: HPACKHeaders) {
    for level in levels { level.apply(to: &headers, request: request) }
  }

  private static func resolve(_ parts: [ValuePart], request: HPACKHeaders) -> String {
    if parts.count == 1, case .text(let text) = parts[0] { return text }
    var value = ""
    for part in parts {
      switch part {
      case .text(let text): value += text
      case .requestHeader(let name): value += request.first(name: name) ?? ""
      }
    }
    return value
  }
}
