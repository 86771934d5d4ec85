'use strict';
// ImageRAGTurboClient: the served `imageragturbo` ensemble over gRPC (Triton's KServe v2
// GRPCInferenceService), following docs/service-contract.md and the Python SDK
// (imageragturbo/client/sdk.py): the same inputs, typed errors, retry rule and deadline rule.

const fs = require('node:fs');
const { setTimeout: sleep } = require('node:timers/promises');
const grpc = require('@grpc/grpc-js');

const { inferenceService } = require('./proto');
const { encodePng } = require('./png');
const {
  ImageRAGTurboError, InvalidInputError, UnavailableError, DeadlineExceededError, ServerError,
  fromGrpc,
} = require('./errors');
const { buildInputs, decodeBytes, inferRequest, outputsByName } = require('./tensors');

const DEFAULT_URL = '127.0.0.1:8001';
const DEFAULT_MODEL = 'imageragturbo';
// Both message caps, as tritonclient sets them: 2 GiB - 1. gRPC's default receive cap, 4 MiB,
// is smaller than a batch of six 512 x 512 images (docs/service-contract.md, "Message sizes").
const MAX_MESSAGE_BYTES = 2 ** 31 - 1;
// tritonserver 2.51 (the nvidia-pytriton build) can crash or leave an inference in flight for
// good when gRPC cancels one (triton-inference-server/server#7368, #8034), and an expired gRPC
// deadline is such a cancellation. So the client keeps the caller's deadline itself: the
// caller gets DeadlineExceededError on time, while the request finishes on the server and its
// answer is dropped. The RPC still carries a far deadline, so a server that never answers
// cannot hold a request open for ever.
const FAR_DEADLINE_MS = 600_000; // at least; 10x the caller's timeout when that is longer

/** @param {number | null} timeoutMs */
const farDeadline = (timeoutMs) =>
  timeoutMs === null ? FAR_DEADLINE_MS : Math.max(FAR_DEADLINE_MS, 10 * timeoutMs);

/**
 * Retries on UNAVAILABLE only (server starting or restarting, queue full, a model being
 * healed: RecoveringError): after failed attempt n the client waits min(maxBackoffMs,
 * initialBackoffMs * multiplier^(n-1)) ms, +-jitter of it. The defaults wait about 7 s in all
 * (100, 200, 400, 800, 1600, 2000, 2000 ms), longer than `serve`'s supervisor takes to
 * reload a model whose process died.
 */
class RetryPolicy {
  /**
   * @param {{maxAttempts?: number, initialBackoffMs?: number, maxBackoffMs?: number,
   *          multiplier?: number, jitter?: number}} [opts]
   */
  constructor({ maxAttempts = 8, initialBackoffMs = 100, maxBackoffMs = 2000, multiplier = 2,
    jitter = 0.1 } = {}) {
    if (!Number.isInteger(maxAttempts) || maxAttempts < 1) {
      throw new RangeError(`maxAttempts must be an integer >= 1, got ${maxAttempts}`);
    }
    if (!(initialBackoffMs >= 0 && maxBackoffMs >= 0 && multiplier >= 1 && jitter >= 0)) {
      throw new RangeError('backoffs and jitter must be >= 0 and the multiplier >= 1');
    }
    this.maxAttempts = maxAttempts;
    this.initialBackoffMs = initialBackoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.multiplier = multiplier;
    this.jitter = jitter;
    Object.freeze(this);
  }

  /** Milliseconds to wait after failed attempt number `attempt` (1-based).
   * @param {number} attempt */
  delay(attempt) {
    const d = Math.min(this.maxBackoffMs, this.initialBackoffMs * this.multiplier ** (attempt - 1));
    return Math.max(0, d * (1 + (2 * Math.random() - 1) * this.jitter));
  }
}

const NO_RETRY = new RetryPolicy({ maxAttempts: 1 });

/**
 * @typedef {object} Neighbour  one retrieved item
 * @property {string} id  its id in the index
 * @property {string} caption
 * @property {number} score  its cosine similarity to the prompt
 */

/** One generated image: `rgb` holds height x width x 3 bytes, row-major, RGB 0-255. */
class GenerationResult {
  /**
   * @param {string} prompt
   * @param {bigint} seed  the seed z_T was drawn from (the caller's, or the server's)
   * @param {number} width
   * @param {number} height
   * @param {Buffer} rgb
   * @param {Neighbour[]} neighbours  retrieved for the prompt, in retrieval order
   */
  constructor(prompt, seed, width, height, rgb, neighbours) {
    this.prompt = prompt;
    this.seed = seed;
    this.width = width;
    this.height = height;
    this.rgb = rgb;
    this.neighbours = neighbours;
  }

  /** The image as PNG bytes. */
  png() {
    return encodePng(this.width, this.height, this.rgb);
  }
}

/**
 * The response's tensors as one GenerationResult per prompt.
 * @param {Record<string, import('./tensors').Tensor>} t
 * @param {string[]} prompts
 */
function parseResults(t, prompts) {
  const n = prompts.length;
  const [b, h, w, c] = t.IMAGE.shape;
  if (t.IMAGE.datatype !== 'UINT8' || b !== n || c !== 3 || t.IMAGE.raw.length !== b * h * w * 3) {
    throw new ServerError(`IMAGE is ${t.IMAGE.datatype} [${t.IMAGE.shape}] with ` +
      `${t.IMAGE.raw.length} bytes; expected UINT8 [${n}, H, W, 3]`);
  }
  const k = t.NEIGHBOUR_IDS.shape[1] ?? 0;
  const ids = decodeBytes(t.NEIGHBOUR_IDS.raw, n * k);
  const caps = decodeBytes(t.NEIGHBOUR_CAPTIONS.raw, n * k);
  const scores = t.NEIGHBOUR_SCORES.raw;
  const seeds = t.SEED_USED.raw;
  if (scores.length !== 4 * n * k || seeds.length !== 8 * n) {
    throw new ServerError(`NEIGHBOUR_SCORES has ${scores.length} bytes and SEED_USED ` +
      `${seeds.length}; expected ${4 * n * k} and ${8 * n}`);
  }
  const size = h * w * 3;
  return prompts.map((p, i) => {
    const nbs = [];
    for (let j = i * k; j < (i + 1) * k; j++) {
      nbs.push({ id: ids[j].toString('utf8'), caption: caps[j].toString('utf8'),
        score: scores.readFloatLE(4 * j) });
    }
    const rgb = Buffer.from(t.IMAGE.raw.subarray(i * size, (i + 1) * size)); // a copy
    return new GenerationResult(p, seeds.readBigInt64LE(8 * i), w, h, rgb, nbs);
  });
}

/** @param {string | Buffer | undefined} x  PEM bytes or a file path */
const pem = (x) => (x === undefined || Buffer.isBuffer(x) ? x : fs.readFileSync(x));

/**
 * @typedef {object} ClientOptions
 * @property {string} [modelName]  default "imageragturbo"
 * @property {number | null} [timeoutMs]  per call, retries and backoff included (default
 *   60000; null: none). Past it: DeadlineExceededError; the request is abandoned, not cancelled
 * @property {RetryPolicy | ConstructorParameters<typeof RetryPolicy>[0]} [retry]  backoff on
 *   UNAVAILABLE (default: new RetryPolicy())
 * @property {boolean} [ssl]  TLS with the system's root certificates
 * @property {string | Buffer} [rootCertificates]  TLS: the CA (PEM, or a file path)
 * @property {string | Buffer} [privateKey]  mutual TLS: the client's key (with certificateChain)
 * @property {string | Buffer} [certificateChain]  mutual TLS: the client's certificate
 * @property {Record<string, string | number>} [channelOptions]  more gRPC channel options
 *   (they override the raised message caps)
 */

/**
 * A client of the `imageragturbo` ensemble. `url` is the gRPC host:port.
 *
 *   const client = new ImageRAGTurboClient('127.0.0.1:8001', { timeoutMs: 10000 });
 *   const r = await client.generate('a red star left of a blue circle', { seed: 0, k: 3 });
 *   fs.writeFileSync('out.png', r.png());
 *   await client.close();
 */
class ImageRAGTurboClient {
  /**
   * @param {string} [url]
   * @param {ClientOptions} [opts]
   */
  constructor(url = DEFAULT_URL, opts = {}) {
    const { modelName = DEFAULT_MODEL, timeoutMs = 60_000, retry, ssl = false, rootCertificates,
      privateKey, certificateChain, channelOptions = {} } = opts;
    if (url.includes('://')) {
      throw new Error(`url is host:port for gRPC (e.g. ${DEFAULT_URL}), got ${url}`);
    }
    if (timeoutMs !== null && !(timeoutMs > 0)) {
      throw new RangeError(`timeoutMs must be > 0 (or null), got ${timeoutMs}`);
    }
    if (Boolean(privateKey) !== Boolean(certificateChain)) {
      throw new Error('a client certificate needs both privateKey and certificateChain (mutual TLS)');
    }
    this.url = url;
    this.modelName = modelName;
    this.timeoutMs = timeoutMs;
    this.retry = retry instanceof RetryPolicy ? retry : new RetryPolicy(retry);
    const tls = ssl || rootCertificates || privateKey || certificateChain;
    const creds = tls
      ? grpc.credentials.createSsl(pem(rootCertificates) ?? null, pem(privateKey) ?? null,
        pem(certificateChain) ?? null)
      : grpc.credentials.createInsecure();
    const Service = inferenceService();
    /** @type {any} */
    this._stub = new Service(url, creds, {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      ...channelOptions,
    });
    /** @type {Set<Promise<unknown>>} inferences in flight, abandoned ones included */
    this._pending = new Set();
  }

  /**
   * One image for `prompt`. `seed`: z_T's seed (absent: the server draws one, see
   * `result.seed`); `k`: neighbours to retrieve (absent: the server's default; 0: no
   * retrieval); `strength`: the H-adapter's lambda scale or the slerp weight of the neighbour
   * (absent: the server's default; 0: retrieve but do not inject).
   * @param {string} prompt
   * @param {{seed?: number | bigint | null, k?: number | null, strength?: number | null,
   *          timeoutMs?: number}} [opts]
   * @returns {Promise<GenerationResult>}
   */
  async generate(prompt, { seed, k, strength, timeoutMs } = {}) {
    if (typeof prompt !== 'string') throw new TypeError(`prompt must be a string, got ${typeof prompt}`);
    const seeds = seed === undefined || seed === null ? null : [seed];
    return (await this.generateBatch([prompt], { seeds, k, strength, timeoutMs }))[0];
  }

  /**
   * One request with several prompts (at most the server's max batch size). `seeds`: one per
   * prompt, or one seed s for s, s+1, ...; `strength`: one value or one per prompt; `k`: one
   * value for the whole request (the contract's rule).
   * @param {string[]} prompts
   * @param {{seeds?: number | bigint | Array<number | bigint> | null, k?: number | null,
   *          strength?: number | number[] | null, timeoutMs?: number}} [opts]
   * @returns {Promise<GenerationResult[]>}
   */
  async generateBatch(prompts, { seeds = null, k, strength, timeoutMs } = {}) {
    if (!Array.isArray(prompts)) {
      throw new TypeError('prompts must be an array of strings; use generate() for one prompt');
    }
    if (prompts.length === 0) throw new InvalidInputError('no prompts given');
    prompts.forEach((p, i) => {
      if (typeof p !== 'string') throw new InvalidInputError(`prompt ${i} is ${typeof p}, not a string`);
    });
    const inputs = buildInputs(prompts, { seeds, k, strength });
    const tensors = await this.inferRaw(inputs, { timeoutMs });
    return parseResults(tensors, prompts);
  }

  /**
   * Send prepared inputs as they are (no client-side checks) and return the response's
   * tensors by name: for tests and callers with their own tensors. Retries and the deadline
   * as for generate.
   * @param {import('./tensors').InferInput[]} inputs
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<Record<string, import('./tensors').Tensor>>}
   */
  async inferRaw(inputs, { timeoutMs } = {}) {
    const request = inferRequest(this.modelName, inputs);
    const res = await this._call((left) => this._infer(request, left), this._timeout(timeoutMs));
    return outputsByName(res);
  }

  /** @param {number | undefined} timeoutMs */
  _timeout(timeoutMs) {
    const t = timeoutMs === undefined ? this.timeoutMs : timeoutMs;
    if (t !== null && !(t > 0)) throw new RangeError(`timeoutMs must be > 0, got ${t}`);
    return t;
  }

  /**
   * `fn(remainingMs)` with retries on UNAVAILABLE, all within one deadline: `timeoutMs`
   * bounds the whole call, backoff included, not each attempt.
   * @template T
   * @param {(remainingMs: number | null) => Promise<T>} fn
   * @param {number | null} timeoutMs
   * @returns {Promise<T>}
   */
  async _call(fn, timeoutMs) {
    const end = timeoutMs === null ? null : performance.now() + timeoutMs;
    for (let attempt = 1; ; attempt++) {
      let err;
      try {
        return await fn(end === null ? null : Math.max(1, end - performance.now()));
      } catch (e) {
        if (e instanceof ImageRAGTurboError) err = e;
        else if (e && typeof (/** @type {any} */ (e).code) === 'number') err = fromGrpc(/** @type {any} */ (e));
        else throw e;
      }
      err.attempts = attempt;
      const pause = this.retry.delay(attempt);
      if (!(err instanceof UnavailableError) || attempt >= this.retry.maxAttempts ||
          (end !== null && performance.now() + pause >= end)) {
        throw err;
      }
      await sleep(pause);
    }
  }

  /**
   * One ModelInfer whose deadline the client keeps (see FAR_DEADLINE_MS): past `timeoutMs`
   * it rejects with DeadlineExceededError and drops the answer when it comes.
   * @param {object} request
   * @param {number | null} timeoutMs
   */
  _infer(request, timeoutMs) {
    const call = new Promise((resolve, reject) => {
      this._stub.ModelInfer(request, { deadline: Date.now() + farDeadline(timeoutMs) },
        (/** @type {any} */ err, /** @type {any} */ res) => (err ? reject(err) : resolve(res)));
    });
    this._pending.add(call);
    const forget = () => { this._pending.delete(call); };
    call.then(forget, forget); // also marks an abandoned call's failure as handled
    if (timeoutMs === null) return call;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new DeadlineExceededError(
        `no answer within ${timeoutMs.toFixed(0)} ms (the request was abandoned by the client, ` +
        'not cancelled on the server)', 'DEADLINE_EXCEEDED')), timeoutMs);
      call.then((r) => { clearTimeout(timer); resolve(r); },
        (e) => { clearTimeout(timer); reject(e); });
    });
  }

  /**
   * A health or metadata RPC with a gRPC deadline (these are safe to cancel).
   * @param {string} method
   * @param {object} request
   * @param {number} timeoutMs
   * @returns {Promise<any>}
   */
  _unary(method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      this._stub[method](request, { deadline: Date.now() + timeoutMs },
        (/** @type {any} */ err, /** @type {any} */ res) => (err ? reject(fromGrpc(err)) : resolve(res)));
    });
  }

  /** The server process answers (false when it cannot be reached).
   * @param {{timeoutMs?: number}} [opts] */
  async isLive({ timeoutMs = 5000 } = {}) {
    try {
      return Boolean((await this._unary('ServerLive', {}, timeoutMs)).live);
    } catch (e) {
      if (e instanceof ImageRAGTurboError) return false;
      throw e;
    }
  }

  /** The server and the ensemble are ready (graphs and index loaded).
   * @param {{timeoutMs?: number}} [opts] */
  async isReady({ timeoutMs = 5000 } = {}) {
    try {
      return Boolean((await this._unary('ServerReady', {}, timeoutMs)).ready) &&
        Boolean((await this._unary('ModelReady', { name: this.modelName, version: '' },
          timeoutMs)).ready);
    } catch (e) {
      if (e instanceof ImageRAGTurboError) return false;
      throw e;
    }
  }

  /** Poll readiness; UnavailableError if not ready within `timeoutMs`.
   * @param {{timeoutMs?: number, intervalMs?: number}} [opts] */
  async waitUntilReady({ timeoutMs = 120_000, intervalMs = 500 } = {}) {
    const t0 = performance.now();
    while (!(await this.isReady({ timeoutMs: Math.min(5000, timeoutMs) }))) {
      if (performance.now() - t0 > timeoutMs) {
        throw new UnavailableError(`${this.url}: ${this.modelName} not ready after ` +
          `${Math.round(timeoutMs / 1000)} s`, 'UNAVAILABLE');
      }
      await sleep(intervalMs);
    }
  }

  /**
   * The ensemble's ModelMetadata (name, versions, platform, inputs and outputs with dtypes
   * and shapes), with retries on UNAVAILABLE.
   * @param {{timeoutMs?: number}} [opts]
   */
  async modelMetadata({ timeoutMs } = {}) {
    const t = this._timeout(timeoutMs) ?? FAR_DEADLINE_MS;
    return this._call((left) => this._unary('ModelMetadata', { name: this.modelName, version: '' },
      left ?? t), t);
  }

  /** The served model's image size, from the IMAGE output's shape [-1, H, W, 3].
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<{width: number, height: number}>} */
  async imageSize(opts = {}) {
    const meta = await this.modelMetadata(opts);
    const image = meta.outputs.find((/** @type {any} */ o) => o.name === 'IMAGE');
    if (!image) throw new ServerError(`${this.modelName} has no IMAGE output`);
    const [, height, width] = image.shape.map(Number);
    return { width, height };
  }

  /**
   * Wait (up to the client's timeout, or 60 s without one) for requests abandoned past their
   * deadline, so closing the channel does not cancel them on the server, then close it.
   */
  async close() {
    const wait = this.timeoutMs ?? 60_000;
    if (this._pending.size) {
      let timer;
      await Promise.race([
        Promise.allSettled([...this._pending]),
        new Promise((resolve) => { timer = setTimeout(resolve, wait); }),
      ]);
      clearTimeout(timer);
    }
    this._stub.close();
  }
}

module.exports = {
  ImageRAGTurboClient, GenerationResult, RetryPolicy, NO_RETRY, DEFAULT_URL, DEFAULT_MODEL,
  MAX_MESSAGE_BYTES, FAR_DEADLINE_MS, parseResults,
};
