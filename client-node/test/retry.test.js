'use strict';
// Retries and message caps against a scripted gRPC server: Triton's GRPCInferenceService
// (the same descriptors) served by @grpc/grpc-js, answering ModelInfer with a given sequence
// of statuses and counting the requests it receives. A real tritonserver cannot be made to
// answer "Stub process ... is not healthy" or to send a 5 MB image on demand; this proves the
// client retries exactly the contract's retryable answers and reads responses above gRPC's
// 4 MiB default (docs/service-contract.md, "Errors: what to retry", "Message sizes").

const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');

const {
  ImageRAGTurboClient, RetryPolicy, InvalidInputError, OverloadedError, RecoveringError,
  UnavailableError, ServerError,
} = require('..');
const { inferenceService } = require('../src/proto');
const { encodeBytes } = require('../src/tensors');

/**
 * A response of the ensemble's shape for `n` prompts: an h x w image whose bytes count up,
 * two neighbours per prompt, SEED_USED = 40 + i.
 * @param {number} n
 * @param {number} h
 * @param {number} w
 */
function response(n, h, w) {
  const image = Buffer.alloc(n * h * w * 3);
  for (let i = 0; i < image.length; i++) image[i] = i % 251;
  const ids = [], caps = [];
  const scores = Buffer.alloc(4 * 2 * n), seeds = Buffer.alloc(8 * n);
  for (let i = 0; i < n; i++) {
    ids.push(`item-${i}-a`, `item-${i}-b`);
    caps.push(`caption ${i} a`, `caption ${i} b`);
    scores.writeFloatLE(0.75, 8 * i);
    scores.writeFloatLE(0.5, 8 * i + 4);
    seeds.writeBigInt64LE(40n + BigInt(i), 8 * i);
  }
  return {
    model_name: 'imageragturbo', model_version: '1',
    outputs: [
      { name: 'IMAGE', datatype: 'UINT8', shape: [n, h, w, 3] },
      { name: 'NEIGHBOUR_IDS', datatype: 'BYTES', shape: [n, 2] },
      { name: 'NEIGHBOUR_CAPTIONS', datatype: 'BYTES', shape: [n, 2] },
      { name: 'NEIGHBOUR_SCORES', datatype: 'FP32', shape: [n, 2] },
      { name: 'SEED_USED', datatype: 'INT64', shape: [n, 1] },
    ],
    raw_output_contents: [image, encodeBytes(ids), encodeBytes(caps), scores, seeds],
  };
}

/**
 * Serve ModelInfer from a script: each request takes the next entry ([code, message] for an
 * error, or 'ok'); the last entry repeats. `calls` counts the requests.
 * @param {{script: Array<'ok' | [number, string]>, h?: number, w?: number}} opts
 */
async function scripted({ script, h = 2, w = 3 }) {
  const state = { calls: 0, script, h, w };
  const server = new grpc.Server();
  server.addService(inferenceService().service, {
    ModelInfer(/** @type {any} */ call, /** @type {any} */ cb) {
      const step = state.script[Math.min(state.calls, state.script.length - 1)];
      state.calls += 1;
      if (step === 'ok') {
        cb(null, response(Number(call.request.inputs[0].shape[0]), state.h, state.w));
      } else {
        cb({ code: step[0], details: step[1] });
      }
    },
  });
  const port = await new Promise((resolve, reject) => server.bindAsync('127.0.0.1:0',
    grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  return { url: `127.0.0.1:${port}`, state, stop: () => server.forceShutdown() };
}

const FAST = new RetryPolicy({ maxAttempts: 4, initialBackoffMs: 10, maxBackoffMs: 20 });

/**
 * @param {Array<'ok' | [number, string]>} script
 * @param {import('../src/client').RetryPolicy} [retry]
 */
async function run(script, retry = FAST) {
  const srv = await scripted({ script });
  const c = new ImageRAGTurboClient(srv.url, { retry, timeoutMs: 10_000 });
  try {
    const result = await c.generate('a red circle', { seed: 1 }).catch((e) => e);
    return { result, calls: srv.state.calls };
  } finally {
    await c.close();
    srv.stop();
  }
}

const { UNAVAILABLE, INTERNAL, NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED } = grpc.status;

test('the contract\'s retryable answers are retried until the request succeeds', async () => {
  const retryable = [
    [UNAVAILABLE, 'Exceeds maximum queue size'],
    [UNAVAILABLE, 'Request timeout expired'],
    [UNAVAILABLE, 'failed to connect to all addresses'],
    [INTERNAL, "Stub process 'unet_decoder_0_0' is not healthy."],
    [NOT_FOUND, "Request for unknown model: 'imageragturbo' has no available versions"],
    [UNAVAILABLE, "Request for unknown model: 'imageragturbo' is not ready"],
  ];
  for (const answer of retryable) {
    const { result, calls } = await run([/** @type {[number, string]} */ (answer),
      /** @type {[number, string]} */ (answer), 'ok']);
    assert.equal(calls, 3, String(answer[1]));
    assert.equal(result.seed, 40n, String(result));
    assert.deepEqual(result.neighbours.map((/** @type {any} */ n) => n.id), ['item-0-a', 'item-0-b']);
  }
});

test('non-retryable answers are sent once and raised typed', async () => {
  const cases = [
    [[INVALID_ARGUMENT, 'PROMPT[0] is empty: give a text prompt'], InvalidInputError],
    [[NOT_FOUND, "Request for unknown model: 'imageragturbo' is not found"], ServerError],
    [[INTERNAL, 'retriever: index failed'], ServerError],
    [[RESOURCE_EXHAUSTED, 'Received message larger than max'], ServerError],
  ];
  for (const [answer, Cls] of cases) {
    const { result, calls } = await run([/** @type {[number, string]} */ (answer), 'ok']);
    assert.equal(calls, 1, String(answer));
    assert.equal(result.constructor, Cls, String(result));
    assert.equal(result.attempts, 1);
  }
});

test('retryable answers that last are raised after maxAttempts, typed by kind', async () => {
  let r = await run([[UNAVAILABLE, 'Exceeds maximum queue size']]);
  assert.equal(r.calls, 4);
  assert.ok(r.result instanceof OverloadedError && r.result.attempts === 4, String(r.result));
  r = await run([[INTERNAL, "Stub process 'vae_decoder_0_0' is not healthy."]]);
  assert.ok(r.result instanceof RecoveringError && r.result instanceof UnavailableError);
  assert.equal(r.result.status, 'INTERNAL');
  assert.equal(r.calls, 4);
});

test('a response above gRPC\'s 4 MiB default arrives whole; a 4 MiB cap refuses it', async () => {
  const srv = await scripted({ script: ['ok'], h: 1300, w: 1300 }); // 5,070,000 bytes of image
  const c = new ImageRAGTurboClient(srv.url, { timeoutMs: 30_000 });
  const capped = new ImageRAGTurboClient(srv.url, { timeoutMs: 30_000, retry: FAST,
    channelOptions: { 'grpc.max_receive_message_length': 4 * 1024 * 1024 } });
  try {
    const r = await c.generate('a red circle', { seed: 1 });
    assert.deepEqual([r.width, r.height, r.rgb.length], [1300, 1300, 5_070_000]);
    assert.equal(r.rgb[5_069_999], 5_069_999 % 251);
    const calls = srv.state.calls;
    const err = await capped.generate('a red circle', { seed: 1 }).catch((e) => e);
    assert.ok(err instanceof ServerError, String(err));
    assert.equal(err.status, 'RESOURCE_EXHAUSTED');
    assert.equal(srv.state.calls - calls, 1); // not retried: raise the cap instead
  } finally {
    await c.close();
    await capped.close();
    srv.stop();
  }
});

test('a batch response is split per prompt, in order', async () => {
  const srv = await scripted({ script: ['ok'] });
  const c = new ImageRAGTurboClient(srv.url);
  try {
    const rs = await c.generateBatch(['a', 'b', 'c'], { seeds: 7, k: 2 });
    assert.deepEqual(rs.map((r) => [r.prompt, r.seed, r.neighbours[1].caption]),
      [['a', 40n, 'caption 0 b'], ['b', 41n, 'caption 1 b'], ['c', 42n, 'caption 2 b']]);
    assert.deepEqual(rs.map((r) => r.rgb[0]), [0, 18 % 251, 36 % 251]); // 2 x 3 x 3 bytes each
    assert.equal(rs[0].neighbours[0].score, 0.75);
  } finally {
    await c.close();
    srv.stop();
  }
});
