'use strict';
// Without a server: the wire format of the ensemble's tensors, the client's own argument
// checks, the typed-error mapping (the Python SDK's cases), the backoff, the PNG encoder, and
// an unreachable server (UnavailableError after capped backoff, within the call's timeout).

const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const zlib = require('node:zlib');
const { status } = require('@grpc/grpc-js');

const {
  ImageRAGTurboClient, RetryPolicy, buildInputs, encodePng, fromGrpc, ImageRAGTurboError,
  InvalidInputError, UnavailableError, OverloadedError, QueueTimeoutError, RecoveringError,
  DeadlineExceededError, ServerError,
} = require('..');
const { encodeBytes, decodeBytes } = require('../src/tensors');
const { crc32 } = require('../src/png');

/** A port nothing listens on (bound, then released). */
async function freePort() {
  const srv = net.createServer();
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', () => resolve(undefined)));
  const { port } = /** @type {net.AddressInfo} */ (srv.address());
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

test('request tensors have the ensemble\'s names, dtypes, shapes and little-endian bytes', () => {
  const inputs = buildInputs(['a', 'bé'], { seeds: 5, k: 3, strength: [0.5, 1.0] });
  const got = Object.fromEntries(inputs.map((x) => [x.name, [x.datatype, x.shape]]));
  assert.deepEqual(got, { PROMPT: ['BYTES', [2, 1]], SEED: ['INT64', [2, 1]],
    K: ['INT32', [2, 1]], STRENGTH: ['FP32', [2, 1]] });
  const raw = Object.fromEntries(inputs.map((x) => [x.name, x.raw]));
  // BYTES: 4-byte little-endian length, then the UTF-8 bytes ("é" is two bytes)
  assert.deepEqual([...raw.PROMPT], [1, 0, 0, 0, 0x61, 3, 0, 0, 0, 0x62, 0xc3, 0xa9]);
  assert.deepEqual([raw.SEED.readBigInt64LE(0), raw.SEED.readBigInt64LE(8)], [5n, 6n]);
  assert.deepEqual([raw.K.readInt32LE(0), raw.K.readInt32LE(4)], [3, 3]);
  assert.deepEqual([raw.STRENGTH.readFloatLE(0), raw.STRENGTH.readFloatLE(4)], [0.5, 1.0]);
  assert.deepEqual(buildInputs(['a']).map((x) => x.name), ['PROMPT']);
  assert.deepEqual(buildInputs(['a'], { seeds: null, k: null, strength: null }).map((x) => x.name),
    ['PROMPT']); // null, like absent: the server's defaults
});

test('one seed for a batch gives consecutive seeds; BigInt seeds reach 2^63 - 1', () => {
  const seeds = (/** @type {any} */ s) => {
    const x = buildInputs(['a', 'b', 'c'], { seeds: s }).find((i) => i.name === 'SEED');
    return [0, 1, 2].map((i) => /** @type {any} */ (x).raw.readBigInt64LE(8 * i));
  };
  assert.deepEqual(seeds(5), [5n, 6n, 7n]);
  assert.deepEqual(seeds([9, 2n, 9]), [9n, 2n, 9n]);
  const big = (1n << 63n) - 3n;
  assert.deepEqual(seeds(big), [big, big + 1n, big + 2n]);
  assert.throws(() => seeds(big + 1n), /seeds must be in \[0, 2\*\*63 - 1\]/); // third overflows
  assert.throws(() => seeds(-1), InvalidInputError);
  assert.throws(() => seeds(2 ** 60), /BigInt beyond 2\*\*53/); // not a safe integer
  assert.throws(() => seeds(1.5), InvalidInputError);
  assert.throws(() => buildInputs(['a'], { seeds: [1, 2] }), /2 seeds for 1 prompts/);
});

test('the client checks its own arguments before sending', async () => {
  const c = new ImageRAGTurboClient('127.0.0.1:1');
  try {
    await assert.rejects(c.generate('a', { k: -1 }), /k must be an integer >= 0/);
    await assert.rejects(c.generate('a', { k: 1.5 }), InvalidInputError);
    await assert.rejects(c.generateBatch(['a', 'b'], { strength: [1] }), /1 strengths for 2/);
    await assert.rejects(c.generateBatch([]), /no prompts given/);
    await assert.rejects(c.generateBatch(['a', /** @type {any} */ (3)]), /prompt 1 is number/);
    await assert.rejects(c.generateBatch(/** @type {any} */ ('a red circle')), TypeError);
    await assert.rejects(c.generate(/** @type {any} */ (null)), TypeError);
    await assert.rejects(c.generate('a', { timeoutMs: 0 }), RangeError);
    const err = await c.generate('a', { seed: -1 }).catch((e) => e);
    assert.ok(err instanceof InvalidInputError && err.status === null && err.attempts === 0);
  } finally {
    await c.close();
  }
  assert.throws(() => new ImageRAGTurboClient('http://127.0.0.1:8001'), /host:port/);
  assert.throws(() => new ImageRAGTurboClient('127.0.0.1:1', { privateKey: 'client.key' }),
    /both privateKey and certificateChain/);
  assert.throws(() => new ImageRAGTurboClient('127.0.0.1:1', { timeoutMs: -5 }), RangeError);
  assert.throws(() => new RetryPolicy({ maxAttempts: 0 }), RangeError);
});

test('BYTES tensors decode back, and a truncated one is a ServerError', () => {
  const enc = encodeBytes(['', 'red', 'blåbær']);
  assert.deepEqual(decodeBytes(enc, 3).map((b) => b.toString()), ['', 'red', 'blåbær']);
  assert.throws(() => decodeBytes(enc.subarray(0, enc.length - 1), 3), ServerError);
  assert.throws(() => decodeBytes(enc, 2), /left over/);
});

test('gRPC statuses map to the Python SDK\'s typed errors', () => {
  const e = (/** @type {number} */ code, details = 'boom') => fromGrpc({ code, details });
  const cases = [
    [status.INVALID_ARGUMENT, InvalidInputError, 'INVALID_ARGUMENT'],
    [status.UNAVAILABLE, UnavailableError, 'UNAVAILABLE'],
    [status.DEADLINE_EXCEEDED, DeadlineExceededError, 'DEADLINE_EXCEEDED'],
    [status.INTERNAL, ServerError, 'INTERNAL'],
    [status.NOT_FOUND, ServerError, 'NOT_FOUND'],
    [status.RESOURCE_EXHAUSTED, ServerError, 'RESOURCE_EXHAUSTED'],
    [status.DATA_LOSS, ServerError, 'DATA_LOSS'], // unknown to the SDK: never retried
  ];
  for (const [code, Cls, name] of cases) {
    const err = e(/** @type {number} */ (code));
    assert.equal(err.constructor, Cls, String(name));
    assert.equal(err.status, name);
    assert.equal(err.code, code);
    assert.ok(err instanceof ImageRAGTurboError && err instanceof Error);
  }
  // the kinds of UNAVAILABLE, told apart by the server's words (tritonserver 2.51)
  assert.equal(e(status.UNAVAILABLE, 'Exceeds maximum queue size').constructor, OverloadedError);
  assert.equal(e(status.UNAVAILABLE, 'Request timeout expired').constructor, QueueTimeoutError);
  const stub = e(status.INTERNAL, "Stub process 'unet_decoder_0_0' is not healthy.");
  assert.ok(stub instanceof RecoveringError && stub instanceof UnavailableError);
  assert.equal(stub.status, 'INTERNAL'); // the server's own code is kept
  assert.equal(e(status.NOT_FOUND, "Request for unknown model: 'imageragturbo' has no " +
    'available versions').constructor, RecoveringError);
  assert.equal(e(status.NOT_FOUND, "Request for unknown model: 'x' is not found").constructor,
    ServerError);
  assert.equal(e(status.INTERNAL, 'retriever: index failed').constructor, ServerError);
  const late = e(status.UNKNOWN, 'Deadline Exceeded');
  assert.equal(late.constructor, DeadlineExceededError);
  assert.equal(late.status, 'DEADLINE_EXCEEDED');
});

test('retry delays grow exponentially and are capped', () => {
  const p = new RetryPolicy({ maxAttempts: 6, initialBackoffMs: 100, maxBackoffMs: 1000,
    multiplier: 2, jitter: 0 });
  assert.deepEqual([1, 2, 3, 4, 5, 6].map((n) => p.delay(n)), [100, 200, 400, 800, 1000, 1000]);
  const d = new RetryPolicy();
  const total = [1, 2, 3, 4, 5, 6, 7].map((n) => d.delay(n)).reduce((a, b) => a + b);
  assert.ok(total > 0.9 * 7100 && total < 1.1 * 7100, String(total)); // about 7 s in all
});

test('the PNG encoder writes what an inflater reads back', () => {
  assert.equal(crc32(Buffer.from('IEND')), 0xae426082); // the CRC every PNG's IEND carries
  const rgb = Buffer.from([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]); // 2 x 2
  const png = encodePng(2, 2, rgb);
  assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  assert.equal(png.toString('ascii', 12, 16), 'IHDR');
  assert.deepEqual([png.readUInt32BE(16), png.readUInt32BE(20), png[24], png[25]], [2, 2, 8, 2]);
  const idatLen = png.readUInt32BE(33);
  assert.equal(png.toString('ascii', 37, 41), 'IDAT');
  const rows = zlib.inflateSync(png.subarray(41, 41 + idatLen));
  assert.deepEqual([...rows], [0, ...rgb.subarray(0, 6), 0, ...rgb.subarray(6)]);
  assert.throws(() => encodePng(3, 2, rgb), RangeError);
});

test('an unreachable server gives UnavailableError after capped backoff', async () => {
  const url = `127.0.0.1:${await freePort()}`;
  const retry = new RetryPolicy({ maxAttempts: 3, initialBackoffMs: 200, maxBackoffMs: 300,
    jitter: 0 });
  const c = new ImageRAGTurboClient(url, { retry, timeoutMs: 5000 });
  try {
    assert.equal(await c.isLive({ timeoutMs: 1000 }), false);
    assert.equal(await c.isReady({ timeoutMs: 1000 }), false);
    const t0 = performance.now();
    const err = await c.generate('a red circle', { seed: 0 }).catch((x) => x);
    const waited = performance.now() - t0;
    assert.ok(err instanceof UnavailableError, String(err));
    assert.equal(err.status, 'UNAVAILABLE');
    assert.equal(err.attempts, 3);
    assert.ok(waited >= 500 && waited < 5000, String(waited)); // waits of 200, then 300 ms
    await assert.rejects(c.waitUntilReady({ timeoutMs: 300, intervalMs: 100 }), UnavailableError);
  } finally {
    await c.close();
  }
});

test('the timeout bounds the whole call, retries included', async () => {
  const url = `127.0.0.1:${await freePort()}`;
  // 50 attempts with 300 ms pauses would take 15 s; a 1 s timeout ends the call within it
  const retry = new RetryPolicy({ maxAttempts: 50, initialBackoffMs: 300, maxBackoffMs: 300,
    jitter: 0 });
  const c = new ImageRAGTurboClient(url, { retry, timeoutMs: 1000 });
  const t0 = performance.now();
  const err = await c.generate('a red circle', { seed: 0 }).catch((x) => x);
  await c.close();
  assert.ok(err instanceof UnavailableError, String(err));
  assert.ok(err.attempts > 1 && err.attempts < 6, String(err.attempts));
  assert.ok(performance.now() - t0 < 2000);
});
