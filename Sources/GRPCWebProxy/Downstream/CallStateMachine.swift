import GRPCWebCore
import NIOCore
import NIOHPACK
import NIOHTTP2
import ProxyConfig
import ProxyFilters

/// The lifecycle of one call through the proxy, without its channels, its cluster or a clock:
/// what goes upstream and when, which attempt holds a slot on the cluster, when the call is
/// tried again or replayed elsewhere, when the client must stop being read, and what is let go
/// once the call ends. `ProxyCall` routes the request, feeds this machine the events of both
/// sides and performs the actions it returns; the tests drive it with plain values.
///
///     awaitingHead ─routed─▶ live(request, upstream) ─response ends / call fails─▶ finished
///          └──────────── answered by the proxy (no route, CORS preflight, limits) ────┘
///
/// While live, the request side is `forwarding` (the client's body flows) or `ended` (its
/// END_STREAM is written or queued upstream), and the upstream side is:
///
///     opening(pending) ─stream─▶ open(attempt) ─stream closed─▶ closed(attempt)
///        ▲  ▲  └─connect failure─┐   │ retriable answer, per-try timeout │
///        │  └── backingOff ◀─────┴───┴──── retriable reset ──────────────┘
///        └──────────── unprocessed by the server (GOAWAY, REFUSED_STREAM): replay now
///
/// The response side is the `ResponseTranslator`, a sub-machine of its own.
///
/// Not generic over the stream type: as a generic, its actions were destroyed through value
/// witnesses on every DATA frame (measured with `scripts/count-per-call stream`).
struct CallStateMachine {
  typealias Stream = UpstreamStream
  typealias Frame = HTTP2Frame.FramePayload
  typealias Output = ResponseTranslator.Output

  /// A request up to this size is kept, shared not copied, until its response starts, so that
  /// it can be sent again (retries, and calls the server never processed).
  static var replayableBytes: Int { 64 * 1024 }
  /// How often a call the server never processed is sent again before it fails.
  static var maxReplays: Int { 3 }

  private enum State {
    case awaitingHead
    case live(Live)
    case finished
  }

  private enum RequestSide {
    /// Taking the client's body; a text call's decoder carries partial base64 quads.
    case forwarding(decoder: Base64StreamDecoder?)
    /// END_STREAM is written, or queued, upstream.
    case ended
  }

  private enum UpstreamSide {
    /// A stream has been asked for; the request so far waits here.
    case opening(pending: [Frame])
    /// Waiting out a retry's back-off; the request so far waits here.
    case backingOff(pending: [Frame])
    case open(Attempt)
    /// The stream is gone (reset, refused, connection lost); the attempt keeps its slot on the
    /// cluster until the call ends or is tried again.
    case closed(Attempt)
  }

  private struct Attempt {
    let stream: Stream
    /// The backend sent END_STREAM: with the request also ended, the stream is closed and must
    /// not be reset (servers count resets of finished streams as an attack and drop the
    /// connection).
    var responseEnded = false
  }

  /// A class: the events of a call in flight (each DATA frame of a stream) change it in place;
  /// as an enum payload it was copied out and back on every event (measured: 23 % more
  /// instructions per streamed message, `scripts/count-per-call stream`).
  private final class Live {
    var request: RequestSide
    var upstream: UpstreamSide
    /// The request frames sent so far, kept until the response starts; nil once it has started
    /// or the request grew past `replayableBytes`.
    var replay: [Frame]? = []
    var replayBytes = 0
    let retryPolicy: Route.RetryPolicy?
    var retriesLeft: Int
    var attempts = 1
    var replays = 0
    /// Holds one of the cluster's `max_retries` until the call ends.
    var holdsRetry = false
    /// What the endpoint answered, as an HTTP status, for outlier detection.
    var outcome: Int?
    /// Request body bytes handed upstream (or held for a stream) and not yet sent: above
    /// `bufferLimit` the client is not read until half of it has gone.
    var unsent = 0
    var readingPaused = false
    let bufferLimit: Int

    init(request: RequestSide, upstream: UpstreamSide, retryPolicy: Route.RetryPolicy?, bufferLimit: Int) {
      self.request = request
      self.upstream = upstream
      self.retryPolicy = retryPolicy
      self.retriesLeft = retryPolicy?.numRetries ?? 0
      self.bufferLimit = bufferLimit
    }
  }

  private var state: State = .awaitingHead
  /// The response side.
  private(set) var translator: ResponseTranslator

  init(translator: ResponseTranslator) {
    self.translator = translator
  }

  var isFinished: Bool { self.translator.isFinished }

  var isAwaitingHead: Bool {
    if case .awaitingHead = self.state { return true }
    return false
  }

  /// The open upstream stream, to hold its window while the client is not reading.
  var openStream: Stream? {
    if case .live(let live) = self.state, case .open(let attempt) = live.upstream { return attempt.stream }
    return nil
  }

  // MARK: - Actions

  enum StreamClose {
    /// Forget a stream that ended on both sides.
    case release
    /// RST_STREAM(CANCEL): the stream is still open on one side.
    case cancel
  }

  /// The end of one attempt: its slot goes back to the cluster with what the endpoint answered
  /// (nil when that says nothing of the endpoint), and its stream, if still open, is let go.
  struct AttemptEnd {
    var stream: Stream
    var close: StreamClose?
    var outcome: Int?
  }

  /// What a call that ended gives back.
  struct Cleanup {
    var attempt: AttemptEnd?
    /// The client was not being read: read it again (the rest is read and dropped).
    var resumeReading = false
    /// Give back the cluster's retry slot.
    var endRetry = false
  }

  /// The last of the response, and what the call gives back.
  struct Finish {
    var output: Output
    var cleanup: Cleanup
  }

  /// Another attempt, after a jittered back-off below `backoffCeilingMilliseconds` (Envoy's:
  /// 25 ms doubling, at most 250 ms); call `backoffElapsed` when it is over.
  struct Retry {
    var previous: AttemptEnd?
    var attempt: Int
    var backoffCeilingMilliseconds: Int
  }

  enum BodyAction {
    /// Not taken: the call is over (or the request had ended).
    case drop
    /// Taken, nothing to send yet (a text body's partial base64 quad).
    case held
    /// Write `frame` to `stream`, or nothing more when it waits for a stream (`stream` nil);
    /// `payload` is the body as it goes upstream (decoded from base64 for text calls).
    case forward(frame: Frame, payload: ByteBuffer, stream: Stream?, pauseReading: Bool)
    case finish(Finish)
  }

  enum UpstreamAction {
    case none
    case write(Output)
    case finish(Finish)
    case retry(Retry)
    /// The server never processed the call: let go of the attempt and open a stream now.
    case replay(AttemptEnd)
  }

  enum OpenedAction {
    /// The call ended while its stream was being opened: release it, the slot with no outcome.
    case discard(Stream)
    /// Write the request so far.
    case write([Frame], to: Stream)
  }

  // MARK: - Downstream events

  /// The proxy answers by itself before anything went upstream (no route, a CORS preflight, a
  /// direct response, headers over the limits).
  mutating func answerLocally(_ output: Output) -> Finish {
    self.translator.markFinished()
    self.state = .finished
    return Finish(output: output, cleanup: Cleanup())
  }

  /// As `answerLocally(_:)`, with the reply the translator makes for the call's protocol.
  mutating func answerLocally(httpStatus: Int, grpcStatus: GRPCStatus?, message: String?) -> Finish {
    let output = self.translator.localReply(httpStatus: httpStatus, grpcStatus: grpcStatus, message: message)
    self.state = .finished
    return Finish(output: output, cleanup: Cleanup())
  }

  /// The call is routed: `headers` go upstream once a stream opens (ask the cluster for one).
  mutating func routed(
    headers: HPACKHeaders, endStream: Bool, textRequest: Bool, retryPolicy: Route.RetryPolicy?, bufferLimit: Int
  ) {
    guard case .awaitingHead = self.state else { return }
    self.state = .live(
      Live(
        request: endStream ? .ended : .forwarding(decoder: textRequest ? Base64StreamDecoder() : nil),
        upstream: .opening(pending: [.headers(.init(headers: headers, endStream: endStream))]),
        retryPolicy: retryPolicy,
        bufferLimit: bufferLimit
      ))
  }

  /// A piece of the request body; `endStream` on the last. The last piece goes upstream as one
  /// DATA frame with END_STREAM, not data and then an empty frame: a server that answers as
  /// soon as it has the message (grpc-go) resets a stream whose request has not ended.
  mutating func receiveBody(_ buffer: ByteBuffer, endStream: Bool, allocator: ByteBufferAllocator) -> BodyAction {
    guard case .live(let live) = self.state, case .forwarding(let decoder) = live.request else { return .drop }
    var payload = buffer
    if var text = decoder {
      var decoded = allocator.buffer(capacity: buffer.readableBytes / 4 * 3 + 3)
      do {
        try text.decode(buffer, into: &decoded)
        if endStream { try text.finish() }
      } catch {
        return .finish(self.fail(live, .invalidRequestBody))
      }
      live.request = .forwarding(decoder: text)
      guard decoded.readableBytes > 0 || endStream else { return .held }
      payload = decoded
    }
    if endStream { live.request = .ended }
    let frame = Frame.data(.init(data: .byteBuffer(payload), endStream: endStream))
    let (stream, pause) = Self.send(frame, live)
    return .forward(frame: frame, payload: payload, stream: stream, pauseReading: pause)
  }

  /// The client ended its request: with trailers (HTTP/2), or not. Text calls must end on a
  /// whole base64 quad: leftover characters fail the call rather than being dropped.
  mutating func receiveEnd(trailers: HPACKHeaders?, allocator: ByteBufferAllocator) -> BodyAction {
    guard case .live(let live) = self.state, case .forwarding(let decoder) = live.request else { return .drop }
    if let decoder {
      do {
        try decoder.finish()
      } catch {
        return .finish(self.fail(live, .invalidRequestBody))
      }
    }
    live.request = .ended
    let frame: Frame
    let payload: ByteBuffer
    if let trailers, !trailers.isEmpty {
      frame = .headers(.init(headers: trailers, endStream: true))
      payload = ByteBuffer()
    } else {
      payload = allocator.buffer(capacity: 0)
      frame = .data(.init(data: .byteBuffer(payload), endStream: true))
    }
    let (stream, pause) = Self.send(frame, live)
    return .forward(frame: frame, payload: payload, stream: stream, pauseReading: pause)
  }

  /// The client went away (connection closed or stream reset). Nil when nothing is held.
  mutating func downstreamClosed() -> Cleanup? {
    self.translator.markFinished()
    guard case .live(let live) = self.state else {
      self.state = .finished
      return nil
    }
    self.state = .finished
    return Self.cleanup(live)
  }

  /// The call fails on the proxy's side (a deadline, an idle stream, shutdown): the client
  /// reads a status, in a trailer frame once its response has started. Nil if already over.
  mutating func fail(_ failure: CallFailure) -> Finish? {
    switch self.state {
    case .finished:
      return nil
    case .awaitingHead:
      return self.answerLocally(self.translator.fail(failure))
    case .live(let live):
      return self.fail(live, failure)
    }
  }

  // MARK: - Upstream events

  /// The cluster gave the call a stream.
  mutating func upstreamOpened(_ stream: Stream) -> OpenedAction {
    guard case .live(let live) = self.state, case .opening(let pending) = live.upstream else { return .discard(stream) }
    live.upstream = .open(Attempt(stream: stream))
    // What this attempt has yet to send is what it writes now (a retry sends it again).
    live.unsent = 0
    for frame in pending {
      if case .data(let data) = frame { live.unsent += data.data.readableBytes }
      Self.remember(frame, live)
    }
    return .write(pending, to: stream)
  }

  /// The cluster could not give the call a stream. `connectFailure`: an endpoint was tried
  /// (not "no healthy upstream"), so `retry_policy` may try again.
  mutating func upstreamFailed(_ failure: CallFailure, connectFailure: Bool, beginRetry: () -> Bool) -> UpstreamAction {
    guard case .live(let live) = self.state, case .opening(let pending) = live.upstream else { return .none }
    if connectFailure, live.retryPolicy?.retriesConnectFailures == true {
      // Nothing was sent: all of the request so far is pending.
      live.replay = pending
      if let retry = self.retry(live, outcome: nil, beginRetry: beginRetry) {
        return .retry(retry)
      }
    }
    return .finish(self.fail(live, failure))
  }

  /// A retry's back-off is over: true to ask the cluster for a stream.
  mutating func backoffElapsed() -> Bool {
    guard case .live(let live) = self.state, case .backingOff(let pending) = live.upstream else { return false }
    live.upstream = .opening(pending: pending)
    return true
  }

  mutating func upstreamHeaders(_ headers: HPACKHeaders, endStream: Bool, beginRetry: () -> Bool) -> UpstreamAction {
    guard case .live(let live) = self.state else { return .none }
    if live.replay != nil, let policy = live.retryPolicy, live.retriesLeft > 0,
      let outcome = policy.retriable(headers, endStream: endStream)
    {
      if endStream { Self.responseEnded(live) }
      if let retry = self.retry(live, outcome: outcome, beginRetry: beginRetry) {
        return .retry(retry)
      }
    }
    live.replay = nil
    if endStream {
      Self.responseEnded(live)
      live.outcome = UpstreamOutcome.httpStatus(headers)
    } else if let status = headers.first(name: ":status"), status != "200" {
      live.outcome = Int(status)
    }
    return self.respond(self.translator.receiveHeaders(headers, endStream: endStream), live)
  }

  /// Every DATA frame of a response: inlined, so that the action is not built and taken apart.
  @inline(__always)
  mutating func upstreamData(_ data: ByteBuffer, endStream: Bool) -> UpstreamAction {
    guard case .live(let live) = self.state else { return .none }
    if live.replay != nil { live.replay = nil }
    if endStream { Self.responseEnded(live) }
    return self.respond(self.translator.receiveData(data, endStream: endStream), live)
  }

  /// `bytes` of request body have left for the backend: true to read the client again.
  mutating func upstreamDataSent(_ bytes: Int) -> Bool {
    guard case .live(let live) = self.state else { return false }
    live.unsent = max(0, live.unsent - bytes)
    var resume = false
    if live.readingPaused && live.unsent <= live.bufferLimit / 2 {
      live.readingPaused = false
      resume = true
    }
    return resume
  }

  /// The backend cannot take this request's headers: a local 431 (`message` says why); its
  /// connection is untouched.
  mutating func upstreamRefusedHeaders(_ message: String) -> Finish? {
    guard case .live(let live) = self.state else { return nil }
    self.state = .finished
    if case .open(let attempt) = live.upstream { live.upstream = .closed(attempt) }
    live.replay = nil
    let output = self.translator.localReply(httpStatus: 431, grpcStatus: .resourceExhausted, message: message)
    return Finish(output: output, cleanup: Self.cleanup(live))
  }

  /// The upstream stream closed before the response ended: reset, refused, or its connection
  /// lost. `unprocessed`: the server said it never processed the stream.
  mutating func upstreamClosed(reason: String, unprocessed: Bool, beginRetry: () -> Bool) -> UpstreamAction {
    guard case .live(let live) = self.state, case .open(let attempt) = live.upstream else { return .none }
    live.upstream = .closed(attempt)
    if !unprocessed, live.replay != nil, live.retryPolicy?.retriesResets == true,
      let retry = self.retry(live, outcome: 503, beginRetry: beginRetry)
    {
      return .retry(retry)
    }
    if unprocessed, let frames = live.replay, live.replays < Self.maxReplays, live.holdsRetry || beginRetry() {
      // The server never saw this call: send it again, to whichever endpoint is next.
      live.holdsRetry = true
      live.replays += 1
      live.replay = []
      live.replayBytes = 0
      live.upstream = .opening(pending: frames)
      return .replay(AttemptEnd(stream: attempt.stream, close: nil, outcome: nil))
    }
    if !attempt.responseEnded { live.outcome = 503 }
    return .finish(self.fail(live, .upstreamReset(reason: reason)))
  }

  /// The attempt's `per_try_timeout` passed before its response started.
  mutating func perTryTimedOut(beginRetry: () -> Bool) -> UpstreamAction {
    guard case .live(let live) = self.state, live.replay != nil else { return .none }
    if let retry = self.retry(live, outcome: 504, beginRetry: beginRetry) {
      return .retry(retry)
    }
    return .finish(self.fail(live, .timeout(message: "upstream request timeout", httpStatus: 504)))
  }

  // MARK: - Helpers

  /// Sends a request frame: to the open stream, held for one to open, or dropped once the
  /// stream is gone. Returns where to write it, and whether to stop reading the client.
  private static func send(_ frame: Frame, _ live: Live) -> (Stream?, pause: Bool) {
    var pause = false
    if case .data(let data) = frame {
      switch live.upstream {
      case .opening, .backingOff, .open:
        live.unsent += data.data.readableBytes
        if !live.readingPaused && live.unsent > live.bufferLimit {
          live.readingPaused = true
          pause = true
        }
      case .closed:
        break
      }
    }
    switch live.upstream {
    case .opening(var pending):
      live.upstream = .opening(pending: [])  // so that appending does not copy the array
      pending.append(frame)
      live.upstream = .opening(pending: pending)
      return (nil, pause)
    case .backingOff(var pending):
      live.upstream = .backingOff(pending: [])
      pending.append(frame)
      live.upstream = .backingOff(pending: pending)
      return (nil, pause)
    case .open(let attempt):
      Self.remember(frame, live)
      return (attempt.stream, pause)
    case .closed:
      return (nil, pause)
    }
  }

  private static func remember(_ frame: Frame, _ live: Live) {
    guard live.replay != nil else { return }
    if case .data(let data) = frame { live.replayBytes += data.data.readableBytes }
    if live.replayBytes > Self.replayableBytes {
      live.replay = nil
    } else {
      live.replay!.append(frame)
    }
  }

  private static func responseEnded(_ live: Live) {
    if case .open(var attempt) = live.upstream {
      attempt.responseEnded = true
      live.upstream = .open(attempt)
    }
  }

  /// Writes the translator's output; its end ends the call.
  @inline(__always)
  private mutating func respond(_ output: Output, _ live: Live) -> UpstreamAction {
    guard output.end != nil else { return .write(output) }
    self.state = .finished
    return .finish(Finish(output: output, cleanup: Self.cleanup(live)))
  }

  /// Ends the call with `failure`'s status.
  private mutating func fail(_ live: Live, _ failure: CallFailure) -> Finish {
    self.state = .finished
    return Finish(output: self.translator.fail(failure), cleanup: Self.cleanup(live))
  }

  /// Lets go of this attempt and schedules another, if the policy has retries left, the
  /// request is still held, the response has not started and the cluster's `max_retries`
  /// allows (`beginRetry`, asked once per call). The client sees only the last attempt.
  private mutating func retry(_ live: Live, outcome: Int?, beginRetry: () -> Bool) -> Retry? {
    guard live.retriesLeft > 0, let frames = live.replay, !self.translator.isFinished,
      live.holdsRetry || beginRetry()
    else { return nil }
    live.holdsRetry = true
    live.retriesLeft -= 1
    live.attempts += 1
    var previous: AttemptEnd?
    switch live.upstream {
    case .open(let attempt):
      previous = AttemptEnd(stream: attempt.stream, close: Self.close(attempt, live), outcome: outcome)
    case .closed(let attempt):
      previous = AttemptEnd(stream: attempt.stream, close: nil, outcome: outcome)
    case .opening, .backingOff:
      previous = nil
    }
    live.outcome = nil
    live.replay = []
    live.replayBytes = 0
    live.upstream = .backingOff(pending: frames)
    return Retry(previous: previous, attempt: live.attempts, backoffCeilingMilliseconds: min(25 << min(live.attempts - 2, 4), 250))
  }

  private static func close(_ attempt: Attempt, _ live: Live) -> StreamClose {
    if attempt.responseEnded, case .ended = live.request { return .release }
    return .cancel
  }

  private static func cleanup(_ live: Live) -> Cleanup {
    var cleanup = Cleanup(resumeReading: live.readingPaused, endRetry: live.holdsRetry)
    switch live.upstream {
    case .open(let attempt):
      cleanup.attempt = AttemptEnd(stream: attempt.stream, close: Self.close(attempt, live), outcome: live.outcome)
    case .closed(let attempt):
      cleanup.attempt = AttemptEnd(stream: attempt.stream, close: nil, outcome: live.outcome)
    case .opening, .backingOff:
      break
    }
    return cleanup
  }
}
