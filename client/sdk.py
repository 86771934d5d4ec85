"""``ImageRAGTurboClient`` and ``AsyncImageRAGTurboClient``: the served ensemble
(``contract.ENSEMBLE_NAME``) over gRPC (``tritonclient.grpc`` / ``tritonclient.grpc.aio``).

Each request carries PROMPT (BYTES), SEED (INT64), and K (INT32) / STRENGTH (FP32) when
given, one row per prompt; the answer is IMAGE (uint8 [H, W, 3]), the neighbours' ids,
captions and cosine scores, and the seed used.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np

from . import contract as C
from .errors import (
    DeadlineExceededError,
    InvalidInputError,
    UnavailableError,
    from_triton,
)

DEFAULT_URL = "127.0.0.1:8001"
OUTPUTS = tuple(t.name for t in C.ENSEMBLE_OUTPUTS)
_SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Neighbour:
    """One retrieved item: its id in the index, its caption, its cosine similarity."""

    id: str
    caption: str
    score: float


@dataclass
class GenerationResult:
    """One generated image: ``array`` uint8 [H, W, 3], ``image`` (PIL), ``png`` (bytes), the
    ``seed`` that drew z_T, and the ``neighbours`` retrieved for the prompt (best first)."""

    prompt: str
    seed: int
    array: np.ndarray
    neighbours: list[Neighbour] = field(default_factory=list)

    @property
    def image(self):
        from PIL import Image

        return Image.fromarray(self.array)

    @property
    def png(self) -> bytes:
        buf = BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()

    def save(self, path) -> None:
        self.image.save(path)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on UNAVAILABLE only (server starting, restarting, queue full, a model being
    healed: :class:`RecoveringError`): attempt n waits min(max_backoff, initial_backoff *
    multiplier**(n-1)) seconds, with +-``jitter`` of it.

    The default's 8 attempts wait about 7 s in all (0.1, 0.2, 0.4, 0.8, 1.6, 2, 2): longer
    than ``serve``'s supervisor takes to reload a model whose process died (README, "Faults"),
    so a client with the default rides out such an outage without seeing an error."""

    max_attempts: int = 8
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        d = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return max(0.0, d * (1 + random.uniform(-self.jitter, self.jitter)))


NO_RETRY = RetryPolicy(max_attempts=1)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of strings; use generate() for one prompt")
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidInputError(f"prompt {i} is {type(p).__name__}, not str")
    return prompts


def _seeds(seeds, n: int) -> np.ndarray | None:
    if seeds is None:
        return None
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds) + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise InvalidInputError(f"{len(seeds)} seeds for {n} prompts")
    if any(not 0 <= s <= _SEED_MAX for s in seeds):
        raise InvalidInputError("seeds must be in [0, 2**63 - 1]")
    return np.array(seeds, dtype=np.int64).reshape(n, 1)


def build_inputs(module, prompts: list[str], seeds=None, k: int | None = None,
                 strength: float | Sequence[float] | None = None) -> list:
    """The InferInput list for ``module`` (tritonclient.grpc or .aio's parent)."""
    n = len(prompts)
    arrays = [(C.PROMPT, np.array([p.encode("utf-8") for p in prompts],
                                  dtype=np.object_).reshape(n, 1))]
    s = _seeds(seeds, n)
    if s is not None:
        arrays.append((C.SEED, s))
    if k is not None:
        if int(k) < 0:
            raise InvalidInputError(f"k must be >= 0 (0 = no retrieval), got {k}")
        arrays.append((C.K, np.full((n, 1), int(k), dtype=np.int32)))
    if strength is not None:
        st = np.broadcast_to(np.asarray(strength, dtype=np.float32).reshape(-1), (n,))
        arrays.append((C.STRENGTH, np.ascontiguousarray(st).reshape(n, 1)))
    inputs = []
    for (name, dtype), a in arrays:
        x = module.InferInput(name, list(a.shape), dtype)
        x.set_data_from_numpy(a)
        inputs.append(x)
    return inputs


def _decode(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def parse_results(result, prompts: list[str]) -> list[GenerationResult]:
    images = result.as_numpy(C.IMAGE_OUT.name)                          # (B, H, W, 3) uint8
    ids = result.as_numpy(C.NEIGHBOUR_IDS.name)                         # (B, k) bytes
    caps = result.as_numpy(C.NEIGHBOUR_CAPTIONS.name)
    scores = result.as_numpy(C.NEIGHBOUR_SCORES.name)                   # (B, k) float32
    seeds = result.as_numpy(C.SEED_USED.name).reshape(-1)
    out = []
    for b, p in enumerate(prompts):
        nbs = [Neighbour(_decode(i), _decode(c), float(s))
               for i, c, s in zip(ids[b], caps[b], scores[b])] if ids is not None else []
        out.append(GenerationResult(p, int(seeds[b]), np.ascontiguousarray(images[b]), nbs))
    return out


# tritonserver 2.51 (the nvidia-pytriton build) can crash or leave an inference in flight for
# good when gRPC cancels one (triton-inference-server/server#7368, #8034), and an expired gRPC
# deadline is such a cancellation. So the SDK keeps the caller's deadline itself: the caller
# gets DeadlineExceededError on time, while the request finishes on the server and its answer
# is dropped. The RPC still carries a far deadline, so a server that never answers cannot hold
# a request open for ever.
FAR_DEADLINE = 600.0  # seconds, at least; 10x the caller's timeout when that is longer


def _deadline(timeout: float | None) -> float:
    return FAR_DEADLINE if timeout is None else max(FAR_DEADLINE, 10 * timeout)


def _remaining(end: float | None) -> float | None:
    """Seconds left before ``end`` (None: no deadline); at least a millisecond."""
    return None if end is None else max(1e-3, end - time.monotonic())


def _close_wait(timeout: float | None) -> float:
    """How long ``close()`` waits for abandoned requests: the client's timeout, or 60 s."""
    return 60.0 if timeout is None else timeout


def _deadline_error(timeout: float | None) -> DeadlineExceededError:
    return DeadlineExceededError(f"no answer within {timeout} s (the request was abandoned by "
                                 "the client, not cancelled on the server)", "DEADLINE_EXCEEDED")


def _outputs(module) -> list:
    return [module.InferRequestedOutput(n) for n in OUTPUTS]


class _Base:
    def __init__(self, url: str = DEFAULT_URL, *, model_name: str = C.ENSEMBLE_NAME,
                 timeout: float | None = 60.0, retry: RetryPolicy | None = None,
                 ssl: bool = False, root_certificates: str | None = None,
                 private_key: str | None = None, certificate_chain: str | None = None,
                 verbose: bool = False):
        if "://" in url:
            raise ValueError(f"url is host:port for gRPC (e.g. {DEFAULT_URL}), got {url!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.url = url
        self.model_name = model_name
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        tls = bool(ssl or root_certificates or private_key or certificate_chain)
        if bool(private_key) != bool(certificate_chain):
            raise ValueError("a client certificate needs both private_key and "
                             "certificate_chain (mutual TLS)")
        self._kw = dict(url=url, verbose=verbose, ssl=tls, root_certificates=root_certificates,
                        private_key=private_key, certificate_chain=certificate_chain)

    def _pause_or_raise(self, err: Exception, attempt: int, end: float | None) -> float:
        """After failed attempt number ``attempt``: the backoff before the next one, or ``err``
        raised when it is not UNAVAILABLE, the attempts are spent, or the pause would run past
        the call's deadline ``end`` (monotonic; None: no deadline)."""
        pause = self.retry.delay(attempt)
        if (not isinstance(err, UnavailableError) or attempt >= self.retry.max_attempts
                or (end is not None and time.monotonic() + pause >= end)):
            raise err
        return pause

    def _timeout(self, timeout):
        t = self.timeout if timeout is None else timeout
        if t is not None and t <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {t}")
        return t


class ImageRAGTurboClient(_Base):
    """Blocking client. ``url`` is the gRPC host:port (default 127.0.0.1:8001).

    ``timeout``: seconds per request (DeadlineExceededError beyond it); ``retry``: the
    backoff on UNAVAILABLE; ``ssl`` / ``root_certificates`` / ``private_key`` /
    ``certificate_chain``: TLS (file paths; the last two for mutual TLS).

    >>> with ImageRAGTurboClient("127.0.0.1:8001") as c:
    ...     r = c.generate("a red circle left of a blue square", seed=0, k=3)
    ...     r.save("out.png"); print([n.caption for n in r.neighbours])
    """

    def __init__(self, url: str = DEFAULT_URL, **kw):
        super().__init__(url, **kw)
        import tritonclient.grpc as grpcclient

        self._mod = grpcclient
        self._client = grpcclient.InferenceServerClient(**self._kw)
        self._pending: set = set()  # Events of requests in flight (abandoned ones included)
        self._lock = threading.Lock()

    def _call(self, fn, inputs: list, timeout: float | None):
        """``fn(inputs, remaining)`` with retries on UNAVAILABLE, all within one deadline:
        ``timeout`` bounds the whole call, backoff included, not each attempt."""
        from tritonclient.utils import InferenceServerException

        end = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(inputs, _remaining(end))
            except InferenceServerException as e:
                err = from_triton(e)
            time.sleep(self._pause_or_raise(err, attempt, end))

    def generate(self, prompt: str, *, seed: int | None = None, k: int | None = None,
                 strength: float | None = None, timeout: float | None = None
                 ) -> GenerationResult:
        """One image for ``prompt``. ``seed``: z_T's seed (random when None: see
        ``result.seed``); ``k``: neighbours to retrieve (None: the server's default, 0: no
        retrieval); ``strength``: the H-adapter's lambda scale or the slerp weight of the
        neighbour (None: the server's default; 0: retrieve but do not inject)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self.generate_batch([prompt], seeds=None if seed is None else [seed], k=k,
                                   strength=strength, timeout=timeout)[0]

    def generate_batch(self, prompts: Sequence[str], *, seeds=None, k: int | None = None,
                       strength=None, timeout: float | None = None) -> list[GenerationResult]:
        """One request with several prompts (at most the server's max batch size). ``seeds``:
        one per prompt, or an int s for s, s+1, ...; ``strength``: one value or one per
        prompt."""
        prompts = _check_prompts(prompts)
        inputs = build_inputs(self._mod, prompts, seeds, k, strength)
        res = self._call(self._infer, inputs, self._timeout(timeout))
        return parse_results(res, prompts)

    def infer_raw(self, inputs: list, timeout: float | None = None):
        """Send prepared ``tritonclient.grpc.InferInput`` objects as they are (no client-side
        checks): for tests and callers with their own tensors."""
        return self._call(self._infer, inputs, self._timeout(timeout))

    def _infer(self, inputs: list, timeout: float | None):
        """One inference whose deadline the client keeps (see ``_deadline``): past
        ``timeout`` it raises DeadlineExceededError and drops the answer when it comes."""
        done, box = threading.Event(), {}
        with self._lock:
            self._pending.add(done)

        def callback(result, error):
            box["result"], box["error"] = result, error
            done.set()
            with self._lock:
                self._pending.discard(done)

        try:
            self._client.async_infer(self.model_name, inputs, callback,
                                     outputs=_outputs(self._mod),
                                     client_timeout=_deadline(timeout))
        except BaseException:
            with self._lock:
                self._pending.discard(done)
            raise
        if not done.wait(timeout):
            raise _deadline_error(timeout)
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    def is_live(self, timeout: float = 5.0) -> bool:
        """The server process answers (False when it cannot be reached)."""
        return self._health(self._client.is_server_live, timeout)

    def is_ready(self, timeout: float = 5.0) -> bool:
        """The server and the ensemble are ready (graphs and index loaded)."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self._client.is_server_ready(client_timeout=timeout)) and bool(
                self._client.is_model_ready(self.model_name, client_timeout=timeout))
        except InferenceServerException:
            return False

    def _health(self, fn, timeout):
        from tritonclient.utils import InferenceServerException

        try:
            return bool(fn(client_timeout=timeout))
        except InferenceServerException:
            return False

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Poll readiness; UnavailableError if not ready within ``timeout`` seconds."""
        t0 = time.monotonic()
        while not self.is_ready(timeout=min(5.0, timeout)):
            if time.monotonic() - t0 > timeout:
                raise UnavailableError(f"{self.url}: {self.model_name} not ready after "
                                       f"{timeout:.0f} s", "UNAVAILABLE")
            time.sleep(interval)

    def close(self) -> None:
        """Wait (up to the client's timeout, or 60 s without one) for requests abandoned past
        their deadline, so closing the channel does not cancel them on the server, then close
        it."""
        end = time.monotonic() + _close_wait(self.timeout)
        with self._lock:
            pending = list(self._pending)
        for e in pending:
            e.wait(max(0.0, end - time.monotonic()))
        self._client.close()

    def __enter__(self) -> ImageRAGTurboClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncImageRAGTurboClient(_Base):
    """The asyncio twin of :class:`ImageRAGTurboClient` (``tritonclient.grpc.aio``): the same
    arguments, methods and errors, awaited. Create and use it inside one event loop."""

    def __init__(self, url: str = DEFAULT_URL, **kw):
        super().__init__(url, **kw)
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aioclient

        self._mod = grpcclient  # InferInput / InferRequestedOutput are shared
        self._client = aioclient.InferenceServerClient(**self._kw)
        self._pending: set = set()  # requests whose callers were cancelled, still running

    async def _call(self, fn, inputs: list, timeout: float | None):
        """As the blocking client's: retries on UNAVAILABLE within one overall deadline."""
        from tritonclient.utils import InferenceServerException

        end = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn(inputs, _remaining(end))
            except InferenceServerException as e:
                err = from_triton(e)
            await asyncio.sleep(self._pause_or_raise(err, attempt, end))

    async def _shielded(self, call):
        """Await ``call`` so that cancelling the caller does not cancel the RPC.

        Why: tritonserver 2.51 (the nvidia-pytriton build) can crash with SIGSEGV when a gRPC
        inference is cancelled (a race fixed in later Triton releases, triton-inference-server/
        server#7368, #8034; seen here within two rounds of cancelling queued requests). So a
        cancelled task raises CancelledError at once, while its request finishes on the server
        in the background (its answer dropped) and frees its place in the queue when done:
        the next request waits only for work already accepted, never for a server restart.
        ``close()`` waits for such requests before closing the channel."""
        task = asyncio.ensure_future(call)
        self._pending.add(task)
        task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    def _forget(self, task) -> None:
        self._pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned request's error is not a warning

    async def generate(self, prompt: str, *, seed: int | None = None, k: int | None = None,
                       strength: float | None = None, timeout: float | None = None
                       ) -> GenerationResult:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return (await self.generate_batch([prompt], seeds=None if seed is None else [seed],
                                          k=k, strength=strength, timeout=timeout))[0]

    async def generate_batch(self, prompts: Sequence[str], *, seeds=None, k: int | None = None,
                             strength=None, timeout: float | None = None
                             ) -> list[GenerationResult]:
        prompts = _check_prompts(prompts)
        inputs = build_inputs(self._mod, prompts, seeds, k, strength)
        res = await self._call(self._infer, inputs, self._timeout(timeout))
        return parse_results(res, prompts)

    async def infer_raw(self, inputs: list, timeout: float | None = None):
        return await self._call(self._infer, inputs, self._timeout(timeout))

    async def _infer(self, inputs: list, timeout: float | None):
        """One inference whose deadline the client keeps (see ``_deadline``)."""
        call = self._client.infer(self.model_name, inputs, outputs=_outputs(self._mod),
                                  client_timeout=_deadline(timeout))
        try:
            return await asyncio.wait_for(self._shielded(call), timeout)
        except asyncio.TimeoutError:
            raise _deadline_error(timeout) from None

    async def is_live(self, timeout: float = 5.0) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self._client.is_server_live(client_timeout=timeout))
        except InferenceServerException:
            return False

    async def is_ready(self, timeout: float = 5.0) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout)) and bool(
                await self._client.is_model_ready(self.model_name, client_timeout=timeout))
        except InferenceServerException:
            return False

    async def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        t0 = time.monotonic()
        while not await self.is_ready(timeout=min(5.0, timeout)):
            if time.monotonic() - t0 > timeout:
                raise UnavailableError(f"{self.url}: {self.model_name} not ready after "
                                       f"{timeout:.0f} s", "UNAVAILABLE")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Wait (up to the client's timeout) for requests whose callers were cancelled, so
        closing the channel does not cancel them on the server, then close it."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=_close_wait(self.timeout))
        await self._client.close()

    async def __aenter__(self) -> AsyncImageRAGTurboClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


