/// Flow control and write batching shared by the three handlers that carry calls: the HTTP/1.1
/// and HTTP/2 downstream handlers and the upstream connection. Pure values: the handlers write
/// the frames and schedule the flushes these decide.

/// The receive window one HTTP/2 stream gives back to its sender, the same rule on both sides
/// of the proxy:
/// - window goes back as the call passes the data on, in updates of at least half the window
///   rather than one per frame;
/// - not while the call's other side is not taking the data (`setPaused(true)`): the sender
///   then stops once the window is spent, which is the backpressure from a slow reader to a
///   fast writer, and memory stays bounded by the window;
/// - not after the sender ended the stream: nothing more will come.
struct StreamReceiveWindow {
  let size: Int
  /// Bytes received and passed on, not yet given back.
  private(set) var owed = 0
  private(set) var isPaused = false
  /// The sender ended its side of the stream.
  private(set) var senderEnded = false

  init(size: Int) {
    self.size = size
  }

  /// `bytes` of the stream's DATA (padding included) were passed on. Returns the increment of
  /// the WINDOW_UPDATE to send now, if any.
  @inline(__always)
  mutating func received(_ bytes: Int, endStream: Bool) -> Int? {
    if endStream {
      self.senderEnded = true
      return nil
    }
    self.owed += bytes
    return self.take(atLeast: self.size / 2)
  }

  /// The sender ended the stream (HEADERS with END_STREAM): no window is given back any more.
  mutating func senderEnd() {
    self.senderEnded = true
  }

  /// Holds the window back, or gives back at once all that is owed when the other side reads again.
  mutating func setPaused(_ paused: Bool) -> Int? {
    self.isPaused = paused
    return paused ? nil : self.take(atLeast: 1)
  }

  private mutating func take(atLeast threshold: Int) -> Int? {
    guard !self.isPaused, !self.senderEnded, self.owed >= max(threshold, 1) else { return nil }
    defer { self.owed = 0 }
    return self.owed
  }
}

/// A connection's receive window, with swift-nio-http2 as the codec (nghttp2 keeps its own):
/// topped up to its size once half is spent, from its size and not from what calls consumed,
/// since DATA for a stream already reset never reaches a call and counting consumption would
/// leak that window until the peer could send nothing at all.
enum ConnectionReceiveWindow {
  /// HTTP/2 starts every connection's window at 65,535 bytes, whatever the settings say.
  static let initial = 65_535

  /// The WINDOW_UPDATE increment that brings a window of `inbound` bytes back to `size`, if it
  /// is at or below half.
  static func topUp(size: Int, inbound: Int) -> Int? {
    guard inbound <= size / 2, size - inbound > 0 else { return nil }
    return size - inbound
  }
}

/// One flush per event-loop tick, however many writes asked for one: a response's head,
/// messages and end, or many calls' frames on one connection, go out in one syscall.
struct FlushCoalescer {
  private(set) var isScheduled = false

  /// Asks for a flush before the loop next waits for I/O. True when the caller must schedule
  /// it (the first ask since the last flush); false when one is scheduled already.
  mutating func request() -> Bool {
    guard !self.isScheduled else { return false }
    self.isScheduled = true
    return true
  }

  /// The scheduled flush is running: the next ask schedules another.
  mutating func flushing() {
    self.isScheduled = false
  }
}
