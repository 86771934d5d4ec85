'use strict';
// Against a real tritonserver serving the ensemble: IRT_GRPC_URL is its gRPC host:port. With
// IRT_REFERENCE (a JSON file of the Python SDK's results, written by
// tests/test_node_client.py), the Node client's images must equal the Python SDK's for the
// same prompts, seeds, K and STRENGTH within 2/255, with the same neighbours; with IRT_OUT,
// the images are also written there as PNG for the Python side to decode. Skipped without
// IRT_GRPC_URL (run it through pytest: tests/test_node_client.py).

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');

const {
  ImageRAGTurboClient, RetryPolicy, NO_RETRY, InvalidInputError, DeadlineExceededError,
  ServerError,
} = require('..');
const { inferenceService } = require('../src/proto');
const { buildInputs } = require('../src/tensors');

const URL = process.env.IRT_GRPC_URL;
const REFERENCE = process.env.IRT_REFERENCE;
const OUT = process.env.IRT_OUT;
const skip = URL ? false : 'IRT_GRPC_URL is not set (run tests/test_node_client.py)';
const PIXEL_BOUND = 2; // max abs difference from the Python SDK's image, in uint8 steps
const PROMPTS = ['a red circle in the top left corner', 'two blue squares',
  'a small green triangle left of a yellow circle'];

/** @type {import('../src/client').ImageRAGTurboClient} */
let client;
test.before(() => { if (URL) client = new ImageRAGTurboClient(URL, { timeoutMs: 60_000 }); });
test.after(async () => { if (client) await client.close(); });

/** @param {Buffer} a @param {Buffer} b */
function maxDiff(a, b) {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

test('images equal the Python SDK\'s for the same prompt and seed', { skip: skip || (
  REFERENCE ? false : 'IRT_REFERENCE is not set') }, async () => {
  const ref = JSON.parse(fs.readFileSync(/** @type {string} */ (REFERENCE), 'utf8'));
  assert.ok(ref.cases.length > 0);
  for (const [i, c] of ref.cases.entries()) {
    const seeds = c.seeds.map((/** @type {string} */ s) => BigInt(s));
    const got = await client.generateBatch(c.prompts, { seeds, k: c.k ?? undefined,
      strength: c.strength ?? undefined });
    assert.equal(got.length, c.results.length);
    for (const [j, want] of c.results.entries()) {
      const r = got[j];
      const label = `case ${i} item ${j}`;
      assert.deepEqual([r.width, r.height, r.seed], [want.width, want.height, BigInt(want.seed)], label);
      const d = maxDiff(r.rgb, Buffer.from(want.rgb, 'base64'));
      assert.ok(d <= PIXEL_BOUND, `${label}: pixels differ by up to ${d}/255`);
      assert.deepEqual(r.neighbours.map((n) => [n.id, n.caption]),
        want.neighbours.map((/** @type {any} */ n) => [n.id, n.caption]), label);
      r.neighbours.forEach((n, m) => assert.ok(Math.abs(n.score - want.neighbours[m].score) < 1e-4));
      if (OUT) fs.writeFileSync(path.join(OUT, `case${i}-${j}.png`), r.png());
    }
  }
});

test('health: live, ready, and the image size from ModelMetadata', { skip }, async () => {
  assert.equal(await client.isLive(), true);
  assert.equal(await client.isReady(), true);
  await client.waitUntilReady({ timeoutMs: 5000 });
  assert.deepEqual(await client.imageSize(), { width: 64, height: 64 });
  const meta = await client.modelMetadata();
  assert.equal(meta.platform, 'ensemble');
  assert.deepEqual(meta.inputs.map((/** @type {any} */ x) => [x.name, x.datatype]),
    [['PROMPT', 'BYTES'], ['SEED', 'INT64'], ['K', 'INT32'], ['STRENGTH', 'FP32']]);
  const other = new ImageRAGTurboClient(URL, { modelName: 'no-such-model' });
  try {
    assert.equal(await other.isLive(), true);
    assert.equal(await other.isReady(), false); // the server is, the model is not
  } finally {
    await other.close();
  }
});

test('K = 0 retrieves nothing; an absent seed is drawn by the server and reproduces', { skip }, async () => {
  const r = await client.generate(PROMPTS[0], { k: 0 });
  assert.equal(r.neighbours.length, 0);
  assert.equal(typeof r.seed, 'bigint');
  const again = await client.generate(PROMPTS[0], { seed: r.seed, k: 0 });
  assert.equal(maxDiff(r.rgb, again.rgb), 0);
  assert.equal((await client.generate(PROMPTS[0], { seed: 3, k: 2 })).neighbours.length, 2);
});

// A policy that would wait 1.8 s or more before a second attempt: a call that fails faster
// than that was sent once.
const SLOW_RETRY = new RetryPolicy({ maxAttempts: 5, initialBackoffMs: 2000 });

test('the contract\'s bad requests give InvalidInputError, sent once', { skip }, async () => {
  const c = new ImageRAGTurboClient(URL, { retry: SLOW_RETRY });
  const raw = (/** @type {any[]} */ inputs) => c.inferRaw(inputs);
  const seedFp32 = { name: 'SEED', datatype: 'FP32', shape: [1, 1], raw: Buffer.alloc(4) };
  const nan = buildInputs(['a red circle'], { strength: NaN });
  const cases = [
    [() => c.generate('', { seed: 0 }), 'PROMPT[0] is empty'],
    [() => c.generate('   ', { seed: 0 }), 'PROMPT[0] is empty'],
    [() => c.generate('a red circle', { k: 99 }), 'K must be in [0, 16]'],
    [() => c.generateBatch(Array(9).fill('a red circle')), 'batch-size must be <= 8'],
    [() => c.generateBatch(['a', 'b'], { seeds: [1, 2], strength: [0.5, -1] }), 'strength must be >= 0'],
    [() => raw(nan), 'STRENGTH must be a finite number'],
    [() => raw([...buildInputs(['a red circle']), seedFp32]), "expects 'INT64'"],
    [() => raw([buildInputs(['x'], { seeds: 1 })[1]]), 'PROMPT is required'],
  ];
  try {
    for (const [call, message] of cases) {
      const t0 = performance.now();
      const err = await /** @type {() => Promise<unknown>} */ (call)().catch((e) => e);
      assert.ok(err instanceof InvalidInputError, `${message}: ${err}`);
      assert.equal(err.status, 'INVALID_ARGUMENT');
      assert.ok(err.message.includes(/** @type {string} */ (message)), err.message);
      assert.equal(err.attempts, 1, /** @type {string} */ (message));
      assert.ok(performance.now() - t0 < 1500, `${message}: retried?`);
    }
    // and the server keeps serving
    assert.equal((await c.generate(PROMPTS[0], { seed: 0 })).rgb.length, 64 * 64 * 3);
  } finally {
    await c.close();
  }
});

test('an unknown model gives ServerError NOT_FOUND, not retried', { skip }, async () => {
  const c = new ImageRAGTurboClient(URL, { modelName: 'no-such-model', retry: SLOW_RETRY });
  try {
    const t0 = performance.now();
    const err = await c.generate(PROMPTS[0], { seed: 0 }).catch((e) => e);
    assert.ok(err instanceof ServerError, String(err));
    assert.equal(err.status, 'NOT_FOUND');
    assert.match(err.message, /is not found/);
    assert.equal(err.attempts, 1);
    assert.ok(performance.now() - t0 < 1500);
    await assert.rejects(c.modelMetadata(), ServerError);
  } finally {
    await c.close();
  }
});

/** The ensemble's successful requests so far, from ModelStatistics. */
async function successes() {
  const Service = inferenceService();
  const stub = new Service(/** @type {string} */ (URL), grpc.credentials.createInsecure());
  try {
    const res = await new Promise((resolve, reject) => /** @type {any} */ (stub).ModelStatistics(
      { name: 'imageragturbo', version: '' }, (/** @type {any} */ e, /** @type {any} */ r) => (e ? reject(e) : resolve(r))));
    return Number(/** @type {any} */ (res).model_stats[0].inference_stats.success.count);
  } finally {
    stub.close();
  }
}

test('a deadline that expires gives DeadlineExceededError; the request finishes on the server', { skip }, async () => {
  const before = await successes();
  const c = new ImageRAGTurboClient(URL, { retry: NO_RETRY });
  const t0 = performance.now();
  const err = await c.generateBatch([...PROMPTS, ...PROMPTS], { seeds: 0, timeoutMs: 1 })
    .catch((e) => e);
  const took = performance.now() - t0;
  assert.ok(err instanceof DeadlineExceededError, String(err));
  assert.equal(err.status, 'DEADLINE_EXCEEDED');
  assert.match(err.message, /abandoned/);
  assert.ok(took < 1000, String(took));
  await c.close(); // waits for the abandoned request instead of cancelling it
  const end = performance.now() + 30_000;
  let after = await successes();
  while (after === before && performance.now() < end) after = await successes();
  assert.equal(after, before + 1); // it ran to completion: abandoned, not cancelled
});
