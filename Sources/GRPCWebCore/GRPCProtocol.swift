/// Small pieces of the gRPC-over-HTTP/2 protocol that the translation needs.
public enum GRPCProtocol {
  /// Parses a `grpc-timeout` value into milliseconds, as Envoy does: 1 to 8 digits and one unit
  /// of `H M S m u n`, with `u` and `n` rounded up to whole milliseconds. Anything else is nil
  /// (treated as absent). Zero means no deadline.
  public static func parseTimeout(_ value: String) -> Int64? {
    let utf8 = Array(value.utf8)
    guard utf8.count >= 2, utf8.count <= 9 else { return nil }
    var number: Int64 = 0
    for c in utf8.dropLast() {
      guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { return nil }
      number = number * 10 + Int64(c - UInt8(ascii: "0"))
    }
    switch utf8.last! {
    case UInt8(ascii: "H"): return number * 3_600_000
    case UInt8(ascii: "M"): return number * 60_000
    case UInt8(ascii: "S"): return number * 1_000
    case UInt8(ascii: "m"): return number
    case UInt8(ascii: "u"): return (number + 999) / 1_000
    case UInt8(ascii: "n"): return (number + 999_999) / 1_000_000
    default: return nil
    }
  }

  /// Formats milliseconds as a `grpc-timeout` value, in `m` while it fits in 8 digits.
  public static func formatTimeout(milliseconds: Int64) -> String {
    if milliseconds <= 99_999_999 { return "\(milliseconds)m" }
    let seconds = (milliseconds + 999) / 1000
    if seconds <= 99_999_999 { return "\(seconds)S" }
    let minutes = (seconds + 59) / 60
    if minutes <= 99_999_999 { return "\(minutes)M" }
    return "\(min((minutes + 59) / 60, 99_999_999))H"
  }

  /// Percent-encodes a `grpc-message`: `%` and bytes outside 0x20...0x7E.
  public static func percentEncode<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
    let hex = Array("0123456789ABCDEF".utf8)
    var out: [UInt8] = []
    out.reserveCapacity(bytes.count)
    for b in bytes {
      if b >= 0x20, b <= 0x7E, b != UInt8(ascii: "%") {
        out.append(b)
      } else {
        out.append(UInt8(ascii: "%"))
        out.append(hex[Int(b >> 4)])
        out.append(hex[Int(b & 0x0F)])
      }
    }
    return String(decoding: out, as: UTF8.self)
  }

  public static func percentEncode(_ message: String) -> String {
    self.percentEncode(message.utf8)
  }
}
