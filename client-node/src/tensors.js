'use strict';
// The ensemble's tensors on the wire (docs/service-contract.md, "Encoding on the wire"):
// every input in raw_input_contents, little-endian, row-major; a BYTES element is a 4-byte
// little-endian length and then its bytes. Outputs come back the same way in
// raw_output_contents, in the order of the response's `outputs`.

const { InvalidInputError, ServerError } = require('./errors');

const SEED_MAX = (1n << 63n) - 1n;
const INT32_MAX = 2 ** 31 - 1;
const OUTPUTS = ['IMAGE', 'NEIGHBOUR_IDS', 'NEIGHBOUR_CAPTIONS', 'NEIGHBOUR_SCORES', 'SEED_USED'];

/**
 * @typedef {object} InferInput
 * @property {string} name
 * @property {string} datatype  Triton dtype: BYTES, INT64, INT32, FP32, ...
 * @property {number[]} shape
 * @property {Buffer} raw  the tensor's bytes as raw_input_contents carries them
 */

/** @param {Array<string | Buffer>} items  BYTES elements, row-major */
function encodeBytes(items) {
  const parts = [];
  for (const x of items) {
    const b = Buffer.isBuffer(x) ? x : Buffer.from(x, 'utf8');
    const len = Buffer.alloc(4);
    len.writeUInt32LE(b.length);
    parts.push(len, b);
  }
  return Buffer.concat(parts);
}

/**
 * The elements of a raw BYTES tensor.
 * @param {Buffer} buf
 * @param {number} count  how many elements the shape says there are
 * @returns {Buffer[]}
 */
function decodeBytes(buf, count) {
  const out = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    if (at + 4 > buf.length) throw new ServerError(`BYTES tensor ends after ${i} of ${count} elements`);
    const n = buf.readUInt32LE(at);
    if (at + 4 + n > buf.length) throw new ServerError(`BYTES element ${i} runs past the tensor`);
    out.push(buf.subarray(at + 4, at + 4 + n));
    at += 4 + n;
  }
  if (at !== buf.length) throw new ServerError(`BYTES tensor has ${buf.length - at} bytes left over`);
  return out;
}

/**
 * Seeds, one per prompt: a single seed s gives s, s+1, ... (one image per prompt, as the
 * Python SDK); an array is taken as given. Numbers must be safe integers (pass a BigInt
 * beyond 2^53).
 * @param {number | bigint | Array<number | bigint> | null | undefined} seeds
 * @param {number} n
 * @returns {bigint[] | null}
 */
function seedList(seeds, n) {
  if (seeds === null || seeds === undefined) return null;
  const one = (/** @type {unknown} */ s) => {
    if (typeof s === 'bigint') return s;
    if (typeof s === 'number' && Number.isSafeInteger(s)) return BigInt(s);
    throw new InvalidInputError(`a seed must be an integer (a BigInt beyond 2**53), got ${String(s)}`);
  };
  const list = Array.isArray(seeds) ? seeds.map(one)
    : Array.from({ length: n }, (_, i) => one(seeds) + BigInt(i));
  if (list.length !== n) throw new InvalidInputError(`${list.length} seeds for ${n} prompts`);
  if (list.some((s) => s < 0n || s > SEED_MAX)) {
    throw new InvalidInputError('seeds must be in [0, 2**63 - 1]');
  }
  return list;
}

/**
 * The request's inputs: PROMPT always, SEED / K / STRENGTH when given, each [n, 1].
 * @param {string[]} prompts
 * @param {{seeds?: number | bigint | Array<number | bigint> | null, k?: number | null,
 *          strength?: number | number[] | null}} [opts]
 * @returns {InferInput[]}
 */
function buildInputs(prompts, { seeds = null, k = null, strength = null } = {}) {
  const n = prompts.length;
  const inputs = [{ name: 'PROMPT', datatype: 'BYTES', shape: [n, 1], raw: encodeBytes(prompts) }];
  const s = seedList(seeds, n);
  if (s !== null) {
    const raw = Buffer.alloc(8 * n);
    s.forEach((v, i) => raw.writeBigInt64LE(v, 8 * i));
    inputs.push({ name: 'SEED', datatype: 'INT64', shape: [n, 1], raw });
  }
  if (k !== null && k !== undefined) {
    if (!Number.isInteger(k) || k < 0 || k > INT32_MAX) {
      throw new InvalidInputError(`k must be an integer >= 0 (0 = no retrieval), got ${k}`);
    }
    const raw = Buffer.alloc(4 * n);
    for (let i = 0; i < n; i++) raw.writeInt32LE(k, 4 * i);
    inputs.push({ name: 'K', datatype: 'INT32', shape: [n, 1], raw });
  }
  if (strength !== null && strength !== undefined) {
    const list = Array.isArray(strength) ? strength : Array(n).fill(strength);
    if (list.length !== n) throw new InvalidInputError(`${list.length} strengths for ${n} prompts`);
    if (list.some((x) => typeof x !== 'number')) throw new InvalidInputError('strength must be a number');
    const raw = Buffer.alloc(4 * n);
    list.forEach((v, i) => raw.writeFloatLE(v, 4 * i));
    inputs.push({ name: 'STRENGTH', datatype: 'FP32', shape: [n, 1], raw });
  }
  return inputs;
}

/**
 * A ModelInferRequest message (proto-loader's plain-object form, field names as in
 * grpc_service.proto) for `inputs`, asking for the five outputs by name.
 * @param {string} modelName
 * @param {InferInput[]} inputs
 */
function inferRequest(modelName, inputs) {
  return {
    model_name: modelName,
    model_version: '',
    inputs: inputs.map(({ name, datatype, shape }) => ({ name, datatype, shape })),
    outputs: OUTPUTS.map((name) => ({ name })),
    raw_input_contents: inputs.map((x) => x.raw),
  };
}

/**
 * @typedef {object} Tensor
 * @property {string} datatype
 * @property {number[]} shape
 * @property {Buffer} raw
 */

/**
 * The response's outputs by name.
 * @param {{outputs: Array<{name: string, datatype: string, shape: Array<number | string>}>,
 *          raw_output_contents: Buffer[]}} res
 * @returns {Record<string, Tensor>}
 */
function outputsByName(res) {
  const outs = res.outputs || [];
  const raw = res.raw_output_contents || [];
  if (raw.length !== outs.length) {
    throw new ServerError(`the response has ${outs.length} outputs but ${raw.length} raw ` +
      'contents (expected every output in raw_output_contents)');
  }
  /** @type {Record<string, Tensor>} */
  const got = {};
  outs.forEach((o, i) => {
    got[o.name] = { datatype: o.datatype, shape: o.shape.map(Number), raw: raw[i] };
  });
  for (const name of OUTPUTS) {
    if (!(name in got)) throw new ServerError(`the response has no ${name} output`);
  }
  return got;
}

module.exports = {
  OUTPUTS, SEED_MAX, encodeBytes, decodeBytes, seedList, buildInputs, inferRequest,
  outputsByName,
};
