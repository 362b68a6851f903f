import NIOCore
import NIOHPACK

/// Splits a stream of gRPC length-prefixed frames (1 flag byte, 4-byte big-endian length,
/// payload) into whole frames, whatever the chunking. Used for text-mode responses, where each
/// frame is base64-encoded on its own.
///
/// A partial frame is held until it completes, but only up to `maxFrameSize` (Envoy holds it
/// without a bound, so one huge message can take all of its memory).
public struct GRPCFrameSplitter: Sendable {
  public struct FrameTooLarge: Error, Sendable, Hashable {
    public var length: Int
    public var limit: Int
  }

  private var pending: ByteBuffer?
  public let maxFrameSize: Int

  public init(maxFrameSize: Int) {
    self.maxFrameSize = maxFrameSize
  }

  /// Whether bytes of an unfinished frame are held.
  public var hasPartialFrame: Bool { (self.pending?.readableBytes ?? 0) > 0 }

  public mutating func append(_ data: ByteBuffer) {
    if var pending = self.pending, pending.readableBytes > 0 {
      self.pending = nil  // keep the buffer uniquely referenced while writing
      pending.writeImmutableBuffer(data)
      self.pending = pending
    } else {
      self.pending = data
    }
  }

  /// The next whole frame (header and payload), sliced from the input without a copy when
  /// it arrived in one chunk.
  public mutating func next() throws(FrameTooLarge) -> ByteBuffer? {
    guard var pending = self.pending, pending.readableBytes >= 5 else { return nil }
    let length = Int(pending.getInteger(at: pending.readerIndex + 1, as: UInt32.self)!)
    if length > self.maxFrameSize { throw FrameTooLarge(length: length, limit: self.maxFrameSize) }
    guard pending.readableBytes >= 5 + length else { return nil }
    let frame = pending.readSlice(length: 5 + length)!
    self.pending = pending.readableBytes == 0 ? nil : pending
    return frame
  }
}

/// The gRPC-Web trailer frame: flag 0x80, a 4-byte length, then `key:value\r\n` per trailer, in
/// order, with no space after the colon (byte for byte what Envoy writes).
public enum TrailerFrame {
  public static func encode(_ trailers: HPACKHeaders, allocator: ByteBufferAllocator) -> ByteBuffer {
    var buffer = allocator.buffer(capacity: 64)
    self.encode(trailers.lazy.map { ($0.name, $0.value) }, into: &buffer)
    return buffer
  }

  public static func encode<S: Sequence>(_ trailers: S, into buffer: inout ByteBuffer) where S.Element == (String, String) {
    buffer.writeInteger(UInt8(0x80))
    let lengthIndex = buffer.writerIndex
    buffer.writeInteger(UInt32(0))
    var length = 0
    for (name, value) in trailers {
      length += buffer.writeString(name)
      length += buffer.writeStaticString(":")
      length += buffer.writeString(value)
      length += buffer.writeStaticString("\r\n")
    }
    buffer.setInteger(UInt32(length), at: lengthIndex)
  }
}

/// One gRPC frame around a payload, for tests and local messages.
public enum GRPCFrame {
  public static func encode(_ payload: ByteBuffer, compressed: Bool = false, into buffer: inout ByteBuffer) {
    buffer.writeInteger(UInt8(compressed ? 1 : 0))
    buffer.writeInteger(UInt32(payload.readableBytes))
    buffer.writeImmutableBuffer(payload)
  }
}

/// Counts gRPC length-prefixed messages in a byte stream, whatever its chunking, without
/// holding or copying any of it: the `grpc_stats` filter's request and response message
/// counts. A message counts as soon as its flag byte arrives, as Envoy's frame inspector does.
public struct GRPCMessageCounter: Sendable {
  /// Header bytes still to come of the current frame (0: payload or next flag), and payload
  /// bytes left to skip.
  private var headerLeft = 0
  private var length: UInt32 = 0
  private var payloadLeft: UInt64 = 0
  public private(set) var count: UInt64 = 0

  public init() {}

  /// Reads `data`; returns how many messages began in it.
  public mutating func inspect(_ data: ByteBuffer) -> UInt64 {
    let before = self.count
    var index = data.readerIndex
    let end = data.writerIndex
    while index < end {
      if self.payloadLeft > 0 {
        let skip = Int(min(self.payloadLeft, UInt64(end - index)))
        self.payloadLeft -= UInt64(skip)
        index += skip
      } else if self.headerLeft > 0 {
        // Length bytes, big-endian.
        self.length = self.length << 8 | UInt32(data.getInteger(at: index, as: UInt8.self)!)
        self.headerLeft -= 1
        index += 1
        if self.headerLeft == 0 { self.payloadLeft = UInt64(self.length) }
      } else {
        // A flag byte: a new message.
        self.count += 1
        self.length = 0
        self.headerLeft = 4
        index += 1
      }
    }
    return self.count - before
  }
}
