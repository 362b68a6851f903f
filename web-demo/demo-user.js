/**
 * demo-user.js: the demo.User messages (Protos/demo/user.proto) in protobuf's binary wire format,
 * written out by hand (no generated code, no library), plus a small typed client on top of
 * grpc-web.js.
 *
 *   message LoginReq  { string username = 1; string password = 2; }
 *   message LoginRes  { string code = 1; string res = 2; string replica = 3; }
 *   message LogoutReq { string username = 1; }
 *   message LogoutRes { string code = 1; string res = 2; string replica = 3; }
 *   service User { rpc login (LoginReq) returns (LoginRes); rpc logout (LogoutReq) returns (LogoutRes); }
 *
 *   import { UserClient } from './demo-user.js';
 *   const users = new UserClient(new GrpcWebClient(proxyUrl, { mode: 'text' }));
 *   const { reply, replica, headers, trailers } = await users.login({ username, password });
 *
 * Encoders follow proto3: a string field equal to '' is not written. Decoders accept fields in any
 * order, keep the last value of a repeated singular field, and skip unknown fields of every wire
 * type (varint, 64-bit, length-delimited, groups, 32-bit); they throw on truncated input.
 */

export const WireType = Object.freeze({ VARINT: 0, I64: 1, LEN: 2, SGROUP: 3, EGROUP: 4, I32: 5 });

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8');

// --- writing ----------------------------------------------------------------------------------

/** Appends protobuf fields to a growing byte buffer. */
export class ProtoWriter {
  constructor() {
    this.parts = [];
    this.length = 0;
  }

  bytesRaw(bytes) {
    this.parts.push(bytes);
    this.length += bytes.length;
    return this;
  }

  /** An unsigned varint (numbers up to 2^53, or a BigInt up to 2^64-1). */
  varint(value) {
    const out = [];
    let v = BigInt.asUintN(64, BigInt(value));
    do {
      let byte = Number(v & 0x7fn);
      v >>= 7n;
      if (v) byte |= 0x80;
      out.push(byte);
    } while (v);
    return this.bytesRaw(Uint8Array.from(out));
  }

  tag(field, wireType) {
    return this.varint(field * 8 + wireType);
  }

  /** A proto3 int32/int64/uint32/uint64/bool field as a varint: skipped when 0. */
  int(field, value) {
    if (!value) return this;
    return this.tag(field, WireType.VARINT).varint(value);
  }

  /** A length-delimited bytes field (written even when empty). */
  bytes(field, value) {
    this.tag(field, WireType.LEN).varint(value.length);
    return this.bytesRaw(value);
  }

  /** A proto3 string field: skipped when empty. */
  string(field, value) {
    if (value === undefined || value === null || value === '') return this;
    return this.bytes(field, encoder.encode(String(value)));
  }

  finish() {
    const out = new Uint8Array(this.length);
    let offset = 0;
    for (const p of this.parts) {
      out.set(p, offset);
      offset += p.length;
    }
    return out;
  }
}

// --- reading ----------------------------------------------------------------------------------

/** Reads protobuf fields from bytes. */
export class ProtoReader {
  constructor(bytes) {
    this.buf = bytes;
    this.pos = 0;
  }

  get done() {
    return this.pos >= this.buf.length;
  }

  /** An unsigned varint as a Number (exact up to 2^53); throws past 10 bytes or at the end. */
  varint() {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.buf.length) throw new Error('truncated varint');
      const byte = this.buf[this.pos++];
      result += (byte & 0x7f) * scale;
      if (!(byte & 0x80)) return result;
      scale *= 128;
    }
    throw new Error('varint longer than 10 bytes');
  }

  /** The next field's tag as {field, wireType}. */
  tag() {
    const key = this.varint();
    const field = Math.floor(key / 8);
    const wireType = key % 8;
    if (field === 0) throw new Error('field number 0');
    return { field, wireType };
  }

  /** A length-delimited value (the bytes, a view into the input). */
  bytes() {
    const length = this.varint();
    if (length > this.buf.length - this.pos) throw new Error('truncated length-delimited field');
    const out = this.buf.subarray(this.pos, this.pos + length);
    this.pos += length;
    return out;
  }

  string() {
    return decoder.decode(this.bytes());
  }

  /** Skips a field's value of the given wire type (a group up to its matching end tag). */
  skip(wireType, field) {
    switch (wireType) {
      case WireType.VARINT:
        this.varint();
        return;
      case WireType.I64:
        this.advance(8);
        return;
      case WireType.LEN:
        this.bytes();
        return;
      case WireType.I32:
        this.advance(4);
        return;
      case WireType.SGROUP:
        for (;;) {
          if (this.done) throw new Error(`unterminated group ${field}`);
          const inner = this.tag();
          if (inner.wireType === WireType.EGROUP) {
            if (inner.field !== field) throw new Error(`group ${field} ended by end tag ${inner.field}`);
            return;
          }
          this.skip(inner.wireType, inner.field);
        }
      case WireType.EGROUP:
        throw new Error(`unexpected end-group tag ${field}`);
      default:
        throw new Error(`invalid wire type ${wireType}`);
    }
  }

  advance(n) {
    if (n > this.buf.length - this.pos) throw new Error('truncated fixed-width field');
    this.pos += n;
  }
}

/**
 * Decodes a message whose fields are all strings: `fields` maps field numbers to property names.
 * Unknown fields, and known fields with an unexpected wire type, are skipped.
 */
function decodeStrings(bytes, fields) {
  const out = {};
  for (const name of Object.values(fields)) out[name] = '';
  const reader = new ProtoReader(bytes);
  while (!reader.done) {
    const { field, wireType } = reader.tag();
    const name = fields[field];
    if (name !== undefined && wireType === WireType.LEN) out[name] = reader.string();
    else reader.skip(wireType, field);
  }
  return out;
}

// --- the demo.User messages -------------------------------------------------------------------

export function encodeLoginReq({ username = '', password = '' } = {}) {
  return new ProtoWriter().string(1, username).string(2, password).finish();
}

export function decodeLoginReq(bytes) {
  return decodeStrings(bytes, { 1: 'username', 2: 'password' });
}

export function encodeLoginRes({ code = '', res = '', replica = '' } = {}) {
  return new ProtoWriter().string(1, code).string(2, res).string(3, replica).finish();
}

export function decodeLoginRes(bytes) {
  return decodeStrings(bytes, { 1: 'code', 2: 'res', 3: 'replica' });
}

export function encodeLogoutReq({ username = '' } = {}) {
  return new ProtoWriter().string(1, username).finish();
}

export function decodeLogoutReq(bytes) {
  return decodeStrings(bytes, { 1: 'username' });
}

export function encodeLogoutRes({ code = '', res = '', replica = '' } = {}) {
  return new ProtoWriter().string(1, code).string(2, res).string(3, replica).finish();
}

export function decodeLogoutRes(bytes) {
  return decodeStrings(bytes, { 1: 'code', 2: 'res', 3: 'replica' });
}

export const UserMethods = Object.freeze({
  login: '/demo.User/login',
  logout: '/demo.User/logout',
});

/**
 * demo.User over a GrpcWebClient. Each method resolves to {reply, replica, headers, trailers}
 * (`replica` from the reply, else from an `x-replica` header or trailer) and throws GrpcError.
 */
export class UserClient {
  constructor(grpcWebClient) {
    this.client = grpcWebClient;
  }

  async login(request, options = {}) {
    const result = await this.client.unary(UserMethods.login, encodeLoginReq(request), options);
    return withReplica(decodeLoginRes(result.message), result);
  }

  async logout(request, options = {}) {
    const result = await this.client.unary(UserMethods.logout, encodeLogoutReq(request), options);
    return withReplica(decodeLogoutRes(result.message), result);
  }
}

/** The replica named by a reply, or by `x-replica` in trailers or headers ('' if none). */
export function replicaOf(reply, { headers = {}, trailers = {} } = {}) {
  return (reply && reply.replica) || trailers['x-replica'] || headers['x-replica'] || '';
}

function withReplica(reply, result) {
  return { reply, replica: replicaOf(reply, result), headers: result.headers, trailers: result.trailers };
}
