/**
 * grpc-web.js: a small, self-contained gRPC-Web client for browsers (and Node 18+), no dependencies.
 * Copy this one file into your page and import it as an ES module.
 *
 * It speaks the gRPC-Web wire protocol over `fetch`, reading the response body as a stream, and
 * reports failures the way the grpc-web JavaScript client does (see "Errors" below).
 *
 * ## API
 *
 *   import { GrpcWebClient, GrpcError, StatusCode } from './grpc-web.js';
 *
 *   const client = new GrpcWebClient('http://127.0.0.1:8080', { mode: 'binary' });   // or 'text'
 *
 *   // Unary call. `requestBytes` is the serialized protobuf message (a Uint8Array).
 *   const { message, headers, trailers, status, statusMessage } =
 *       await client.unary('/demo.User/login', requestBytes, {
 *         metadata: { authorization: 'Bearer x', 'trace-bin': new Uint8Array([1, 2]) },
 *         deadlineMs: 1500,          // sent as `grpc-timeout: 1500m`; the client also gives up then
 *         signal: abortController.signal,   // cancel the call
 *       });
 *   // message: Uint8Array (the serialized reply); headers / trailers: plain objects with
 *   // lower-case keys; status: 0; statusMessage: ''.
 *
 *   // Server streaming, as an async iterator (leaving the loop early cancels the call) ...
 *   const call = client.serverStream('/demo.Echo/ServerStream', requestBytes, { deadlineMs: 10000 });
 *   for await (const message of call) { ... }       // throws a GrpcError if the call fails
 *   call.headers; call.trailers; call.status; call.statusMessage   // filled in as the call goes
 *   call.cancel();
 *
 *   // ... or with callbacks (the call starts at once):
 *   client.serverStream(path, requestBytes, {
 *     onHeaders(headers) {}, onMessage(bytes) {},
 *     onEnd({ status, statusMessage, headers, trailers }) {}, onError(grpcError) {},
 *   });
 *
 * Options of the constructor: `mode` ('binary': `application/grpc-web+proto`; 'text':
 * `application/grpc-web-text`, base64 both ways), `metadata` (sent with every call), `fetch`
 * (a fetch function to use instead of the global one), `credentials` (passed to fetch).
 *
 * Metadata: keys are lower-cased and must match [0-9a-z_.-]; `grpc-*` keys are reserved. Values of
 * keys ending in `-bin` may be Uint8Array (base64-encoded for you) or strings (sent as they are,
 * so they must already be base64). Other values are strings; an array is sent joined by ", ".
 * Every request also carries `x-grpc-web: 1` and `x-user-agent: grpc-web-javascript/0.1`.
 * Cross-origin pages need those header names (and your own metadata names) in the proxy's CORS
 * `allow_headers`, and `grpc-status,grpc-message` plus any header you read in `expose_headers`.
 * Use `decodeBinaryMetadata(value)` to turn a received `-bin` value back into bytes.
 *
 * ## Errors
 *
 * A failed call throws (or passes to onError) a `GrpcError` with `code` (number), `codeName`
 * ('UNAVAILABLE'), `message` (percent-decoded grpc-message), `metadata` (headers and trailers
 * merged), `headers`, `trailers`, and `httpStatus` (0 when no response arrived).
 *   - grpc-status from the trailer frame (0x80) at the end of the body, or from the response
 *     headers when there is no trailer frame (a trailers-only response). Later duplicates win.
 *   - An HTTP status outside 2xx: the code comes from the HTTP status as in the grpc-web JS client
 *     (400→3, 401→16, 403→7, 404→5, 409→10, 412→9, 429→8, 499→1, 500→2, 501→12, 503→14, 504→4,
 *     anything else→2), and a grpc-status header is not used for the code. The message is the
 *     grpc-message header when there is one (e.g. "no healthy upstream"), else "HTTP 503 ...".
 *   - The request could not be sent or the connection broke (network down, proxy not listening,
 *     CORS refused by the browser): UNAVAILABLE (14).
 *   - The deadline passed: DEADLINE_EXCEEDED (4). `signal` aborted or cancel(): CANCELLED (1).
 *   - A 2xx response whose content-type is not gRPC: UNKNOWN (2) "Unknown Content-type received.".
 *   - No grpc-status anywhere: UNKNOWN (2). A unary call with OK but no message: UNKNOWN (2)
 *     "Incomplete response". Malformed frames or base64: INTERNAL (13).
 *
 * The lower-level pieces are exported too (framing, streaming base64 decoding, trailer parsing,
 * percent-decoding, the HTTP→gRPC code table) for tests and for anyone building on them.
 */

export const StatusCode = Object.freeze({
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
});

const CODE_NAMES = Object.keys(StatusCode);

/** 'UNAVAILABLE' for 14; 'CODE_42' for a number outside the table. */
export function codeName(code) {
  return Number.isInteger(code) && code >= 0 && code < CODE_NAMES.length ? CODE_NAMES[code] : `CODE_${code}`;
}

/** A failed call. `message` is the (percent-decoded) status message. */
export class GrpcError extends Error {
  constructor(code, message, { headers = {}, trailers = {}, httpStatus = 0, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'GrpcError';
    this.code = code;
    this.codeName = codeName(code);
    this.headers = headers;
    this.trailers = trailers;
    this.metadata = { ...headers, ...trailers };
    this.httpStatus = httpStatus;
  }

  toString() {
    return `${this.codeName} (${this.code}): ${this.message}`;
  }
}

/**
 * The gRPC code for an HTTP status outside 2xx, as the grpc-web JavaScript client maps it
 * (statuscode.js `fromHttpStatus`; protocol notes section 8, X3).
 */
export function httpStatusToCode(httpStatus) {
  switch (httpStatus) {
    case 200: return StatusCode.OK;
    case 400: return StatusCode.INVALID_ARGUMENT;
    case 401: return StatusCode.UNAUTHENTICATED;
    case 403: return StatusCode.PERMISSION_DENIED;
    case 404: return StatusCode.NOT_FOUND;
    case 409: return StatusCode.ABORTED;
    case 412: return StatusCode.FAILED_PRECONDITION;
    case 429: return StatusCode.RESOURCE_EXHAUSTED;
    case 499: return StatusCode.CANCELLED;
    case 500: return StatusCode.UNKNOWN;
    case 501: return StatusCode.UNIMPLEMENTED;
    case 503: return StatusCode.UNAVAILABLE;
    case 504: return StatusCode.DEADLINE_EXCEEDED;
    default: return StatusCode.UNKNOWN;
  }
}

// --- percent-encoding of grpc-message ---------------------------------------------------------

const utf8Decoder = new TextDecoder('utf-8');
const utf8Encoder = new TextEncoder();

function hexValue(c) {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x41 && c <= 0x46) return c - 0x41 + 10;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  return -1;
}

/**
 * Decodes a grpc-message value: `%XX` sequences are bytes, the result is UTF-8. Unlike
 * decodeURIComponent it never throws: a `%` not followed by two hex digits stays as it is, and
 * invalid UTF-8 becomes U+FFFD.
 */
export function percentDecode(value) {
  if (value == null) return '';
  const text = String(value);
  if (!text.includes('%')) return text;
  const input = utf8Encoder.encode(text);
  const out = new Uint8Array(input.length);
  let n = 0;
  for (let i = 0; i < input.length; i++) {
    const c = input[i];
    if (c === 0x25 && i + 2 < input.length) {
      const hi = hexValue(input[i + 1]);
      const lo = hexValue(input[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out[n++] = (hi << 4) | lo;
        i += 2;
        continue;
      }
    }
    out[n++] = c;
  }
  return utf8Decoder.decode(out.subarray(0, n));
}

/** Encodes a status message the way gRPC servers do: `%`, and bytes outside 0x20-0x7E, as %XX. */
export function percentEncode(text) {
  const bytes = utf8Encoder.encode(String(text));
  let out = '';
  for (const b of bytes) {
    out += b >= 0x20 && b <= 0x7e && b !== 0x25 ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

// --- base64 -----------------------------------------------------------------------------------

const B64_ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const B64_VALUES = new Int16Array(256).fill(-1);
for (let i = 0; i < B64_ALPHABET.length; i++) B64_VALUES[B64_ALPHABET.charCodeAt(i)] = i;
const PAD = 0x3d; // '='

/** Standard base64 with padding. */
export function base64Encode(bytes) {
  let out = '';
  let i = 0;
  for (; i + 2 < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
    out += B64_ALPHABET[n >> 18] + B64_ALPHABET[(n >> 12) & 63] + B64_ALPHABET[(n >> 6) & 63] + B64_ALPHABET[n & 63];
  }
  const rest = bytes.length - i;
  if (rest === 1) {
    const n = bytes[i] << 16;
    out += B64_ALPHABET[n >> 18] + B64_ALPHABET[(n >> 12) & 63] + '==';
  } else if (rest === 2) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8);
    out += B64_ALPHABET[n >> 18] + B64_ALPHABET[(n >> 12) & 63] + B64_ALPHABET[(n >> 6) & 63] + '=';
  }
  return out;
}

/**
 * Incremental base64 decoder for gRPC-Web text responses. Feed it chunks (strings or byte arrays
 * of ASCII) split anywhere; it decodes every complete 4-character group on its own, so a body
 * made of several separately padded segments (`AAAA` `BB==` `CCC=`) decodes as their bytes
 * concatenated. `finish()` throws if a group was left incomplete. Throws on a character outside
 * the standard alphabet or padding in the wrong place.
 */
export class Base64StreamDecoder {
  constructor() {
    this.carry = new Uint8Array(4);
    this.carried = 0;
  }

  /** Decodes what can be decoded; returns the bytes (possibly empty). */
  push(chunk) {
    const input = typeof chunk === 'string' ? asciiBytes(chunk) : chunk;
    const out = new Uint8Array(Math.floor((this.carried + input.length) / 4) * 3);
    let n = 0;
    const group = this.carry;
    for (let i = 0; i < input.length; i++) {
      group[this.carried++] = input[i];
      if (this.carried === 4) {
        n = decodeGroup(group, out, n);
        this.carried = 0;
      }
    }
    return out.subarray(0, n);
  }

  /** Ends the input: throws if characters of an incomplete group are left. */
  finish() {
    if (this.carried !== 0) {
      throw new Error(`base64 text ended inside a 4-character group (${this.carried} left over)`);
    }
  }
}

function asciiBytes(text) {
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    out[i] = c > 0xff ? 0xff : c; // 0xff is not base64: reported as invalid
  }
  return out;
}

function b64Char(c) {
  const v = B64_VALUES[c];
  if (v < 0) throw new Error(`invalid base64 character ${JSON.stringify(String.fromCharCode(c))}`);
  return v;
}

function decodeGroup(g, out, n) {
  const a = b64Char(g[0]);
  const b = b64Char(g[1]);
  if (g[2] === PAD) {
    if (g[3] !== PAD) throw new Error('invalid base64 padding');
    out[n++] = (a << 2) | (b >> 4);
    return n;
  }
  const c = b64Char(g[2]);
  if (g[3] === PAD) {
    out[n++] = (a << 2) | (b >> 4);
    out[n++] = ((b & 15) << 4) | (c >> 2);
    return n;
  }
  const d = b64Char(g[3]);
  out[n++] = (a << 2) | (b >> 4);
  out[n++] = ((b & 15) << 4) | (c >> 2);
  out[n++] = ((c & 3) << 6) | d;
  return n;
}

/** Decodes a whole base64 string (padded or not, one segment or several padded ones). */
export function base64Decode(text) {
  let s = String(text);
  if (s.length % 4 !== 0 && !s.includes('=')) s += '='.repeat(4 - (s.length % 4)); // unpadded
  const decoder = new Base64StreamDecoder();
  const out = decoder.push(s);
  decoder.finish();
  return out;
}

/** The bytes of a received `-bin` metadata value (values joined by "," are concatenated). */
export function decodeBinaryMetadata(value) {
  const parts = String(value).split(',').map((p) => base64Decode(p.trim()));
  return concatBytes(parts);
}

// --- framing ----------------------------------------------------------------------------------

export const FRAME_DATA = 0x00;
export const FRAME_COMPRESSED = 0x01;
export const FRAME_TRAILER = 0x80;

/** One gRPC-Web frame: flag byte 0, 4-byte big-endian length, the message. */
export function frameMessage(message, flag = FRAME_DATA) {
  const out = new Uint8Array(5 + message.length);
  out[0] = flag;
  new DataView(out.buffer).setUint32(1, message.length, false);
  out.set(message, 5);
  return out;
}

/** A trailer frame (0x80) for a trailer object or [key, value] list: `key:value\r\n` lines. */
export function trailerFrame(trailers) {
  const entries = Array.isArray(trailers) ? trailers : Object.entries(trailers);
  const text = entries.map(([k, v]) => `${k}:${v}\r\n`).join('');
  return frameMessage(utf8Encoder.encode(text), FRAME_TRAILER);
}

export function concatBytes(parts) {
  let total = 0;
  for (const p of parts) total += p.length;
  const out = new Uint8Array(total);
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

/**
 * Splits a byte stream into gRPC-Web frames. `push(bytes)` returns the frames completed so far
 * as `{flag, payload}`; `pending` is the number of bytes of an unfinished frame.
 */
export class FrameParser {
  constructor() {
    this.buffer = new Uint8Array(0);
  }

  push(chunk) {
    this.buffer = this.buffer.length === 0 ? chunk : concatBytes([this.buffer, chunk]);
    const frames = [];
    let offset = 0;
    while (this.buffer.length - offset >= 5) {
      const length = new DataView(this.buffer.buffer, this.buffer.byteOffset + offset + 1, 4).getUint32(0, false);
      if (this.buffer.length - offset - 5 < length) break;
      frames.push({ flag: this.buffer[offset], payload: this.buffer.slice(offset + 5, offset + 5 + length) });
      offset += 5 + length;
    }
    this.buffer = offset === this.buffer.length ? new Uint8Array(0) : this.buffer.slice(offset);
    return frames;
  }

  get pending() {
    return this.buffer.length;
  }
}

/**
 * Parses the payload of a trailer frame: `key:value\r\n` lines (a space after the colon is
 * allowed, bare `\n` line ends too). Keys are lower-cased; when a key repeats the later value
 * wins, as in the grpc-web JS client.
 */
export function parseTrailers(payload) {
  const text = typeof payload === 'string' ? payload : utf8Decoder.decode(payload);
  const trailers = {};
  for (const line of text.split(/\r?\n/)) {
    if (line.trim() === '') continue;
    const colon = line.indexOf(':');
    if (colon <= 0) throw new Error(`malformed trailer line ${JSON.stringify(line)}`);
    trailers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  return trailers;
}

// --- request headers --------------------------------------------------------------------------

const MAX_TIMEOUT_VALUE = 99999999; // grpc-timeout allows at most 8 digits

/** `grpc-timeout` for a deadline in milliseconds: `1500m`, or a coarser unit past 8 digits. */
export function encodeTimeout(ms) {
  let value = Math.max(1, Math.ceil(ms));
  if (value <= MAX_TIMEOUT_VALUE) return `${value}m`;
  for (const [unit, size] of [['S', 1000], ['M', 60], ['H', 60]]) {
    value = Math.ceil(value / size);
    if (value <= MAX_TIMEOUT_VALUE) return `${value}${unit}`;
  }
  return `${MAX_TIMEOUT_VALUE}H`;
}

const METADATA_KEY = /^[0-9a-z_.-]+$/;

/** Request metadata object → header object (lower-case keys, `-bin` values base64). */
export function encodeMetadata(metadata = {}) {
  const headers = {};
  for (const [rawKey, value] of Object.entries(metadata)) {
    if (value === undefined || value === null) continue;
    const key = rawKey.toLowerCase();
    if (!METADATA_KEY.test(key)) throw new TypeError(`invalid metadata key ${JSON.stringify(rawKey)}`);
    if (key.startsWith('grpc-')) throw new TypeError(`metadata key ${JSON.stringify(rawKey)} is reserved`);
    const values = Array.isArray(value) ? value : [value];
    if (key.endsWith('-bin')) {
      headers[key] = values.map((v) => (v instanceof Uint8Array ? base64Encode(v) : String(v))).join(',');
    } else {
      headers[key] = values.map(String).join(', ');
    }
  }
  return headers;
}

function headersToObject(headers) {
  const out = {};
  if (!headers) return out;
  headers.forEach((value, key) => {
    out[key.toLowerCase()] = value;
  });
  return out;
}

// --- the client -------------------------------------------------------------------------------

const USER_AGENT = 'grpc-web-javascript/0.1';

export class GrpcWebClient {
  /**
   * @param {string} baseUrl  the proxy, e.g. 'http://127.0.0.1:8080' (a trailing slash is fine)
   * @param {{mode?: 'binary'|'text', metadata?: object, fetch?: Function, credentials?: string}} options
   */
  constructor(baseUrl, { mode = 'binary', metadata = {}, fetch: fetchFn, credentials } = {}) {
    if (mode !== 'binary' && mode !== 'text') throw new TypeError(`mode must be 'binary' or 'text', not ${JSON.stringify(mode)}`);
    this.baseUrl = String(baseUrl).replace(/\/+$/, '');
    this.mode = mode;
    this.metadata = metadata;
    this.fetch = fetchFn || globalThis.fetch.bind(globalThis);
    this.credentials = credentials;
  }

  /** A unary call; resolves to {message, headers, trailers, status, statusMessage}. */
  async unary(path, requestBytes, options = {}) {
    const events = this.#call(path, requestBytes, options);
    const messages = [];
    let headers = {};
    let end;
    for (;;) {
      const { value, done } = await events.next();
      if (done) {
        end = value;
        break;
      }
      if (value.headers) headers = value.headers;
      else messages.push(value.message);
    }
    if (messages.length === 0) {
      throw new GrpcError(StatusCode.UNKNOWN, 'Incomplete response', { headers, trailers: end.trailers, httpStatus: end.httpStatus });
    }
    if (messages.length > 1) {
      throw new GrpcError(StatusCode.INTERNAL, `a unary call got ${messages.length} messages`, { headers, trailers: end.trailers, httpStatus: end.httpStatus });
    }
    return { message: messages[0], headers, trailers: end.trailers, status: end.status, statusMessage: end.statusMessage };
  }

  /**
   * A server-streaming call: returns a ServerStream (async-iterable over the reply messages).
   * With `onMessage` (and onHeaders/onEnd/onError) in the options, it runs at once and reports
   * through the callbacks instead.
   */
  serverStream(path, requestBytes, options = {}) {
    const cancel = new AbortController();
    const { signal } = options;
    if (signal) {
      if (signal.aborted) cancel.abort();
      else signal.addEventListener('abort', () => cancel.abort(), { once: true });
    }
    return new ServerStream(this.#call(path, requestBytes, { ...options, signal: cancel.signal }), cancel, options);
  }

  /**
   * The call itself, as an async generator of events: {headers} once, then {message} per reply
   * message; it returns {status, statusMessage, trailers, httpStatus} on OK and throws a GrpcError
   * otherwise. Returning early (a consumer leaving its loop) aborts the request.
   */
  async *#call(path, requestBytes, { metadata = {}, deadlineMs, signal } = {}) {
    const text = this.mode === 'text';
    const headers = {
      ...encodeMetadata({ ...this.metadata, ...metadata }),
      'content-type': text ? 'application/grpc-web-text' : 'application/grpc-web+proto',
      'x-grpc-web': '1',
      'x-user-agent': USER_AGENT,
    };
    if (text) headers.accept = 'application/grpc-web-text';
    if (deadlineMs !== undefined && deadlineMs !== null) {
      if (!(deadlineMs > 0)) throw new GrpcError(StatusCode.DEADLINE_EXCEEDED, 'deadline exceeded before the call started');
      headers['grpc-timeout'] = encodeTimeout(deadlineMs);
    }
    const framed = frameMessage(requestBytes instanceof Uint8Array ? requestBytes : new Uint8Array(requestBytes));
    const body = text ? base64Encode(framed) : framed;

    const controller = new AbortController();
    let abortedBy = null; // 'deadline' | 'cancel'
    let reader = null;
    const abort = (why) => {
      abortedBy ??= why;
      controller.abort();
      // Also stop the body itself, whatever the fetch implementation does with the signal.
      if (reader) reader.cancel().catch(() => {});
    };
    const onAbort = () => abort('cancel');
    if (signal) {
      if (signal.aborted) throw new GrpcError(StatusCode.CANCELLED, 'call cancelled before it started');
      signal.addEventListener('abort', onAbort, { once: true });
    }
    let timer = null;
    if (headers['grpc-timeout']) {
      timer = setTimeout(() => abort('deadline'), deadlineMs);
    }
    const abortError = (cause) => abortedBy === 'deadline'
      ? new GrpcError(StatusCode.DEADLINE_EXCEEDED, `deadline exceeded (${deadlineMs} ms)`, { cause })
      : new GrpcError(StatusCode.CANCELLED, 'call cancelled', { cause });

    let finished = false;
    try {
      let response;
      try {
        response = await this.fetch(`${this.baseUrl}${path}`, {
          method: 'POST',
          headers,
          body,
          signal: controller.signal,
          mode: 'cors',
          cache: 'no-store',
          ...(this.credentials ? { credentials: this.credentials } : {}),
        });
      } catch (err) {
        if (abortedBy) throw abortError(err);
        throw new GrpcError(StatusCode.UNAVAILABLE,
          `cannot reach ${this.baseUrl} (${err && err.message ? err.message : err}): the proxy is down or unreachable, or the browser refused the response (CORS)`,
          { cause: err });
      }

      const responseHeaders = headersToObject(response.headers);
      const httpStatus = response.status;
      if (httpStatus < 200 || httpStatus > 299) {
        // As the grpc-web JS client: the HTTP status decides the code; grpc-message explains.
        const detail = responseHeaders['grpc-message'];
        const statusLine = `HTTP ${httpStatus}${response.statusText ? ` ${response.statusText}` : ''}`;
        throw new GrpcError(httpStatusToCode(httpStatus), detail ? percentDecode(detail) : statusLine,
          { headers: responseHeaders, httpStatus });
      }
      const contentType = (responseHeaders['content-type'] || '').toLowerCase();
      if (!contentType.startsWith('application/grpc')) {
        throw new GrpcError(StatusCode.UNKNOWN, 'Unknown Content-type received.', { headers: responseHeaders, httpStatus });
      }
      const textResponse = contentType.startsWith('application/grpc-web-text');
      yield { headers: responseHeaders };

      const base64 = textResponse ? new Base64StreamDecoder() : null;
      const frames = new FrameParser();
      let trailers = null;
      const fail = (code, message) => new GrpcError(code, message, { headers: responseHeaders, trailers: trailers || {}, httpStatus });

      if (response.body) {
        reader = response.body.getReader();
        for (;;) {
          let chunk;
          try {
            chunk = await reader.read();
          } catch (err) {
            if (abortedBy) throw abortError(err);
            throw new GrpcError(StatusCode.UNAVAILABLE, `connection lost while reading the response (${err && err.message ? err.message : err})`,
              { headers: responseHeaders, httpStatus, cause: err });
          }
          if (abortedBy) throw abortError();
          if (chunk.done) break;
          let bytes = chunk.value;
          if (base64) {
            try {
              bytes = base64.push(bytes);
            } catch (err) {
              throw fail(StatusCode.INTERNAL, `bad base64 in the text response: ${err.message}`);
            }
          }
          for (const frame of frames.push(bytes)) {
            if (trailers) throw fail(StatusCode.INTERNAL, 'data after the trailer frame');
            if (frame.flag === FRAME_TRAILER) {
              try {
                trailers = parseTrailers(frame.payload);
              } catch (err) {
                throw fail(StatusCode.INTERNAL, err.message);
              }
            } else if (frame.flag === FRAME_DATA) {
              yield { message: frame.payload };
            } else {
              throw fail(StatusCode.INTERNAL, `unsupported frame flag 0x${frame.flag.toString(16).padStart(2, '0')} (compressed messages are not supported)`);
            }
          }
        }
      }
      if (base64) {
        try {
          base64.finish();
        } catch (err) {
          throw fail(StatusCode.INTERNAL, `bad base64 in the text response: ${err.message}`);
        }
      }
      if (frames.pending) throw fail(StatusCode.INTERNAL, `the response ended inside a frame (${frames.pending} bytes)`);

      // A trailers-only response keeps its status in the headers.
      const statusSource = trailers || responseHeaders;
      trailers = trailers || (responseHeaders['grpc-status'] !== undefined ? responseHeaders : {});
      const rawStatus = statusSource['grpc-status'];
      if (rawStatus === undefined) {
        throw fail(StatusCode.UNKNOWN, `the response carried no grpc-status (HTTP ${httpStatus})`);
      }
      const status = /^\d+$/.test(rawStatus) ? Number(rawStatus) : StatusCode.UNKNOWN;
      const statusMessage = percentDecode(statusSource['grpc-message'] || '');
      if (status !== StatusCode.OK) throw fail(status, statusMessage || (/^\d+$/.test(rawStatus) ? '' : `bad grpc-status ${JSON.stringify(rawStatus)}`));
      finished = true;
      return { status, statusMessage, trailers, httpStatus };
    } finally {
      if (timer !== null) clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', onAbort);
      if (!finished) abort('cancel');
    }
  }
}

/** A server-streaming call in progress. Async-iterable (once) over the reply messages. */
export class ServerStream {
  constructor(events, cancelController, { onHeaders, onMessage, onEnd, onError } = {}) {
    this.events = events;
    this.cancelController = cancelController;
    this.onHeaders = onHeaders;
    /** Response headers, once they have arrived. */
    this.headers = null;
    /** Trailers, status and status message, once the call has ended. */
    this.trailers = null;
    this.status = null;
    this.statusMessage = null;
    /** The GrpcError the call failed with, if it did. */
    this.error = null;
    this.iterating = false;
    if (onMessage || onEnd || onError) this.#runCallbacks(onMessage, onEnd, onError);
  }

  async #runCallbacks(onMessage, onEnd, onError) {
    try {
      for await (const message of this) onMessage?.(message);
    } catch (err) {
      if (onError) onError(err);
      else console.error(err);
      return;
    }
    onEnd?.({ status: this.status, statusMessage: this.statusMessage, headers: this.headers, trailers: this.trailers });
  }

  async *[Symbol.asyncIterator]() {
    if (this.iterating) throw new Error('a ServerStream can be iterated only once');
    this.iterating = true;
    try {
      for (;;) {
        const { value, done } = await this.events.next();
        if (done) {
          this.status = value.status;
          this.statusMessage = value.statusMessage;
          this.trailers = value.trailers;
          return;
        }
        if (value.headers) {
          this.headers = value.headers;
          this.onHeaders?.(value.headers);
        } else {
          yield value.message;
        }
      }
    } catch (err) {
      if (err instanceof GrpcError) {
        this.error = err;
        this.status = err.code;
        this.statusMessage = err.message;
        this.trailers = err.trailers;
      }
      throw err;
    } finally {
      await this.events.return(undefined);
    }
  }

  /** Cancels the call: the loop (or onError) gets CANCELLED (1). */
  cancel() {
    this.cancelController.abort();
  }
}
