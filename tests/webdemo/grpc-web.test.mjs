// Unit tests of web-demo/grpc-web.js with a fake fetch: the bytes and headers it sends, how it reads
// binary and text responses split anywhere, trailers, and how it maps failures to gRPC codes.
// Run: node --test tests/webdemo/

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  Base64StreamDecoder, FrameParser, GrpcError, GrpcWebClient, StatusCode, base64Decode, base64Encode,
  codeName, concatBytes, decodeBinaryMetadata, encodeMetadata, encodeTimeout, frameMessage,
  httpStatusToCode, parseTrailers, percentDecode, percentEncode, trailerFrame,
} from '../../web-demo/grpc-web.js';

const enc = new TextEncoder();
const bytes = (...xs) => Uint8Array.from(xs);
const ascii = (s) => enc.encode(s);

/** Deterministic pseudo-random bytes. */
function randomBytes(n, seed = 1) {
  const out = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    out[i] = x >> 16;
  }
  return out;
}

/** `data` cut at the given offsets. */
function splitAt(data, cuts) {
  const parts = [];
  let last = 0;
  for (const c of cuts) {
    parts.push(data.slice(last, c));
    last = c;
  }
  parts.push(data.slice(last));
  return parts;
}

/** A body stream that hands out `chunks` one read at a time (then, optionally, fails). */
function bodyStream(chunks, { failWith } = {}) {
  let i = 0;
  return new ReadableStream({
    pull(controller) {
      if (i < chunks.length) controller.enqueue(chunks[i++]);
      else if (failWith) controller.error(failWith);
      else controller.close();
    },
  });
}

/**
 * A fake fetch answering with one response; records the request. `chunks` are the body pieces.
 */
function fakeFetch({ status = 200, headers = {}, chunks = [], failWith, reject } = {}) {
  const calls = [];
  const fn = async (url, init) => {
    calls.push({ url, init, headers: new Headers(init.headers) });
    if (reject) throw reject;
    const h = { 'content-type': 'application/grpc-web+proto', ...headers };
    return new Response(chunks.length || failWith ? bodyStream(chunks, { failWith }) : null, { status, headers: h });
  };
  fn.calls = calls;
  return fn;
}

/** A fake fetch that never answers until its signal aborts (then rejects as fetch does). */
function hangingFetch() {
  const calls = [];
  const fn = (url, init) => new Promise((resolve, reject) => {
    calls.push({ url, init });
    init.signal.addEventListener('abort', () => reject(new DOMException('This operation was aborted', 'AbortError')));
  });
  fn.calls = calls;
  return fn;
}

const OK_TRAILERS = trailerFrame({ 'grpc-status': '0' });

async function rejects(promise, check) {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof GrpcError, `expected a GrpcError, got ${err && err.stack}`);
    check(err);
    return err;
  }
  assert.fail('the call did not fail');
}

describe('status codes', () => {
  test('HTTP status to gRPC code, as the grpc-web JS client (notes section 8, X3)', () => {
    const table = {
      200: 0, 400: 3, 401: 16, 403: 7, 404: 5, 409: 10, 412: 9, 429: 8, 499: 1, 500: 2, 501: 12, 503: 14, 504: 4,
      // everything else is UNKNOWN, including the rows only the gRPC spec's table has
      431: 2, 502: 2, 418: 2, 302: 2, 0: 2,
    };
    for (const [http, code] of Object.entries(table)) assert.equal(httpStatusToCode(Number(http)), code, `HTTP ${http}`);
  });

  test('code names', () => {
    assert.equal(codeName(0), 'OK');
    assert.equal(codeName(4), 'DEADLINE_EXCEEDED');
    assert.equal(codeName(14), 'UNAVAILABLE');
    assert.equal(codeName(16), 'UNAUTHENTICATED');
    assert.equal(codeName(17), 'CODE_17');
    assert.equal(StatusCode.UNAUTHENTICATED, 16);
  });

  test('GrpcError carries code, name, message and merged metadata', () => {
    const err = new GrpcError(14, 'no healthy upstream', { headers: { a: '1', x: 'h' }, trailers: { x: 't' }, httpStatus: 503 });
    assert.equal(err.code, 14);
    assert.equal(err.codeName, 'UNAVAILABLE');
    assert.equal(err.message, 'no healthy upstream');
    assert.deepEqual(err.metadata, { a: '1', x: 't' });
    assert.equal(err.httpStatus, 503);
    assert.equal(String(err), 'UNAVAILABLE (14): no healthy upstream');
    assert.ok(err instanceof Error);
  });
});

describe('percent-decoding of grpc-message', () => {
  test('decodes %XX as UTF-8 bytes', () => {
    assert.equal(percentDecode('caf%C3%A9'), 'café');
    assert.equal(percentDecode('100%25 sure'), '100% sure');
    assert.equal(percentDecode('line%0Anext'), 'line\nnext');
    assert.equal(percentDecode('%e2%82%ac'), '€');
  });

  test('leaves what is not an escape alone and never throws', () => {
    assert.equal(percentDecode('wrong username or password'), 'wrong username or password');
    assert.equal(percentDecode('100%'), '100%');
    assert.equal(percentDecode('%zz%2'), '%zz%2');
    assert.equal(percentDecode('50%-off'), '50%-off');
    assert.equal(percentDecode('%E2%82'), '\uFFFD'); // a cut UTF-8 sequence
    assert.equal(percentDecode(undefined), '');
  });

  test('round trip with the server-side encoding', () => {
    for (const s of ['', 'plain', '100% ünïcödé ✓ \t\r\n', '%%%', 'a%2Fb']) assert.equal(percentDecode(percentEncode(s)), s);
    assert.equal(percentEncode('100% é'), '100%25 %C3%A9');
  });
});

describe('base64', () => {
  test('encode matches Buffer for every length', () => {
    for (let n = 0; n < 40; n++) {
      const data = randomBytes(n, n + 1);
      assert.equal(base64Encode(data), Buffer.from(data).toString('base64'));
      assert.deepEqual(base64Decode(base64Encode(data)), data);
    }
  });

  test('decode accepts unpadded values and several padded segments', () => {
    assert.deepEqual(base64Decode('AAEC/w'), bytes(0, 1, 2, 255));
    assert.deepEqual(base64Decode('AA==AQ==Ag=='), bytes(0, 1, 2));
    assert.deepEqual(decodeBinaryMetadata('AAEC/w=='), bytes(0, 1, 2, 255));
    assert.deepEqual(decodeBinaryMetadata('AAE, Ag'), bytes(0, 1, 2));
  });

  test('streaming decoder: concatenated padded segments, split at every byte', () => {
    const pieces = [randomBytes(7, 3), randomBytes(1, 4), randomBytes(2, 5), randomBytes(30, 6), randomBytes(3, 7)];
    const text = ascii(pieces.map(base64Encode).join(''));
    const expected = concatBytes(pieces);
    // one byte at a time
    {
      const d = new Base64StreamDecoder();
      const out = [];
      for (const b of text) out.push(d.push(bytes(b)));
      d.finish();
      assert.deepEqual(concatBytes(out), expected);
    }
    // every single cut, and every pair of cuts
    for (let i = 0; i <= text.length; i++) {
      for (let j = i; j <= text.length; j += 3) {
        const d = new Base64StreamDecoder();
        const out = splitAt(text, [i, j]).map((p) => d.push(p));
        d.finish();
        assert.deepEqual(concatBytes(out), expected, `cut at ${i}, ${j}`);
      }
    }
    // strings work too
    const d = new Base64StreamDecoder();
    assert.deepEqual(concatBytes([d.push('AAEC'), d.push('Aw'), d.push('==')]), bytes(0, 1, 2, 3));
  });

  test('streaming decoder refuses bad input', () => {
    assert.throws(() => new Base64StreamDecoder().push('AB*D'), /invalid base64 character/);
    assert.throws(() => new Base64StreamDecoder().push('AB=C'), /padding/);
    assert.throws(() => new Base64StreamDecoder().push('A==='), /invalid base64 character/);
    assert.throws(() => new Base64StreamDecoder().push('AB-_'), /invalid base64 character/);
    const d = new Base64StreamDecoder();
    d.push('AAECAw');
    assert.throws(() => d.finish(), /ended inside a 4-character group/);
  });
});

describe('frames and trailers', () => {
  test('frameMessage: flag, big-endian length, payload', () => {
    assert.deepEqual(frameMessage(bytes(9, 8, 7)), bytes(0, 0, 0, 0, 3, 9, 8, 7));
    assert.deepEqual(frameMessage(new Uint8Array(0)), bytes(0, 0, 0, 0, 0));
    const big = frameMessage(new Uint8Array(0x010203));
    assert.deepEqual(big.subarray(0, 5), bytes(0, 0, 1, 2, 3));
  });

  test('trailer frame as Envoy writes it', () => {
    const frame = trailerFrame([['grpc-status', '0'], ['grpc-message', 'ok']]);
    const text = 'grpc-status:0\r\ngrpc-message:ok\r\n';
    assert.deepEqual(frame, concatBytes([bytes(0x80, 0, 0, 0, text.length), ascii(text)]));
  });

  test('FrameParser: frames split at every byte', () => {
    const stream = concatBytes([frameMessage(ascii('first')), frameMessage(new Uint8Array(0)), frameMessage(randomBytes(300)), trailerFrame({ 'grpc-status': '0' })]);
    for (let i = 0; i <= stream.length; i++) {
      const p = new FrameParser();
      const frames = splitAt(stream, [i]).flatMap((part) => p.push(part));
      assert.equal(p.pending, 0);
      assert.deepEqual(frames.map((f) => f.flag), [0, 0, 0, 0x80], `cut at ${i}`);
      assert.deepEqual(frames[0].payload, ascii('first'));
      assert.equal(frames[1].payload.length, 0);
      assert.deepEqual(frames[2].payload, randomBytes(300));
    }
    const p = new FrameParser();
    assert.deepEqual(p.push(bytes(0, 0, 0)), []);
    assert.equal(p.pending, 3);
  });

  test('parseTrailers: key:value lines, optional space, later duplicates win', () => {
    assert.deepEqual(parseTrailers(ascii('grpc-status:0\r\ngrpc-message:ok\r\n')), { 'grpc-status': '0', 'grpc-message': 'ok' });
    assert.deepEqual(parseTrailers(ascii('Grpc-Status: 3\r\nx-k: a\r\nx-k: b\r\nx-time: 12:30\n')), { 'grpc-status': '3', 'x-k': 'b', 'x-time': '12:30' });
    assert.deepEqual(parseTrailers(new Uint8Array(0)), {});
    assert.throws(() => parseTrailers(ascii('no colon here\r\n')), /malformed/);
  });
});

describe('request headers', () => {
  test('grpc-timeout', () => {
    assert.equal(encodeTimeout(1500), '1500m');
    assert.equal(encodeTimeout(0.3), '1m');
    assert.equal(encodeTimeout(99999999), '99999999m');
    assert.equal(encodeTimeout(100000000), '100000S');
    assert.equal(encodeTimeout(1e13), '2777778H');
    assert.equal(encodeTimeout(1e18), '99999999H');
  });

  test('metadata: lower-case keys, -bin values base64, reserved and bad keys refused', () => {
    assert.deepEqual(encodeMetadata({ Authorization: 'Bearer x', 'trace-bin': bytes(0, 1, 2, 255), 'x-list': ['a', 'b'] }),
      { authorization: 'Bearer x', 'trace-bin': 'AAEC/w==', 'x-list': 'a, b' });
    assert.deepEqual(encodeMetadata({ 'k-bin': [bytes(1), 'AAA='] }), { 'k-bin': 'AQ==,AAA=' });
    assert.throws(() => encodeMetadata({ 'grpc-timeout': '1S' }), /reserved/);
    assert.throws(() => encodeMetadata({ 'bad key': 'x' }), /invalid metadata key/);
  });

  test('binary mode: headers, framed body, URL', async () => {
    const fetch = fakeFetch({ chunks: [frameMessage(ascii('reply')), OK_TRAILERS] });
    const client = new GrpcWebClient('http://proxy.test:8080/', { fetch, metadata: { 'x-app': 'demo' } });
    const result = await client.unary('/demo.User/login', ascii('req'), { metadata: { 'trace-bin': bytes(1, 2, 3) }, deadlineMs: 1500 });
    const [call] = fetch.calls;
    assert.equal(call.url, 'http://proxy.test:8080/demo.User/login');
    assert.equal(call.init.method, 'POST');
    const h = call.headers;
    assert.equal(h.get('content-type'), 'application/grpc-web+proto');
    assert.equal(h.get('x-grpc-web'), '1');
    assert.equal(h.get('x-user-agent'), 'grpc-web-javascript/0.1');
    assert.equal(h.get('grpc-timeout'), '1500m');
    assert.equal(h.get('accept'), null);
    assert.equal(h.get('x-app'), 'demo');
    assert.equal(h.get('trace-bin'), 'AQID');
    assert.deepEqual(new Uint8Array(call.init.body), frameMessage(ascii('req')));
    assert.deepEqual(result.message, ascii('reply'));
    assert.equal(result.status, 0);
    assert.equal(result.statusMessage, '');
    assert.deepEqual(result.trailers, { 'grpc-status': '0' });
  });

  test('text mode: base64 body in one padded segment, text content-type and accept', async () => {
    const fetch = fakeFetch({ headers: { 'content-type': 'application/grpc-web-text+proto' }, chunks: [ascii(base64Encode(frameMessage(ascii('hi')))), ascii(base64Encode(OK_TRAILERS))] });
    const client = new GrpcWebClient('http://p', { mode: 'text', fetch });
    const result = await client.unary('/s/m', ascii('hello'));
    const h = fetch.calls[0].headers;
    assert.equal(h.get('content-type'), 'application/grpc-web-text');
    assert.equal(h.get('accept'), 'application/grpc-web-text');
    assert.equal(h.get('x-grpc-web'), '1');
    assert.equal(h.get('x-user-agent'), 'grpc-web-javascript/0.1');
    assert.equal(h.get('grpc-timeout'), null);
    assert.equal(fetch.calls[0].init.body, base64Encode(frameMessage(ascii('hello'))));
    assert.deepEqual(result.message, ascii('hi'));
  });

  test('a bad mode is refused', () => {
    assert.throws(() => new GrpcWebClient('http://p', { mode: 'json' }), /mode/);
  });
});

describe('responses', () => {
  const message = randomBytes(100, 9);
  const trailers = trailerFrame([['grpc-status', '0'], ['grpc-message', 'fine'], ['x-replica', 'r2']]);
  const binaryBody = concatBytes([frameMessage(message), trailers]);

  test('binary body split at every byte', async () => {
    for (let i = 0; i <= binaryBody.length; i++) {
      const client = new GrpcWebClient('http://p', { fetch: fakeFetch({ chunks: splitAt(binaryBody, [i]) }) });
      const result = await client.unary('/s/m', ascii('x'));
      assert.deepEqual(result.message, message, `cut at ${i}`);
      assert.deepEqual(result.trailers, { 'grpc-status': '0', 'grpc-message': 'fine', 'x-replica': 'r2' });
    }
    const oneByteAtATime = [...binaryBody].map((b) => bytes(b));
    const client = new GrpcWebClient('http://p', { fetch: fakeFetch({ chunks: oneByteAtATime }) });
    assert.deepEqual((await client.unary('/s/m', ascii('x'))).message, message);
  });

  test('text body (a padded segment per frame) split at every byte, and one byte at a time', async () => {
    const text = ascii(base64Encode(frameMessage(message)) + base64Encode(trailers));
    const headers = { 'content-type': 'application/grpc-web-text+proto' };
    for (let i = 0; i <= text.length; i++) {
      for (const j of [i, Math.min(text.length, i + 1), Math.min(text.length, i + 5)]) {
        const client = new GrpcWebClient('http://p', { mode: 'text', fetch: fakeFetch({ headers, chunks: splitAt(text, [i, j]) }) });
        const result = await client.unary('/s/m', ascii('x'));
        assert.deepEqual(result.message, message, `cuts at ${i}, ${j}`);
        assert.equal(result.trailers['x-replica'], 'r2');
      }
    }
    const client = new GrpcWebClient('http://p', { mode: 'text', fetch: fakeFetch({ headers, chunks: [...text].map((b) => bytes(b)) }) });
    assert.deepEqual((await client.unary('/s/m', ascii('x'))).message, message);
  });

  test('the body is decoded by the response content-type (binary reply to a text request)', async () => {
    const client = new GrpcWebClient('http://p', { mode: 'text', fetch: fakeFetch({ chunks: [binaryBody] }) });
    assert.deepEqual((await client.unary('/s/m', ascii('x'))).message, message);
  });

  test('trailers-only response: status in the headers, empty body', async () => {
    const fetch = fakeFetch({ headers: { 'grpc-status': '16', 'grpc-message': 'wrong username or password', 'x-replica': 'r3' } });
    const err = await rejects(new GrpcWebClient('http://p', { fetch }).unary('/demo.User/login', ascii('x')), (e) => {
      assert.equal(e.code, 16);
      assert.equal(e.codeName, 'UNAUTHENTICATED');
      assert.equal(e.message, 'wrong username or password');
      assert.equal(e.metadata['x-replica'], 'r3');
      assert.equal(e.httpStatus, 200);
    });
    assert.equal(String(err), 'UNAUTHENTICATED (16): wrong username or password');
  });

  test('trailers-only OK with no message: Incomplete response', async () => {
    const fetch = fakeFetch({ headers: { 'grpc-status': '0' } });
    await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x')), (e) => {
      assert.equal(e.code, StatusCode.UNKNOWN);
      assert.equal(e.message, 'Incomplete response');
    });
  });

  test('error status in the trailer frame, grpc-message percent-decoded, later duplicate wins', async () => {
    const tf = trailerFrame([['grpc-status', '3'], ['grpc-status', '9'], ['grpc-message', percentEncode('not now: 100% busy ✗')]]);
    const fetch = fakeFetch({ chunks: [frameMessage(ascii('partial')), tf] });
    await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x')), (e) => {
      assert.equal(e.code, 9);
      assert.equal(e.codeName, 'FAILED_PRECONDITION');
      assert.equal(e.message, 'not now: 100% busy ✗');
    });
  });

  test('the trailer frame wins over grpc-status in headers', async () => {
    const fetch = fakeFetch({ headers: { 'grpc-status': '13' }, chunks: [frameMessage(ascii('m')), OK_TRAILERS] });
    const result = await new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x'));
    assert.equal(result.status, 0);
  });

  test('non-2xx: the code comes from the HTTP status, grpc-message is the message', async () => {
    const cases = [
      { status: 503, headers: { 'grpc-status': '14', 'grpc-message': 'no healthy upstream' }, code: 14, message: 'no healthy upstream' },
      // X3: 504 is DEADLINE_EXCEEDED to JS clients even though the header says 14
      { status: 504, headers: { 'grpc-status': '14', 'grpc-message': 'upstream request timeout' }, code: 4, message: 'upstream request timeout' },
      { status: 400, headers: { 'grpc-status': '13', 'grpc-message': 'Bad gRPC-web request, invalid base64 data.' }, code: 3, message: 'Bad gRPC-web request, invalid base64 data.' },
      { status: 404, headers: {}, code: 5, message: 'HTTP 404' },
      { status: 403, headers: { 'grpc-status': '7', 'grpc-message': 'reflection%20is off' }, code: 7, message: 'reflection is off' },
      { status: 502, headers: {}, code: 2, message: 'HTTP 502' },
    ];
    for (const c of cases) {
      const fetch = fakeFetch({ status: c.status, headers: c.headers });
      await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x')), (e) => {
        assert.equal(e.code, c.code, `HTTP ${c.status}`);
        assert.ok(e.message.startsWith(c.message), `HTTP ${c.status}: ${e.message}`);
        assert.equal(e.httpStatus, c.status);
        if (c.headers['grpc-status']) assert.equal(e.metadata['grpc-status'], c.headers['grpc-status']);
      });
    }
  });

  test('2xx with a content-type that is not gRPC: UNKNOWN "Unknown Content-type received."', async () => {
    const fetch = fakeFetch({ headers: { 'content-type': 'text/html' }, chunks: [ascii('<html>')] });
    await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x')), (e) => {
      assert.equal(e.code, 2);
      assert.equal(e.message, 'Unknown Content-type received.');
    });
  });

  test('no grpc-status anywhere: UNKNOWN', async () => {
    const fetch = fakeFetch({ chunks: [frameMessage(ascii('m'))] });
    await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x')), (e) => {
      assert.equal(e.code, 2);
      assert.match(e.message, /no grpc-status/);
    });
  });

  test('malformed bodies: INTERNAL', async () => {
    const bodies = [
      [concatBytes([frameMessage(ascii('m')), bytes(0, 0, 0, 9, 9, 1)]), /ended inside a frame/],
      [concatBytes([frameMessage(ascii('m'), 0x01), OK_TRAILERS]), /compressed/],
      [concatBytes([frameMessage(ascii('m')), OK_TRAILERS, frameMessage(ascii('late'))]), /after the trailer frame/],
      [concatBytes([frameMessage(ascii('m')), frameMessage(ascii('bad trailer'), 0x80)]), /malformed trailer/],
    ];
    for (const [body, pattern] of bodies) {
      await rejects(new GrpcWebClient('http://p', { fetch: fakeFetch({ chunks: [body] }) }).unary('/s/m', ascii('x')), (e) => {
        assert.equal(e.code, StatusCode.INTERNAL);
        assert.match(e.message, pattern);
      });
    }
    const textHeaders = { 'content-type': 'application/grpc-web-text+proto' };
    for (const body of ['AAAA*AAA', 'AAAAAB']) {
      const fetch = fakeFetch({ headers: textHeaders, chunks: [ascii(body)] });
      await rejects(new GrpcWebClient('http://p', { mode: 'text', fetch }).unary('/s/m', ascii('x')), (e) => {
        assert.equal(e.code, StatusCode.INTERNAL);
        assert.match(e.message, /base64/);
      });
    }
  });

  test('two messages on a unary call: INTERNAL', async () => {
    const fetch = fakeFetch({ chunks: [frameMessage(ascii('a')), frameMessage(ascii('b')), OK_TRAILERS] });
    await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x')), (e) => assert.equal(e.code, 13));
  });
});

describe('network failures, deadlines, cancellation', () => {
  test('fetch rejects (network down, CORS refusal): UNAVAILABLE with a readable message', async () => {
    const fetch = fakeFetch({ reject: new TypeError('Failed to fetch') });
    await rejects(new GrpcWebClient('http://127.0.0.1:9', { fetch }).unary('/s/m', ascii('x')), (e) => {
      assert.equal(e.code, 14);
      assert.equal(e.codeName, 'UNAVAILABLE');
      assert.match(e.message, /cannot reach http:\/\/127\.0\.0\.1:9 \(Failed to fetch\)/);
      assert.equal(e.httpStatus, 0);
      assert.ok(e.cause instanceof TypeError);
    });
  });

  test('connection lost in the middle of the body: UNAVAILABLE', async () => {
    const fetch = fakeFetch({ chunks: [frameMessage(ascii('m'))], failWith: new TypeError('network error') });
    await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x')), (e) => {
      assert.equal(e.code, 14);
      assert.match(e.message, /connection lost/);
    });
  });

  test('deadline: the client gives up on its own with DEADLINE_EXCEEDED', async () => {
    const fetch = hangingFetch();
    const started = Date.now();
    await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x'), { deadlineMs: 80 }), (e) => {
      assert.equal(e.code, StatusCode.DEADLINE_EXCEEDED);
      assert.match(e.message, /deadline exceeded \(80 ms\)/);
    });
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 70 && elapsed < 2000, `gave up after ${elapsed} ms`);
    assert.equal(new Headers(fetch.calls[0].init.headers).get('grpc-timeout'), '80m');
  });

  test('deadline while the body is being read', async () => {
    let pulls = 0;
    const fetch = async (url, init) => new Response(new ReadableStream({
      pull(controller) {
        if (pulls++ === 0) controller.enqueue(frameMessage(ascii('first')));
        return new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError'))));
      },
    }), { headers: { 'content-type': 'application/grpc-web+proto' } });
    const stream = new GrpcWebClient('http://p', { fetch }).serverStream('/s/m', ascii('x'), { deadlineMs: 60 });
    const got = [];
    await rejects((async () => { for await (const m of stream) got.push(m); })(), (e) => assert.equal(e.code, 4));
    assert.equal(got.length, 1);
    assert.equal(stream.status, 4);
  });

  test('a deadline of zero fails at once', async () => {
    await rejects(new GrpcWebClient('http://p', { fetch: hangingFetch() }).unary('/s/m', ascii('x'), { deadlineMs: 0 }), (e) => assert.equal(e.code, 4));
  });

  test('AbortSignal cancels: CANCELLED', async () => {
    const controller = new AbortController();
    const fetch = hangingFetch();
    const call = new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x'), { signal: controller.signal, deadlineMs: 5000 });
    setTimeout(() => controller.abort(), 20);
    await rejects(call, (e) => {
      assert.equal(e.code, StatusCode.CANCELLED);
      assert.equal(e.codeName, 'CANCELLED');
    });
    const already = new AbortController();
    already.abort();
    await rejects(new GrpcWebClient('http://p', { fetch }).unary('/s/m', ascii('x'), { signal: already.signal }), (e) => assert.equal(e.code, 1));
  });
});

describe('server streaming', () => {
  const frames = [frameMessage(ascii('one')), frameMessage(ascii('two')), frameMessage(ascii('three'))];

  test('async iterator: every message, then status and trailers', async () => {
    const body = concatBytes([...frames, trailerFrame({ 'grpc-status': '0', 'x-done': 'yes' })]);
    const fetch = fakeFetch({ headers: { 'x-replica': 'r1' }, chunks: splitAt(body, [3, 9, 17, 30]) });
    const stream = new GrpcWebClient('http://p', { fetch }).serverStream('/demo.Echo/ServerStream', ascii('x'));
    const got = [];
    for await (const m of stream) got.push(new TextDecoder().decode(m));
    assert.deepEqual(got, ['one', 'two', 'three']);
    assert.equal(stream.status, 0);
    assert.equal(stream.headers['x-replica'], 'r1');
    assert.equal(stream.trailers['x-done'], 'yes');
  });

  test('text mode stream', async () => {
    const text = ascii([...frames, OK_TRAILERS].map(base64Encode).join(''));
    const fetch = fakeFetch({ headers: { 'content-type': 'application/grpc-web-text+proto' }, chunks: splitAt(text, [1, 2, 7, 11, 20]) });
    const got = [];
    for await (const m of new GrpcWebClient('http://p', { mode: 'text', fetch }).serverStream('/s/m', ascii('x'))) got.push(new TextDecoder().decode(m));
    assert.deepEqual(got, ['one', 'two', 'three']);
  });

  test('error after some messages', async () => {
    const body = concatBytes([frames[0], trailerFrame({ 'grpc-status': '10', 'grpc-message': 'aborted%21' })]);
    const stream = new GrpcWebClient('http://p', { fetch: fakeFetch({ chunks: [body] }) }).serverStream('/s/m', ascii('x'));
    const got = [];
    await rejects((async () => { for await (const m of stream) got.push(m); })(), (e) => {
      assert.equal(e.code, 10);
      assert.equal(e.message, 'aborted!');
    });
    assert.equal(got.length, 1);
    assert.equal(stream.error.code, 10);
  });

  test('callbacks', async () => {
    const body = concatBytes([...frames, OK_TRAILERS]);
    const events = [];
    await new Promise((resolve) => {
      new GrpcWebClient('http://p', { fetch: fakeFetch({ chunks: [body] }) }).serverStream('/s/m', ascii('x'), {
        onHeaders: (h) => events.push(`headers ${h['content-type']}`),
        onMessage: (m) => events.push(new TextDecoder().decode(m)),
        onEnd: ({ status }) => { events.push(`end ${status}`); resolve(); },
        onError: (e) => { events.push(`error ${e}`); resolve(); },
      });
    });
    assert.deepEqual(events, ['headers application/grpc-web+proto', 'one', 'two', 'three', 'end 0']);

    const failed = await new Promise((resolve) => {
      new GrpcWebClient('http://p', { fetch: fakeFetch({ status: 503, headers: { 'grpc-message': 'no healthy upstream' } }) })
        .serverStream('/s/m', ascii('x'), { onMessage: () => {}, onEnd: () => resolve(null), onError: resolve });
    });
    assert.equal(String(failed), 'UNAVAILABLE (14): no healthy upstream');
  });

  test('leaving the loop early aborts the request; cancel() gives CANCELLED', async () => {
    let signal;
    const fetch = async (url, init) => {
      signal = init.signal;
      let i = 0;
      return new Response(new ReadableStream({
        pull(controller) {
          controller.enqueue(frameMessage(ascii(`m${i++}`)));
        },
      }), { headers: { 'content-type': 'application/grpc-web+proto' } });
    };
    const client = new GrpcWebClient('http://p', { fetch });
    for await (const m of client.serverStream('/s/m', ascii('x'))) {
      assert.deepEqual(m, ascii('m0'));
      break;
    }
    assert.equal(signal.aborted, true);

    const stream = client.serverStream('/s/m', ascii('x'));
    const got = [];
    await rejects((async () => {
      for await (const m of stream) {
        got.push(m);
        if (got.length === 3) stream.cancel();
      }
    })(), (e) => assert.equal(e.code, StatusCode.CANCELLED));
    assert.ok(got.length >= 3 && got.length < 10);
  });
});
