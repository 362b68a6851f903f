// Unit tests of web-demo/demo-user.js (the demo.User messages in protobuf wire format, by hand) and
// of the page helpers in web-demo/app.js that do not need a browser.
// Run: node --test tests/webdemo/

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  ProtoReader, ProtoWriter, UserClient, UserMethods, WireType, decodeLoginReq, decodeLoginRes,
  decodeLogoutReq, decodeLogoutRes, encodeLoginReq, encodeLoginRes, encodeLogoutReq, encodeLogoutRes,
  replicaOf,
} from '../../web-demo/demo-user.js';
import { GrpcError } from '../../web-demo/grpc-web.js';
import { defaultProxy, describeError } from '../../web-demo/app.js';

const hex = (b) => Buffer.from(b).toString('hex');
const fromHex = (h) => Uint8Array.from(Buffer.from(h.replace(/\s+/g, ''), 'hex'));
const concat = (...parts) => Uint8Array.from(parts.flatMap((p) => [...p]));

describe('encoding', () => {
  test('LoginReq bytes are those protoc would write', () => {
    // field 1 (tag 0x0a) "demo", field 2 (tag 0x12) "demo123"
    assert.equal(hex(encodeLoginReq({ username: 'demo', password: 'demo123' })), '0a0464656d6f120764656d6f313233');
    assert.equal(hex(encodeLogoutReq({ username: 'admin' })), '0a0561646d696e');
  });

  test('proto3: empty strings are not written', () => {
    assert.equal(encodeLoginReq({}).length, 0);
    assert.equal(hex(encodeLoginReq({ username: '', password: 'x' })), '120178');
    assert.equal(encodeLogoutRes({ code: '', res: '', replica: '' }).length, 0);
  });

  test('lengths of 128 bytes and more take a two-byte varint', () => {
    const long = 'é'.repeat(100); // 200 bytes of UTF-8
    const bytes = encodeLogoutReq({ username: long });
    assert.equal(hex(bytes.subarray(0, 3)), '0ac801');
    assert.equal(decodeLogoutReq(bytes).username, long);
  });

  test('varints', () => {
    const w = new ProtoWriter();
    for (const v of [0, 1, 127, 128, 300, 2 ** 31, 2 ** 53 - 1]) w.varint(v);
    w.varint(-1); // int32 -1: ten bytes
    const r = new ProtoReader(w.finish());
    for (const v of [0, 1, 127, 128, 300, 2 ** 31, 2 ** 53 - 1]) assert.equal(r.varint(), v);
    const start = r.pos;
    r.skip(WireType.VARINT);
    assert.equal(r.pos - start, 10);
    assert.ok(r.done);
    assert.equal(hex(new ProtoWriter().varint(300).finish()), 'ac02');
  });
});

describe('round trips', () => {
  const samples = [
    [encodeLoginReq, decodeLoginReq, { username: 'demo', password: 'demo123' }],
    [encodeLoginReq, decodeLoginReq, { username: 'ünï ✓', password: '' }],
    [encodeLoginRes, decodeLoginRes, { code: '0', res: 'welcome, demo', replica: 'r2' }],
    [encodeLoginRes, decodeLoginRes, { code: '', res: '', replica: '' }],
    [encodeLogoutReq, decodeLogoutReq, { username: 'admin' }],
    [encodeLogoutRes, decodeLogoutRes, { code: '0', res: 'goodbye, admin', replica: 'r3' }],
  ];
  for (const [encode, decode, value] of samples) {
    test(`${encode.name} / ${decode.name} ${JSON.stringify(value)}`, () => {
      assert.deepEqual(decode(encode(value)), value);
    });
  }
});

describe('decoding', () => {
  // Unknown fields of every wire type, as protoc would write them.
  const unknownVarint = fromHex('20 96 01'); // field 4, varint 150
  const unknownMaxVarint = fromHex('28 ffffffffffffffffff01'); // field 5, 10-byte varint
  const unknownFixed64 = fromHex('31 0102030405060708'); // field 6, fixed64
  const unknownBytes = fromHex('3a 03 616263'); // field 7, "abc"
  const unknownGroup = fromHex('43 08 01 4b 50 02 4c 44'); // group 8 { 1: 1, group 9 { 10: 2 } }
  const unknownFixed32 = fromHex('4d 01020304'); // field 9, fixed32
  const unknowns = [unknownVarint, unknownMaxVarint, unknownFixed64, unknownBytes, unknownGroup, unknownFixed32];

  test('unknown fields of every wire type are skipped, wherever they are', () => {
    const code = fromHex('0a 01 30'); // code "0"
    const res = fromHex('12 05 68656c6c6f'); // res "hello"
    const replica = fromHex('1a 02 7232'); // replica "r2"
    for (const u of unknowns) {
      for (const bytes of [concat(u, code, res, replica), concat(code, u, res, replica), concat(code, res, replica, u)]) {
        assert.deepEqual(decodeLoginRes(bytes), { code: '0', res: 'hello', replica: 'r2' }, hex(bytes));
        assert.deepEqual(decodeLogoutRes(bytes), { code: '0', res: 'hello', replica: 'r2' });
      }
    }
    assert.deepEqual(decodeLoginRes(concat(...unknowns)), { code: '', res: '', replica: '' });
  });

  test('a known field number with another wire type is skipped; the last value wins', () => {
    const bytes = concat(fromHex('08 05'), fromHex('1a 02 7231'), fromHex('1a 02 7233')); // 1: varint 5; replica r1, r3
    assert.deepEqual(decodeLoginRes(bytes), { code: '', res: '', replica: 'r3' });
  });

  test('fields in any order', () => {
    assert.deepEqual(decodeLoginReq(fromHex('12 01 70 0a 01 75')), { username: 'u', password: 'p' });
  });

  test('broken input throws', () => {
    const broken = {
      'truncated length': '0a 05 6162',
      'truncated varint': '20 96',
      'truncated fixed64': '31 0102',
      'truncated fixed32': '4d 01',
      'unterminated group': '43 08 01',
      'mismatched end group': '43 08 01 54',
      'stray end group': '44',
      'wire type 6': '0e',
      'wire type 7': '0f',
      'field number 0': '02 00',
      'varint of 11 bytes': '20 ffffffffffffffffffff01',
    };
    for (const [what, h] of Object.entries(broken)) assert.throws(() => decodeLoginRes(fromHex(h)), Error, what);
  });
});

describe('UserClient', () => {
  function fakeGrpc(reply, { headers = {}, trailers = {} } = {}) {
    const calls = [];
    return {
      calls,
      async unary(path, bytes, options) {
        calls.push({ path, bytes, options });
        return { message: reply, headers, trailers, status: 0, statusMessage: '' };
      },
    };
  }

  test('login: method path, request bytes, reply and replica', async () => {
    const grpc = fakeGrpc(encodeLoginRes({ code: '0', res: 'welcome, demo', replica: 'r2' }));
    const result = await new UserClient(grpc).login({ username: 'demo', password: 'demo123' }, { deadlineMs: 10 });
    assert.equal(grpc.calls[0].path, '/demo.User/login');
    assert.deepEqual(decodeLoginReq(grpc.calls[0].bytes), { username: 'demo', password: 'demo123' });
    assert.deepEqual(grpc.calls[0].options, { deadlineMs: 10 });
    assert.equal(result.reply.res, 'welcome, demo');
    assert.equal(result.replica, 'r2');
  });

  test('logout, replica from x-replica when the reply has none', async () => {
    const grpc = fakeGrpc(encodeLogoutRes({ code: '0', res: 'goodbye, demo' }), { headers: { 'x-replica': 'r1' } });
    const result = await new UserClient(grpc).logout({ username: 'demo' });
    assert.equal(grpc.calls[0].path, UserMethods.logout);
    assert.equal(result.replica, 'r1');
  });

  test('replicaOf: reply, then trailers, then headers', () => {
    assert.equal(replicaOf({ replica: 'a' }, { headers: { 'x-replica': 'c' }, trailers: { 'x-replica': 'b' } }), 'a');
    assert.equal(replicaOf({ replica: '' }, { headers: { 'x-replica': 'c' }, trailers: { 'x-replica': 'b' } }), 'b');
    assert.equal(replicaOf({}, { headers: { 'x-replica': 'c' } }), 'c');
    assert.equal(replicaOf(null), '');
  });
});

describe('page helpers (app.js)', () => {
  const loc = (href) => new URL(href);

  test('defaultProxy: ?proxy= wins, else the page origin, else the default port', () => {
    assert.equal(defaultProxy(loc('http://127.0.0.1:5000/index.html?proxy=http://127.0.0.1:8080')), 'http://127.0.0.1:8080');
    assert.equal(defaultProxy(loc('http://127.0.0.1:8080/')), 'http://127.0.0.1:8080');
    assert.equal(defaultProxy(loc('https://demo.example/app/?x=1')), 'https://demo.example');
    assert.equal(defaultProxy(loc('file:///home/u/web-demo/index.html')), 'http://127.0.0.1:8080');
  });

  test('describeError: code, message with the HTTP status, replica', () => {
    assert.deepEqual(describeError(new GrpcError(16, 'wrong username or password', { headers: { 'x-replica': 'r1' }, httpStatus: 200 })),
      { code: 16, message: 'wrong username or password', replica: 'r1' });
    assert.deepEqual(describeError(new GrpcError(14, 'no healthy upstream', { httpStatus: 503 })),
      { code: 14, message: 'no healthy upstream (HTTP 503)', replica: '' });
    assert.deepEqual(describeError(new TypeError('boom')), { code: 2, message: 'boom', replica: '' });
  });
});
