'use strict';
// Typed errors: one base class, one subclass per gRPC status a caller handles differently.
// The same classes, names and mapping as the Python SDK's imageragturbo/client/errors.py
// (docs/service-contract.md, "Errors: what to retry").

const { status: grpcStatus } = require('@grpc/grpc-js');

/** @type {Record<number, string>} gRPC status code -> its name ("UNAVAILABLE", ...). */
const STATUS_NAMES = Object.fromEntries(
  Object.entries(grpcStatus).filter(([, v]) => typeof v === 'number').map(([k, v]) => [v, k]));

/**
 * Any failure of a request to the served ensemble. `status` is the gRPC status name
 * (`INVALID_ARGUMENT`, `UNAVAILABLE`, ...) when the server or the channel gave one, else null
 * (a check made by the client before sending); `code` its number; `attempts` how many times
 * the request was sent (1 when it was not retried; 0 when it was never sent).
 */
class ImageRAGTurboError extends Error {
  /**
   * @param {string} message
   * @param {string | null} [status]
   */
  constructor(message, status = null) {
    super(message);
    this.name = new.target.name;
    /** @type {string | null} */
    this.status = status;
    /** @type {number | null} */
    this.code = status === null ? null : (/** @type {Record<string, number>} */ (
      /** @type {unknown} */ (grpcStatus))[status] ?? null);
    /** @type {number} */
    this.attempts = 0;
  }
}

/** The server rejected the request (INVALID_ARGUMENT): an empty prompt, a bad K or STRENGTH,
 * a wrong dtype, a batch larger than the server's maximum. Never retried. Also thrown before
 * sending for arguments the client can check itself (then `status` is null). */
class InvalidInputError extends ImageRAGTurboError {}

/** The server cannot be reached, is not ready, or its queue is full (UNAVAILABLE). Retried
 * with capped exponential backoff before this is thrown. */
class UnavailableError extends ImageRAGTurboError {}

/** The server's queue is full ("Exceeds maximum queue size"): rejected at once. Retried like
 * any UNAVAILABLE, then thrown: shed load or retry later. */
class OverloadedError extends UnavailableError {}

/** The request waited in the server's queue past its queue timeout ("Request timeout
 * expired"). Retried, then thrown. */
class QueueTimeoutError extends UnavailableError {}

/** A model of the ensemble is down and being brought back (INTERNAL "Stub process ... is not
 * healthy", or NOT_FOUND "... has no available versions" / "is not ready"). Transient:
 * retried, then thrown. `status` keeps the server's own code. */
class RecoveringError extends UnavailableError {}

/** No answer within the call's timeout. The client keeps the deadline itself: the request
 * was abandoned, not cancelled, and finishes on the server. */
class DeadlineExceededError extends ImageRAGTurboError {}

/** Any other server-side failure (INTERNAL, NOT_FOUND for an unknown model, a response over
 * the receive cap, ...). Not retried. */
class ServerError extends ImageRAGTurboError {}

/**
 * The server's words for a model that is down but coming back (tritonserver 2.51). A model
 * name that was never served ("... is not found") is not one.
 * @param {string | null} status
 * @param {string} msg
 */
function recovering(status, msg) {
  if (status === 'INTERNAL') return msg.includes('Stub process') && msg.includes('is not healthy');
  if (status === 'NOT_FOUND' || status === 'UNAVAILABLE') {
    return msg.includes('has no available versions') || msg.includes('is not ready');
  }
  return false;
}

/**
 * Map a @grpc/grpc-js error (a ServiceError: `code`, `details`) to the typed errors, as the
 * Python SDK's `from_triton` does.
 * @param {{code?: number, details?: string, message?: string}} err
 * @returns {ImageRAGTurboError}
 */
function fromGrpc(err) {
  const name = typeof err.code === 'number' ? (STATUS_NAMES[err.code] ?? null) : null;
  const msg = err.details || err.message || String(err);
  /** @type {typeof ImageRAGTurboError} */
  let Cls = { INVALID_ARGUMENT: InvalidInputError, UNAVAILABLE: UnavailableError,
    DEADLINE_EXCEEDED: DeadlineExceededError }[name ?? ''] ?? ServerError;
  let status = name;
  if (Cls === ServerError && msg.includes('Deadline Exceeded')) {
    Cls = DeadlineExceededError;
    status = 'DEADLINE_EXCEEDED';
  }
  if (Cls === ServerError && recovering(name, msg)) Cls = RecoveringError;
  else if (Cls === UnavailableError && msg.includes('maximum queue size')) Cls = OverloadedError;
  else if (Cls === UnavailableError && msg.toLowerCase().includes('timeout expired')) {
    Cls = QueueTimeoutError;
  }
  const out = new Cls(msg, status);
  out.cause = err;
  return out;
}

module.exports = {
  ImageRAGTurboError, InvalidInputError, UnavailableError, OverloadedError, QueueTimeoutError,
  RecoveringError, DeadlineExceededError, ServerError, fromGrpc, STATUS_NAMES,
};
