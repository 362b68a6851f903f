// web-demo/grpc-web.js against the real thing: the grpc-web-proxy (.build/debug) in front of two
// user-service replicas (demo.User and demo.Echo), on loopback, in binary and text mode.
// Skipped, saying why, when the binaries are not built.
// Run: node --test tests/webdemo/

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  GrpcError, GrpcWebClient, StatusCode, decodeBinaryMetadata,
} from '../../web-demo/grpc-web.js';
import { ProtoReader, ProtoWriter, UserClient, WireType } from '../../web-demo/demo-user.js';
import { freePort, missingBinaries, proxyConfig, startProxy, startReplica, tempDir } from './support.mjs';

const skip = missingBinaries();

// demo.Echo (Protos/demo/echo.proto): the request knobs and the reply, by hand.
function echoRequest({ message = '', failCode = 0, failMessage = '', delayMs = 0, count = 0, padBytes = 0 } = {}) {
  return new ProtoWriter().string(1, message).int(2, failCode).string(3, failMessage).int(4, delayMs)
    .int(5, count).int(6, padBytes).finish();
}

function echoReply(bytes) {
  const out = { message: '', replica: '', index: 0, padding: new Uint8Array(0) };
  const r = new ProtoReader(bytes);
  while (!r.done) {
    const { field, wireType } = r.tag();
    if (field === 1 && wireType === WireType.LEN) out.message = r.string();
    else if (field === 2 && wireType === WireType.LEN) out.replica = r.string();
    else if (field === 3 && wireType === WireType.VARINT) out.index = r.varint();
    else if (field === 4 && wireType === WireType.LEN) out.padding = r.bytes();
    else r.skip(wireType, field);
  }
  return out;
}

async function expectError(promise, check) {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof GrpcError, `expected a GrpcError, got ${err && err.stack}`);
    check(err);
    return err;
  }
  assert.fail('the call did not fail');
}

describe('grpc-web.js against the proxy', { skip: skip || false }, () => {
  let tmp;
  let replicas = [];
  let proxy;
  let closedPort;

  before(async () => {
    tmp = tempDir();
    replicas = [await startReplica('r1', tmp.dir), await startReplica('r2', tmp.dir)];
    const port = await freePort();
    closedPort = await freePort();
    const vhosts = `
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/dead/" }
                route: { cluster: dead, prefix_rewrite: "/" }
              - match: { prefix: "/nodeadline/" }
                route: { cluster: users, prefix_rewrite: "/", timeout: 0s }
              - match: { prefix: "/demo." }
                route:
                  cluster: users
                  timeout: 0s
                  max_stream_duration: { grpc_timeout_header_max: 0s }`;
    const config = proxyConfig(port, vhosts, { users: replicas.map((r) => r.port), dead: [closedPort] });
    proxy = await startProxy(config, port, tmp.dir);
  });

  after(async () => {
    if (proxy) await proxy.stop();
    for (const r of replicas) await r.stop();
    if (tmp) tmp.remove();
  });

  for (const mode of ['binary', 'text']) {
    describe(`${mode} mode`, () => {
      const client = () => new GrpcWebClient(proxy.url, { mode });

      test('login with the right password, calls spread over both replicas', async () => {
        const users = new UserClient(client());
        const seen = new Set();
        for (let i = 0; i < 4; i++) {
          const { reply, replica, headers } = await users.login({ username: 'demo', password: 'demo123' });
          assert.equal(reply.code, '0');
          assert.equal(reply.res, 'welcome, demo');
          assert.equal(headers['x-replica'], reply.replica);
          seen.add(replica);
        }
        assert.deepEqual([...seen].sort(), ['r1', 'r2']);
        const admin = await users.login({ username: 'admin', password: '123456' });
        assert.equal(admin.reply.res, 'welcome, admin');
      });

      test('wrong password: UNAUTHENTICATED (16), trailers-only, replica in the metadata', async () => {
        await expectError(new UserClient(client()).login({ username: 'demo', password: 'nope' }), (e) => {
          assert.equal(e.code, StatusCode.UNAUTHENTICATED);
          assert.equal(e.codeName, 'UNAUTHENTICATED');
          assert.equal(e.message, 'wrong username or password');
          assert.match(e.metadata['x-replica'], /^r[12]$/);
          assert.equal(e.httpStatus, 200);
        });
      });

      test('logout; logout without a user name is INVALID_ARGUMENT', async () => {
        const users = new UserClient(client());
        const { reply, replica } = await users.logout({ username: 'demo' });
        assert.equal(reply.res, 'goodbye, demo');
        assert.match(replica, /^r[12]$/);
        await expectError(users.logout({ username: '' }), (e) => {
          assert.equal(e.code, StatusCode.INVALID_ARGUMENT);
          assert.equal(e.message, 'username is required');
        });
      });

      test('metadata both ways, -bin values included', async () => {
        const blob = Uint8Array.from([0, 1, 2, 250, 251, 252, 253, 254, 255]);
        const result = await client().unary('/demo.Echo/Unary', echoRequest({ message: 'hi' }), {
          metadata: { 'x-echo-note': 'hello there', 'x-trailer-blob-bin': blob, 'x-echo-raw-bin': Uint8Array.from([7]) },
        });
        assert.equal(echoReply(result.message).message, 'hi');
        assert.equal(result.headers['x-echo-note'], 'hello there');
        assert.deepEqual(decodeBinaryMetadata(result.headers['x-echo-raw-bin']), Uint8Array.from([7]));
        assert.deepEqual(decodeBinaryMetadata(result.trailers['x-trailer-blob-bin']), blob);
      });

      test('error status and message from the trailer frame, percent-decoded', async () => {
        const message = 'not now: 100% busy, naïve ✓';
        await expectError(client().unary('/demo.Echo/Unary', echoRequest({ failCode: 9, failMessage: message })), (e) => {
          assert.equal(e.code, 9);
          assert.equal(e.codeName, 'FAILED_PRECONDITION');
          assert.equal(e.message, message);
        });
      });

      test('server stream: every message in order, large ones too', async () => {
        const stream = client().serverStream('/demo.Echo/ServerStream', echoRequest({ message: 'tick', count: 6, padBytes: 70000 }),
          { metadata: { 'x-trailer-end': 'done' } });
        const got = [];
        for await (const bytes of stream) got.push(echoReply(bytes));
        assert.deepEqual(got.map((m) => m.index), [0, 1, 2, 3, 4, 5]);
        for (const m of got) {
          assert.equal(m.message, 'tick');
          assert.equal(m.padding.length, 70000);
        }
        assert.equal(stream.status, 0);
        assert.equal(stream.trailers['x-trailer-end'], 'done');
        assert.match(stream.headers['content-type'], mode === 'text' ? /^application\/grpc-web-text/ : /^application\/grpc-web\+proto/);
      });

      test('server stream that fails after three messages', async () => {
        const stream = client().serverStream('/demo.Echo/ServerStream', echoRequest({ count: 3, failCode: 8, failMessage: 'too much' }));
        const got = [];
        await expectError((async () => { for await (const m of stream) got.push(m); })(), (e) => {
          assert.equal(e.code, StatusCode.RESOURCE_EXHAUSTED);
          assert.equal(e.message, 'too much');
        });
        assert.equal(got.length, 3);
      });

      test('server stream with callbacks, messages as they come', async () => {
        const times = [];
        const started = Date.now();
        const end = await new Promise((resolve, reject) => {
          client().serverStream('/demo.Echo/ServerStream', echoRequest({ count: 3, delayMs: 150 }), {
            onMessage: () => times.push(Date.now() - started),
            onEnd: resolve,
            onError: reject,
          });
        });
        assert.equal(end.status, 0);
        assert.equal(times.length, 3);
        // streamed, not buffered until the end
        assert.ok(times[2] - times[0] >= 200, `messages at ${times.join(', ')} ms`);
      });

      test('deadline: grpc-timeout goes to the proxy, whose 504 reads as DEADLINE_EXCEEDED (4)', async () => {
        // The client sends `grpc-timeout: 2000m`; this fetch lowers it to 100m on the way, so the
        // proxy's deadline fires first (HTTP 504 "downstream duration timeout", grpc-status 14
        // in the header, which the grpc-web JS client maps from the HTTP status to 4).
        const sent = [];
        const lowering = (url, init) => {
          sent.push(init.headers['grpc-timeout']);
          return fetch(url, { ...init, headers: { ...init.headers, 'grpc-timeout': '100m' } });
        };
        const started = Date.now();
        await expectError(new GrpcWebClient(proxy.url, { mode, fetch: lowering })
          .unary('/demo.Echo/Unary', echoRequest({ delayMs: 3000 }), { deadlineMs: 2000 }), (e) => {
          assert.equal(e.code, StatusCode.DEADLINE_EXCEEDED, String(e));
          assert.equal(e.httpStatus, 504);
          assert.equal(e.message, 'downstream duration timeout');
        });
        assert.deepEqual(sent, ['2000m']);
        assert.ok(Date.now() - started < 1500);
      });

      test('deadline: the client gives up by itself when the route ignores grpc-timeout', async () => {
        const started = Date.now();
        await expectError(client().unary('/nodeadline/demo.Echo/Unary', echoRequest({ delayMs: 3000 }), { deadlineMs: 250 }), (e) => {
          assert.equal(e.code, StatusCode.DEADLINE_EXCEEDED);
          assert.match(e.message, /deadline exceeded \(250 ms\)/);
        });
        const elapsed = Date.now() - started;
        assert.ok(elapsed >= 240 && elapsed < 2500, `${elapsed} ms`);
      });

      test('cancel a stream in the middle; AbortSignal on a unary call', async () => {
        const stream = client().serverStream('/demo.Echo/ServerStream', echoRequest({ count: 100, delayMs: 30 }));
        const got = [];
        await expectError((async () => {
          for await (const m of stream) {
            got.push(m);
            if (got.length === 2) stream.cancel();
          }
        })(), (e) => assert.equal(e.code, StatusCode.CANCELLED));
        assert.ok(got.length >= 2 && got.length < 100);

        const controller = new AbortController();
        setTimeout(() => controller.abort(), 100);
        await expectError(client().unary('/demo.Echo/Unary', echoRequest({ delayMs: 3000 }), { signal: controller.signal }),
          (e) => assert.equal(e.code, StatusCode.CANCELLED));
      });

      test('the backend is down: UNAVAILABLE (14) from the proxy\'s 503, with its message', async () => {
        await expectError(client().unary('/dead/demo.User/login', new Uint8Array(0)), (e) => {
          assert.equal(e.code, StatusCode.UNAVAILABLE);
          assert.equal(e.httpStatus, 503);
          assert.match(e.message, /upstream connect error|no healthy upstream/);
        });
      });

      test('the proxy is not there: UNAVAILABLE (14), readable', async () => {
        await expectError(new GrpcWebClient(`http://127.0.0.1:${closedPort}`, { mode }).unary('/demo.User/login', new Uint8Array(0)), (e) => {
          assert.equal(e.code, StatusCode.UNAVAILABLE);
          assert.equal(e.httpStatus, 0);
          assert.match(e.message, /cannot reach http:\/\/127\.0\.0\.1:\d+/);
        });
      });

      test('unknown method: UNIMPLEMENTED (12)', async () => {
        await expectError(client().unary('/demo.User/nothing', new Uint8Array(0)), (e) => assert.equal(e.code, StatusCode.UNIMPLEMENTED));
      });
    });
  }
});

if (skip) test(`live tests against the proxy skipped: ${skip}`, { skip }, () => {});
