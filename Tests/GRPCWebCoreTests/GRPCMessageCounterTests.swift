import GRPCWebCore
import NIOCore
import Testing

@Suite struct GRPCMessageCounterTests {
  private func frame(_ payload: Int, flag: UInt8 = 0) -> [UInt8] {
    let n = UInt32(payload)
    return [flag, UInt8(n >> 24), UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)]
      + [UInt8](repeating: 0x2A, count: payload)
  }

  @Test func countsMessagesInEveryChunking() {
    // Sizes chosen so that headers and payloads straddle chunk edges, with an empty message.
    let stream = [3, 0, 300, 1, 70_000].flatMap { self.frame($0) }
    for chunk in [1, 2, 4, 5, 6, 7, 64, 1000, stream.count] {
      var counter = GRPCMessageCounter()
      var deltas: UInt64 = 0
      var i = 0
      while i < stream.count {
        let n = min(chunk, stream.count - i)
        deltas += counter.inspect(ByteBuffer(bytes: stream[i..<(i + n)]))
        i += n
      }
      #expect(counter.count == 5, "chunk \(chunk)")
      #expect(deltas == 5)
    }
  }

  @Test func countsAMessageWhenItsFirstByteArrives() {
    var counter = GRPCMessageCounter()
    let bytes = self.frame(10) + self.frame(10)
    #expect(counter.inspect(ByteBuffer(bytes: bytes[0..<1])) == 1)
    #expect(counter.inspect(ByteBuffer(bytes: bytes[1..<15])) == 0)
    #expect(counter.inspect(ByteBuffer(bytes: bytes[15..<16])) == 1)
    #expect(counter.inspect(ByteBuffer(bytes: bytes[16...])) == 0)
  }

  @Test func readsTheSliceItIsGivenOnly() {
    var buffer = ByteBuffer(bytes: [9, 9, 9] + self.frame(2))
    buffer.moveReaderIndex(forwardBy: 3)
    var counter = GRPCMessageCounter()
    #expect(counter.inspect(buffer) == 1)
    #expect(counter.inspect(ByteBuffer(bytes: self.frame(0))) == 1)
  }
}
