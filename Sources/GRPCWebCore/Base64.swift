import NIOCore

/// Why a `grpc-web-text` body could not be decoded. The two cases are Envoy's two local-reply
/// details, so logs read the same as Envoy's.
public enum Base64DecodeError: Error, Sendable, Hashable {
  /// The body ended with a group of fewer than four characters.
  case badSize
  /// A character outside the standard alphabet, padding in the middle of a group, or
  /// non-zero unused bits in the last character of a padded group.
  case invalidCharacter

  public var detail: String {
    switch self {
    case .badSize: return "grpc_base_64_decode_failed_bad_size"
    case .invalidCharacter: return "grpc_base_64_decode_failed"
    }
  }
}

/// Decodes a `grpc-web-text` request body as it streams in.
///
/// The body arrives in arbitrary chunks, so up to three characters of an unfinished 4-character
/// group are carried to the next chunk. Each group is decoded on its own and may end in padding:
/// a body made of separately padded segments (`AAA=BBBB`) is accepted however it is split into
/// chunks. Envoy accepts that only when a chunk boundary happens to fall after the padding; the
/// grpc-web spec allows such bodies, so rejecting them depending on TCP segmentation is a trap we
/// do not copy. Everything else is as strict as Envoy: the standard alphabet only (no URL-safe
/// characters, no whitespace), canonical unused bits, and a whole number of groups at the end.
public struct Base64StreamDecoder: Sendable {
  private var carry: (UInt8, UInt8, UInt8) = (0, 0, 0)
  private var carried = 0

  public init() {}

  /// Decodes as many whole groups as `input` completes, appending the bytes to `output`.
  public mutating func decode(_ input: ByteBuffer, into output: inout ByteBuffer) throws(Base64DecodeError) {
    output.reserveCapacity(minimumWritableBytes: (input.readableBytes + self.carried) / 4 * 3)
    var group: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
    var filled = self.carried
    group.0 = self.carry.0
    group.1 = self.carry.1
    group.2 = self.carry.2
    let result: Base64DecodeError? = input.withUnsafeReadableBytes { bytes -> Base64DecodeError? in
      for byte in bytes {
        switch filled {
        case 0: group.0 = byte
        case 1: group.1 = byte
        case 2: group.2 = byte
        default: group.3 = byte
        }
        filled += 1
        if filled == 4 {
          if let error = Self.decodeGroup(group, into: &output) { return error }
          filled = 0
        }
      }
      return nil
    }
    if let result { throw result }
    self.carried = filled
    self.carry = (group.0, group.1, group.2)
  }

  /// Ends the body: an unfinished group is an error, as in Envoy.
  public func finish() throws(Base64DecodeError) {
    if self.carried != 0 { throw .badSize }
  }

  private static let invalid: UInt8 = 0xFF
  private static let pad: UInt8 = 0xFE

  private static let table: [UInt8] = {
    var t = [UInt8](repeating: invalid, count: 256)
    let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    for (i, c) in alphabet.enumerated() { t[Int(c)] = UInt8(i) }
    t[Int(UInt8(ascii: "="))] = pad
    return t
  }()

  @inline(__always)
  private static func decodeGroup(_ g: (UInt8, UInt8, UInt8, UInt8), into output: inout ByteBuffer) -> Base64DecodeError? {
    let a = table[Int(g.0)]
    let b = table[Int(g.1)]
    let c = table[Int(g.2)]
    let d = table[Int(g.3)]
    guard a < 64, b < 64 else { return .invalidCharacter }
    if d < 64 {
      guard c < 64 else { return .invalidCharacter }
      let v = UInt32(a) << 18 | UInt32(b) << 12 | UInt32(c) << 6 | UInt32(d)
      output.writeMultipleIntegers(UInt8(truncatingIfNeeded: v >> 16), UInt8(truncatingIfNeeded: v >> 8), UInt8(truncatingIfNeeded: v))
      return nil
    }
    guard d == pad else { return .invalidCharacter }
    if c < 64 {
      // "xyz=": two bytes; the last character's low two bits must be zero.
      guard c & 0x03 == 0 else { return .invalidCharacter }
      let v = UInt32(a) << 18 | UInt32(b) << 12 | UInt32(c) << 6
      output.writeMultipleIntegers(UInt8(truncatingIfNeeded: v >> 16), UInt8(truncatingIfNeeded: v >> 8))
      return nil
    }
    // "xy==": one byte; the second character's low four bits must be zero.
    guard c == pad, b & 0x0F == 0 else { return .invalidCharacter }
    output.writeInteger(UInt8(truncatingIfNeeded: (UInt32(a) << 2) | (UInt32(b) >> 4)))
    return nil
  }
}

public enum Base64 {
  private static let alphabet: [UInt8] = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

  /// Appends `input` to `output` as one padded base64 segment.
  public static func encode(_ input: ByteBuffer, into output: inout ByteBuffer) {
    let count = input.readableBytes
    output.reserveCapacity(minimumWritableBytes: (count + 2) / 3 * 4)
    input.withUnsafeReadableBytes { bytes in
      _ = output.writeWithUnsafeMutableBytes(minimumWritableBytes: (count + 2) / 3 * 4) { out in
        var o = 0
        var i = 0
        while i + 3 <= count {
          let v = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
          out[o] = alphabet[Int(v >> 18 & 0x3F)]
          out[o + 1] = alphabet[Int(v >> 12 & 0x3F)]
          out[o + 2] = alphabet[Int(v >> 6 & 0x3F)]
          out[o + 3] = alphabet[Int(v & 0x3F)]
          i += 3
          o += 4
        }
        let rest = count - i
        if rest == 1 {
          let v = UInt32(bytes[i]) << 16
          out[o] = alphabet[Int(v >> 18 & 0x3F)]
          out[o + 1] = alphabet[Int(v >> 12 & 0x3F)]
          out[o + 2] = UInt8(ascii: "=")
          out[o + 3] = UInt8(ascii: "=")
          o += 4
        } else if rest == 2 {
          let v = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8
          out[o] = alphabet[Int(v >> 18 & 0x3F)]
          out[o + 1] = alphabet[Int(v >> 12 & 0x3F)]
          out[o + 2] = alphabet[Int(v >> 6 & 0x3F)]
          out[o + 3] = UInt8(ascii: "=")
          o += 4
        }
        return o
      }
    }
  }

  public static func encode(_ input: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
    var out = allocator.buffer(capacity: (input.readableBytes + 2) / 3 * 4)
    self.encode(input, into: &out)
    return out
  }
}
