import CNGHTTP2
import NIOCore
import NIOHPACK
import NIOHTTP2

/// An HTTP/2 codec driven by nghttp2 instead of NIOHTTP2: the client side of upstream
/// connections, and (where chosen) the server side of clients' connections.
///
/// It sits where `NIOHTTP2Handler` would (bytes below, `HTTP2Frame`s above) and speaks the same
/// frames and events to the handler above it (`UpstreamFrameHandler`,
/// `HTTP2ProxyConnectionHandler`), so their logic stays whichever codec runs. What nghttp2 brings:
/// - received DATA is handed up as slices of the buffer the socket read into: no byte is copied
///   on the way in (NIOHTTP2 copies every received byte once into its own buffer);
/// - DATA goes out from the call's own buffers (`NGHTTP2_DATA_FLAG_NO_COPY`);
/// - header blocks larger than one frame go out with CONTINUATION frames, which NIOHTTP2 cannot
///   send.
///
/// Flow control: the connection window is returned as data arrives, since the calls' own
/// backpressure is per stream; a stream's window is returned only when the handler above writes
/// a WINDOW_UPDATE for it, which it holds back while the call's other side is not reading.
final class NGHTTP2Handler: ChannelDuplexHandler {
  typealias InboundIn = ByteBuffer
  typealias InboundOut = HTTP2Frame
  typealias OutboundIn = HTTP2Frame
  typealias OutboundOut = ByteBuffer

  struct ProtocolError: Error, CustomStringConvertible {
    let code: Int32
    var description: String { "HTTP/2 error from the backend's connection: " + String(cString: nghttp2_strerror(self.code)) }
  }

  struct StreamGone: Error {}

  enum Mode { case client, server }

  /// One request body's queue: what the call wrote and nghttp2 has not sent yet.
  fileprivate final class OutboundQueue {
    var buffers = CircularBuffer<(ByteBuffer, EventLoopPromise<Void>?)>(initialCapacity: 2)
    var ended = false
    /// A response's trailers, sent once its DATA is (server side).
    var trailers: HPACKHeaders?
    /// nghttp2 asked for data and was told to wait (NGHTTP2_ERR_DEFERRED).
    var deferred = false
  }

  private let mode: Mode
  private let initialSettings: [nghttp2_settings_entry]
  private let connectionWindow: Int
  /// A request header block above this (name and value bytes, and 32 a header) resets its
  /// stream (server side): what the decoder holds stays bounded.
  private let maxHeaderBlock: Int
  private var headerBlockSize = 0
  private var session: OpaquePointer?
  private var context: ChannelHandlerContext?
  private var outbound: [Int32: OutboundQueue] = [:]
  /// Bytes nghttp2 has serialized (frame headers, HEADERS, control frames) not yet written.
  private var pending: ByteBuffer
  /// The read being decoded, and the address its readable bytes start at: DATA chunks point
  /// into it and are sliced out of it.
  private var input: ByteBuffer?
  private var inputBase: UnsafeRawPointer?
  /// The last DATA chunk received, held until its frame is known to end (or the read is done),
  /// so that a DATA frame with END_STREAM reaches the call as one frame.
  private var heldChunk: (stream: Int32, data: ByteBuffer)?
  private var headerBlock = HPACKHeaders()
  /// Inside nghttp2 (decoding or sending): it must not be entered again.
  private var busy = false
  /// The channel has gone: nghttp2 must not be driven again (its streams' data sources would
  /// be called for queues that no longer hold anything).
  private var closed = false
  private var sendWanted = false

  init(mode: Mode = .client, initialSettings: [nghttp2_settings_entry], connectionWindow: Int, maxHeaderBlock: Int = .max,
    allocator: ByteBufferAllocator) {
    self.mode = mode
    self.maxHeaderBlock = maxHeaderBlock
    self.initialSettings = initialSettings
    self.connectionWindow = connectionWindow
    self.pending = allocator.buffer(capacity: 1024)
  }

  deinit {
    if let session { nghttp2_session_del(session) }
  }

  // MARK: - Lifecycle

  func handlerAdded(context: ChannelHandlerContext) {
    self.context = context
    var callbacks: OpaquePointer?
    nghttp2_session_callbacks_new(&callbacks)
    defer { nghttp2_session_callbacks_del(callbacks) }
    nghttp2_session_callbacks_set_send_callback(callbacks, sendCallback)
    nghttp2_session_callbacks_set_send_data_callback(callbacks, sendDataCallback)
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, frameReceivedCallback)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, dataChunkCallback)
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, streamClosedCallback)
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, beginHeadersCallback)
    nghttp2_session_callbacks_set_on_header_callback(callbacks, headerCallback)

    var option: OpaquePointer?
    nghttp2_option_new(&option)
    defer { nghttp2_option_del(option) }
    nghttp2_option_set_no_auto_window_update(option, 1)
    // A request's header block is bounded by the listener's max_request_headers_kb (at most
    // 8 MiB in Envoy's schema); nghttp2's own default of 64 KiB would refuse some it allows.
    nghttp2_option_set_max_send_header_block_length(option, 16 << 20)
    if self.mode == .client {
      // The backend's pings and settings over a long-lived connection are not a flood. A
      // client's are: nghttp2's own bound (1000 acknowledgements queued) stays.
      nghttp2_option_set_max_outbound_ack(option, 1 << 20)
    }

    var session: OpaquePointer?
    let user = Unmanaged.passUnretained(self).toOpaque()
    let created = self.mode == .client
      ? nghttp2_session_client_new2(&session, callbacks, user, option)
      : nghttp2_session_server_new2(&session, callbacks, user, option)
    guard created == 0, let session else {
      context.fireErrorCaught(ProtocolError(code: NGHTTP2_ERR_NOMEM.rawValue))
      return
    }
    self.session = session
    if context.channel.isActive { self.start() }
  }

  func handlerRemoved(context: ChannelHandlerContext) {
    self.failAllOutbound()
    self.context = nil
  }

  func channelActive(context: ChannelHandlerContext) {
    self.start()
    context.fireChannelActive()
  }

  func channelInactive(context: ChannelHandlerContext) {
    self.failAllOutbound()
    context.fireChannelInactive()
  }

  private var started = false

  /// The client preface and our SETTINGS, and the connection window raised from 64 KiB.
  private func start() {
    guard !self.started, let session else { return }
    self.started = true
    var entries = self.initialSettings
    nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), &entries, entries.count)
    nghttp2_session_set_local_window_size(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, Int32(self.connectionWindow))
    self.send()
  }

  // MARK: - Reading

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    guard let session, !self.closed else { return }
    let buffer = self.unwrapInboundIn(data)
    self.busy = true
    let result = buffer.withUnsafeReadableBytes { bytes -> Int in
      guard let base = bytes.baseAddress else { return 0 }
      self.input = buffer
      self.inputBase = base
      defer {
        self.input = nil
        self.inputBase = nil
      }
      return nghttp2_session_mem_recv(session, base.assumingMemoryBound(to: UInt8.self), bytes.count)
    }
    self.busy = false
    self.releaseHeldChunk()
    if result < 0 {
      // nghttp2 has queued a GOAWAY naming the error: send it, and let the connection go.
      self.send()
      context.fireErrorCaught(ProtocolError(code: Int32(result)))
      context.close(promise: nil)
      return
    }
    self.send()
  }

  fileprivate func dataChunk(stream: Int32, pointer: UnsafePointer<UInt8>, length: Int) {
    guard let session else { return }
    // The connection's window is the proxy's to give: calls are held back per stream.
    nghttp2_session_consume_connection(session, length)
    let slice: ByteBuffer
    if let input = self.input, let base = self.inputBase {
      let offset = UnsafeRawPointer(pointer) - base
      if offset >= 0 && offset + length <= input.readableBytes {
        slice = input.getSlice(at: input.readerIndex + offset, length: length)!
      } else {
        slice = self.copied(pointer, length)
      }
    } else {
      slice = self.copied(pointer, length)
    }
    if let held = self.heldChunk {
      self.heldChunk = nil
      self.emit(HTTP2Frame(streamID: HTTP2StreamID(held.stream), payload: .data(.init(data: .byteBuffer(held.data)))))
    }
    self.heldChunk = (stream, slice)
  }

  private func copied(_ pointer: UnsafePointer<UInt8>, _ length: Int) -> ByteBuffer {
    var buffer = (self.context?.channel.allocator ?? ByteBufferAllocator()).buffer(capacity: length)
    buffer.writeBytes(UnsafeRawBufferPointer(start: pointer, count: length))
    return buffer
  }

  private func releaseHeldChunk() {
    guard let held = self.heldChunk else { return }
    self.heldChunk = nil
    self.emit(HTTP2Frame(streamID: HTTP2StreamID(held.stream), payload: .data(.init(data: .byteBuffer(held.data)))))
  }

  fileprivate func beginHeaders() {
    self.headerBlock = HPACKHeaders()
    self.headerBlockSize = 0
  }

  /// Whether the header is taken; false resets its stream (a block over the limit).
  fileprivate func header(name: UnsafePointer<UInt8>, _ nameLength: Int, value: UnsafePointer<UInt8>, _ valueLength: Int) -> Bool {
    self.headerBlockSize += nameLength + valueLength + 32
    guard self.headerBlockSize <= self.maxHeaderBlock else {
      self.headerBlock = HPACKHeaders()
      return false
    }
    self.headerBlock.add(
      name: String(decoding: UnsafeBufferPointer(start: name, count: nameLength), as: UTF8.self),
      value: String(decoding: UnsafeBufferPointer(start: value, count: valueLength), as: UTF8.self))
    return true
  }

  fileprivate func frameReceived(_ frame: UnsafePointer<nghttp2_frame>) {
    let hd = frame.pointee.hd
    let stream = HTTP2StreamID(hd.stream_id)
    let endStream = hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
    switch UInt32(hd.type) {
    case NGHTTP2_DATA.rawValue:
      if let held = self.heldChunk, held.stream == hd.stream_id {
        self.heldChunk = nil
        self.emit(HTTP2Frame(streamID: stream, payload: .data(.init(data: .byteBuffer(held.data), endStream: endStream))))
      } else if endStream {
        self.releaseHeldChunk()
        let empty = ByteBuffer()
        self.emit(HTTP2Frame(streamID: stream, payload: .data(.init(data: .byteBuffer(empty), endStream: true))))
      }
    case NGHTTP2_HEADERS.rawValue:
      self.releaseHeldChunk()
      let headers = self.headerBlock
      self.headerBlock = HPACKHeaders()
      self.emit(HTTP2Frame(streamID: stream, payload: .headers(.init(headers: headers, endStream: endStream))))
    case NGHTTP2_RST_STREAM.rawValue:
      self.releaseHeldChunk()
      self.emit(HTTP2Frame(streamID: stream, payload: .rstStream(HTTP2ErrorCode(networkCode: Int(frame.pointee.rst_stream.error_code)))))
    case NGHTTP2_SETTINGS.rawValue:
      guard hd.flags & UInt8(NGHTTP2_FLAG_ACK.rawValue) == 0 else { return }
      let settings = frame.pointee.settings
      var list = HTTP2Settings()
      for i in 0..<settings.niv {
        let entry = settings.iv[i]
        list.append(HTTP2Setting(parameter: HTTP2SettingsParameter(extensionSetting: Int(entry.settings_id)), value: Int(entry.value)))
      }
      self.emit(HTTP2Frame(streamID: .rootStream, payload: .settings(.settings(list))))
    case NGHTTP2_PING.rawValue:
      guard hd.flags & UInt8(NGHTTP2_FLAG_ACK.rawValue) != 0 else { return }
      self.emit(HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(), ack: true)))
    case NGHTTP2_GOAWAY.rawValue:
      self.releaseHeldChunk()
      let goaway = frame.pointee.goaway
      self.emit(HTTP2Frame(streamID: .rootStream, payload: .goAway(
        lastStreamID: HTTP2StreamID(goaway.last_stream_id), errorCode: HTTP2ErrorCode(networkCode: Int(goaway.error_code)), opaqueData: nil)))
    default:
      break
    }
  }

  fileprivate func streamClosed(_ id: Int32, errorCode: UInt32) {
    if let held = self.heldChunk, held.stream == id { self.releaseHeldChunk() }
    if let queue = self.outbound.removeValue(forKey: id) {
      while let (_, promise) = queue.buffers.popFirst() { promise?.fail(StreamGone()) }
    }
    let reason: HTTP2ErrorCode? = errorCode == 0 ? nil : HTTP2ErrorCode(networkCode: Int(errorCode))
    self.context?.fireUserInboundEventTriggered(StreamClosedEvent(streamID: HTTP2StreamID(id), reason: reason))
  }

  private func emit(_ frame: HTTP2Frame) {
    self.context?.fireChannelRead(self.wrapInboundOut(frame))
  }

  // MARK: - Writing

  func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
    guard let session else {
      promise?.fail(ChannelError.ioOnClosedChannel)
      return
    }
    guard !self.closed else {
      promise?.fail(ChannelError.ioOnClosedChannel)
      return
    }
    let frame = self.unwrapOutboundIn(data)
    let id = Int32(frame.streamID)
    switch frame.payload {
    case .headers(let headers):
      switch self.mode {
      case .client:
        self.submitRequest(session, id: id, headers: headers.headers, endStream: headers.endStream, promise: promise)
      case .server:
        self.submitResponseHeaders(session, id: id, headers: headers.headers, endStream: headers.endStream, promise: promise)
      }
    case .data(let data):
      guard case .byteBuffer(let buffer) = data.data, let queue = self.outbound[id], !queue.ended else {
        promise?.fail(StreamGone())
        return
      }
      queue.buffers.append((buffer, promise))
      queue.ended = data.endStream
      if queue.deferred {
        queue.deferred = false
        nghttp2_session_resume_data(session, id)
      }
    case .rstStream(let code):
      nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), id, UInt32(code.networkCode))
      self.succeedAfterSend(promise)
    case .windowUpdate(let increment):
      // The connection's window is returned here as data arrives (see dataChunk).
      if id != 0 { nghttp2_session_consume_stream(session, id, increment) }
      self.succeedAfterSend(promise)
    case .ping(let data, let ack):
      var bytes = data.bytes
      _ = withUnsafeBytes(of: &bytes) { raw in
        nghttp2_submit_ping(session, UInt8(ack ? NGHTTP2_FLAG_ACK.rawValue : NGHTTP2_FLAG_NONE.rawValue), raw.baseAddress!.assumingMemoryBound(to: UInt8.self))
      }
      self.succeedAfterSend(promise)
    case .goAway(let last, let code, _):
      let lastStream = self.mode == .server ? Int32(last) : nghttp2_session_get_last_proc_stream_id(session)
      nghttp2_submit_goaway(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), lastStream, UInt32(code.networkCode), nil, 0)
      self.succeedAfterSend(promise)
    default:
      self.succeedAfterSend(promise)
    }
  }

  func flush(context: ChannelHandlerContext) {
    self.send()
  }

  /// Scratch for a header block's names and values, kept between requests.
  private var scratch: [UInt8] = []
  private var spans: [(Int, Int, Int, Int, UInt8)] = []

  /// Calls `body` with the headers as nghttp2's name-value array (nghttp2 copies them).
  private func withNameValues<R>(_ headers: HPACKHeaders, _ body: (UnsafeMutablePointer<nghttp2_nv>?, Int) -> R) -> R {
    self.scratch.removeAll(keepingCapacity: true)
    self.spans.removeAll(keepingCapacity: true)
    for (name, value, indexing) in headers {
      let nameStart = self.scratch.count
      self.scratch.append(contentsOf: name.utf8)
      let valueStart = self.scratch.count
      self.scratch.append(contentsOf: value.utf8)
      let flags = indexing == .neverIndexed ? UInt8(NGHTTP2_NV_FLAG_NO_INDEX.rawValue) : UInt8(NGHTTP2_NV_FLAG_NONE.rawValue)
      self.spans.append((nameStart, valueStart - nameStart, valueStart, self.scratch.count - valueStart, flags))
    }
    let spans = self.spans
    return self.scratch.withUnsafeMutableBufferPointer { bytes in
      let base = bytes.baseAddress ?? UnsafeMutablePointer<UInt8>(bitPattern: 1)!
      return withUnsafeTemporaryAllocation(of: nghttp2_nv.self, capacity: max(spans.count, 1)) { nva in
        for (i, span) in spans.enumerated() {
          nva[i] = nghttp2_nv(name: base + span.0, value: base + span.2, namelen: span.1, valuelen: span.3, flags: span.4)
        }
        return body(nva.baseAddress, spans.count)
      }
    }
  }

  /// A data provider reading from `queue` (nghttp2 copies the provider, not the queue: the queue
  /// must live until the stream closes), or none for a message that ends with its headers.
  private static func withProvider(_ queue: OutboundQueue?, _ body: (UnsafePointer<nghttp2_data_provider>?) -> Int32) -> Int32 {
    guard let queue else { return body(nil) }
    var provider = nghttp2_data_provider(
      source: nghttp2_data_source(ptr: Unmanaged.passUnretained(queue).toOpaque()), read_callback: readCallback)
    return body(&provider)
  }

  private func submitRequest(_ session: OpaquePointer, id: Int32, headers: HPACKHeaders, endStream: Bool, promise: EventLoopPromise<Void>?) {
    // Stream IDs are chosen by UpstreamConnection, in the order it writes their HEADERS.
    guard nghttp2_session_set_next_stream_id(session, id) == 0 else {
      promise?.fail(StreamGone())
      return
    }
    let queue: OutboundQueue? = endStream ? nil : OutboundQueue()
    let submitted: Int32 = self.withNameValues(headers) { nva, count in
      Self.withProvider(queue) { nghttp2_submit_request(session, nil, nva, count, $0, nil) }
    }
    guard submitted == id else {
      if submitted > 0 {
        // nghttp2 opened a stream under another ID: its data source must stay alive until
        // the stream closes, and the stream must close at once.
        if let queue { self.outbound[submitted] = queue }
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), submitted, UInt32(NGHTTP2_CANCEL.rawValue))
      }
      promise?.fail(StreamGone())
      return
    }
    if let queue { self.outbound[id] = queue }
    self.succeedAfterSend(promise)
  }

  /// A response's HEADERS, or its trailers once the response has begun.
  private func submitResponseHeaders(_ session: OpaquePointer, id: Int32, headers: HPACKHeaders, endStream: Bool, promise: EventLoopPromise<Void>?) {
    if let queue = self.outbound[id] {
      // Trailers: they follow the DATA still queued (nghttp2 sends them from the read callback).
      guard !queue.ended else {
        promise?.fail(StreamGone())
        return
      }
      queue.trailers = headers
      queue.ended = true
      if queue.deferred {
        queue.deferred = false
        nghttp2_session_resume_data(session, id)
      }
      self.succeedAfterSend(promise)
      return
    }
    let queue: OutboundQueue? = endStream ? nil : OutboundQueue()
    let result: Int32 = self.withNameValues(headers) { nva, count in
      Self.withProvider(queue) { nghttp2_submit_response(session, id, nva, count, $0) }
    }
    guard result == 0 else {
      promise?.fail(StreamGone())
      return
    }
    if let queue { self.outbound[id] = queue }
    self.succeedAfterSend(promise)
  }

  /// Queues the trailers after the last DATA frame (called from the read callback, where
  /// nghttp2 allows it).
  private func submitTrailers(_ queue: OutboundQueue, stream: Int32) {
    guard let session, let trailers = queue.trailers else { return }
    queue.trailers = nil
    _ = self.withNameValues(trailers) { nva, count in nghttp2_submit_trailer(session, stream, nva, count) }
  }

  fileprivate func read(_ queue: OutboundQueue, stream: Int32, length: Int, flags: UnsafeMutablePointer<UInt32>) -> Int {
    guard let (head, _) = queue.buffers.first else {
      if queue.ended {
        flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue | NGHTTP2_DATA_FLAG_NO_COPY.rawValue
        self.endData(queue, stream: stream, flags: flags)
        return 0
      }
      queue.deferred = true
      return Int(NGHTTP2_ERR_DEFERRED.rawValue)
    }
    let count = min(length, head.readableBytes)
    flags.pointee |= NGHTTP2_DATA_FLAG_NO_COPY.rawValue
    if queue.ended && count == head.readableBytes && queue.buffers.count == 1 {
      flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
      self.endData(queue, stream: stream, flags: flags)
    }
    return count
  }

  /// The last DATA frame: END_STREAM on it, or on the trailers that follow it.
  private func endData(_ queue: OutboundQueue, stream: Int32, flags: UnsafeMutablePointer<UInt32>) {
    guard queue.trailers != nil else { return }
    flags.pointee |= NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue
    self.submitTrailers(queue, stream: stream)
  }

  /// Writes one DATA frame: its 9-byte header with what is pending, then the payload from the
  /// call's buffer, without a copy unless it is small.
  fileprivate func sendData(_ queue: OutboundQueue, header: UnsafePointer<UInt8>, length: Int) -> Bool {
    guard let context else { return false }
    self.pending.writeBytes(UnsafeRawBufferPointer(start: header, count: 9))
    if length == 0 {
      // An empty frame (END_STREAM alone): the empty writes at the head are done with it.
      while let first = queue.buffers.first, first.0.readableBytes == 0 {
        let (_, promise) = queue.buffers.removeFirst()
        if let promise { self.writePending(context, promise: promise) }
      }
      return true
    }
    // The read callback never offers more than the head buffer holds; anything else would
    // write a frame shorter than its header says.
    guard let head = queue.buffers.first, length <= head.0.readableBytes else { return false }
    var (buffer, promise) = queue.buffers.removeFirst()
    if length < buffer.readableBytes {
      // The frame ends inside this buffer: the rest stays queued, with the promise.
      let part = buffer.readSlice(length: length)!
      queue.buffers.prepend((buffer, promise))
      self.writeData(part, promise: nil, context: context)
    } else {
      self.writeData(buffer, promise: promise, context: context)
    }
    return true
  }

  private func writeData(_ data: ByteBuffer, promise: EventLoopPromise<Void>?, context: ChannelHandlerContext) {
    if data.readableBytes <= 1024 {
      var data = data
      self.pending.writeBuffer(&data)
      if promise != nil { self.writePending(context, promise: promise) }
    } else {
      self.writePending(context, promise: nil)
      context.write(self.wrapOutboundOut(data), promise: promise)
    }
  }

  private func writePending(_ context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
    guard self.pending.readableBytes > 0 else {
      promise?.succeed()
      return
    }
    context.write(self.wrapOutboundOut(self.pending), promise: promise)
    self.pending.clear()
  }

  fileprivate func serialized(_ bytes: UnsafePointer<UInt8>, _ length: Int) {
    self.pending.writeBytes(UnsafeRawBufferPointer(start: bytes, count: length))
  }

  /// Promises of frames submitted to nghttp2, kept until it has serialized them: a write that
  /// follows (a reset after a response, say) must not overtake them.
  private var submitted: [EventLoopPromise<Void>] = []

  private func succeedAfterSend(_ promise: EventLoopPromise<Void>?) {
    if let promise { self.submitted.append(promise) }
  }

  /// Lets nghttp2 write what it has queued, then flushes.
  private func send() {
    guard let session, let context, !self.closed else { return }
    guard !self.busy else {
      self.sendWanted = true
      return
    }
    self.busy = true
    repeat {
      self.sendWanted = false
      let result = nghttp2_session_send(session)
      if result < 0 {
        self.busy = false
        context.fireErrorCaught(ProtocolError(code: result))
        context.close(promise: nil)
        return
      }
    } while self.sendWanted
    self.busy = false
    self.writePending(context, promise: nil)
    context.flush()
    if !self.submitted.isEmpty {
      let promises = self.submitted
      self.submitted.removeAll(keepingCapacity: true)
      for promise in promises { promise.succeed() }
    }
    if nghttp2_session_want_read(session) == 0 && nghttp2_session_want_write(session) == 0 {
      // Both sides have said GOAWAY and no stream is left.
      context.close(promise: nil)
    }
  }

  /// The connection is gone: nghttp2 is never entered again, and what was waiting fails. The
  /// queues stay (emptied) until the session is deleted: its streams still point at them.
  private func failAllOutbound() {
    self.closed = true
    let promises = self.submitted
    self.submitted.removeAll()
    for promise in promises { promise.fail(ChannelError.ioOnClosedChannel) }
    for queue in self.outbound.values {
      queue.ended = true
      queue.trailers = nil
      while let (_, promise) = queue.buffers.popFirst() { promise?.fail(StreamGone()) }
    }
  }
}

// MARK: - nghttp2 callbacks (C functions: no captures; the handler comes back as user data)

private func handler(_ user: UnsafeMutableRawPointer?) -> NGHTTP2Handler {
  Unmanaged<NGHTTP2Handler>.fromOpaque(user!).takeUnretainedValue()
}

private let sendCallback: nghttp2_send_callback = { _, data, length, _, user in
  handler(user).serialized(data!, length)
  return length
}

private let sendDataCallback: nghttp2_send_data_callback = { _, _, header, length, source, user in
  let queue = Unmanaged<NGHTTP2Handler.OutboundQueue>.fromOpaque(source!.pointee.ptr).takeUnretainedValue()
  return handler(user).sendData(queue, header: header!, length: length) ? 0 : NGHTTP2_ERR_CALLBACK_FAILURE.rawValue
}

private let readCallback: nghttp2_data_source_read_callback = { _, stream, _, length, flags, source, user in
  let queue = Unmanaged<NGHTTP2Handler.OutboundQueue>.fromOpaque(source!.pointee.ptr).takeUnretainedValue()
  return handler(user).read(queue, stream: stream, length: length, flags: flags!)
}

private let frameReceivedCallback: nghttp2_on_frame_recv_callback = { _, frame, user in
  handler(user).frameReceived(frame!)
  return 0
}

private let dataChunkCallback: nghttp2_on_data_chunk_recv_callback = { _, _, stream, data, length, user in
  handler(user).dataChunk(stream: stream, pointer: data!, length: length)
  return 0
}

private let streamClosedCallback: nghttp2_on_stream_close_callback = { _, stream, code, user in
  handler(user).streamClosed(stream, errorCode: code)
  return 0
}

private let beginHeadersCallback: nghttp2_on_begin_headers_callback = { _, _, user in
  handler(user).beginHeaders()
  return 0
}

private let headerCallback: nghttp2_on_header_callback = { _, _, name, nameLength, value, valueLength, _, user in
  handler(user).header(name: name!, nameLength, value: value!, valueLength) ? 0 : NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue
}
