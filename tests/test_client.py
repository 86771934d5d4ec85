"""The gRPC SDK without a server: it imports without torch / onnxruntime / transformers, maps
an unreachable server to UnavailableError after capped exponential backoff, checks its own
arguments, and builds the request tensors the ensemble expects. (Calls against a real server
are in test_serving.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from imageragturbo.client import (
    AsyncImageRAGTurboClient,
    DeadlineExceededError,
    ImageRAGTurboClient,
    ImageRAGTurboError,
    InvalidInputError,
    RetryPolicy,
    UnavailableError,
)
from imageragturbo.client.errors import ServerError, from_triton
from imageragturbo.serving.server import free_port

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnxruntime', 'transformers', 'diffusers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import imageragturbo.client as c
from imageragturbo.client import ImageRAGTurboClient, AsyncImageRAGTurboClient
c.ImageRAGTurboClient('127.0.0.1:1')
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'transformers')))
"""


def test_client_imports_and_constructs_without_torch_onnxruntime_or_transformers():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unreachable_server_raises_unavailable_after_capped_backoff():
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=0.3, jitter=0.0)
    with ImageRAGTurboClient(url, retry=policy, timeout=5) as c:
        assert not c.is_live(timeout=1) and not c.is_ready(timeout=1)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as e:
            c.generate("a red circle", seed=0)
        waited = time.monotonic() - t0
    assert e.value.status == "UNAVAILABLE" and isinstance(e.value, ImageRAGTurboError)
    assert 0.5 <= waited < 5, waited  # two waits: 0.2 s, then min(0.3, 0.4) s


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_timeout_bounds_the_whole_call_retries_included(kind):
    """Retries on UNAVAILABLE stay inside the caller's timeout: 50 allowed attempts with 0.3 s
    pauses would take 15 s; a 1 s timeout ends the call with the last error within it."""
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(max_attempts=50, initial_backoff=0.3, max_backoff=0.3, jitter=0.0)
    t0 = time.monotonic()
    with pytest.raises(UnavailableError):
        if kind == "sync":
            with ImageRAGTurboClient(url, retry=policy, timeout=1.0) as c:
                c.generate("a red circle", seed=0)
        else:
            async def run():
                async with AsyncImageRAGTurboClient(url, retry=policy, timeout=1.0) as c:
                    await c.generate("a red circle", seed=0)
            asyncio.run(run())
    assert time.monotonic() - t0 < 2.0


def test_async_client_raises_unavailable_for_unreachable_server():
    async def run():
        url = f"127.0.0.1:{free_port()}"
        async with AsyncImageRAGTurboClient(url, retry=RetryPolicy(2, 0.01, 0.01)) as c:
            assert not await c.is_live(timeout=1)
            await c.generate("a red circle", seed=0)

    with pytest.raises(UnavailableError):
        asyncio.run(run())


def test_retry_policy_delays_grow_exponentially_and_are_capped():
    p = RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0,
                    jitter=0.0)
    assert [round(p.delay(n), 3) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_client_checks_its_arguments_before_sending():
    with ImageRAGTurboClient("127.0.0.1:1") as c:
        with pytest.raises(InvalidInputError, match="2 seeds for 1 prompts"):
            c.generate_batch(["a"], seeds=[1, 2])
        with pytest.raises(InvalidInputError, match="seeds must be in"):
            c.generate("a", seed=-1)
        with pytest.raises(InvalidInputError, match="k must be >= 0"):
            c.generate("a", k=-1)
        with pytest.raises(TypeError):
            c.generate_batch("a red circle")
    with pytest.raises(ValueError, match="host:port"):
        ImageRAGTurboClient("http://127.0.0.1:8001")
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        ImageRAGTurboClient("127.0.0.1:1", private_key="client.key")


def test_request_tensors_have_the_ensembles_names_dtypes_and_shapes():
    import tritonclient.grpc as grpcclient

    from imageragturbo.client.sdk import build_inputs

    inputs = build_inputs(grpcclient, ["a", "b"], seeds=5, k=3, strength=[0.5, 1.0])
    got = {x.name(): (x.datatype(), x.shape()) for x in inputs}
    assert got == {"PROMPT": ("BYTES", [2, 1]), "SEED": ("INT64", [2, 1]),
                   "K": ("INT32", [2, 1]), "STRENGTH": ("FP32", [2, 1])}
    assert {x.name() for x in build_inputs(grpcclient, ["a"])} == {"PROMPT"}


def test_triton_status_codes_map_to_typed_errors():
    from tritonclient.utils import InferenceServerException

    cases = {"StatusCode.INVALID_ARGUMENT": InvalidInputError,
             "StatusCode.UNAVAILABLE": UnavailableError,
             "StatusCode.DEADLINE_EXCEEDED": DeadlineExceededError,
             "StatusCode.INTERNAL": ServerError}
    for status, cls in cases.items():
        err = from_triton(InferenceServerException("boom", status=status))
        assert type(err) is cls and err.status == status.split(".")[1]
    assert isinstance(InvalidInputError("x"), ValueError)
    # a status the SDK does not know is a ServerError, never silently retried or dropped
    unknown = from_triton(InferenceServerException("odd", status="StatusCode.DATA_LOSS"))
    assert type(unknown) is ServerError and unknown.status == "DATA_LOSS"


class _RecordingInput:
    """``tritonclient``'s InferInput, keeping the array it is given."""

    def __init__(self, name, shape, datatype):
        self.name, self.shape, self.datatype, self.array = name, shape, datatype, None

    def set_data_from_numpy(self, a):
        self.array = a


def test_one_seed_for_a_batch_gives_consecutive_seeds_per_prompt():
    """``seeds=5`` for three prompts draws z_T from seeds 5, 6, 7 (one image per prompt, not
    three copies of one); a list is taken as given; None leaves the seed to the server."""
    import types

    import numpy as np

    from imageragturbo.client.sdk import build_inputs

    mod = types.SimpleNamespace(InferInput=_RecordingInput)
    prompts = ["a red circle", "two blue squares", "a green star"]
    for seeds, want in ((5, [5, 6, 7]), (np.int64(0), [0, 1, 2]), ([9, 2, 9], [9, 2, 9])):
        got = {x.name: x for x in build_inputs(mod, prompts, seeds=seeds)}
        seed = got["SEED"]
        assert (seed.datatype, seed.shape, seed.array.dtype) == ("INT64", [3, 1], np.int64)
        assert seed.array.reshape(-1).tolist() == want, seeds
        assert got["PROMPT"].array.reshape(-1).tolist() == [p.encode() for p in prompts]
    assert "SEED" not in {x.name for x in build_inputs(mod, prompts)}
    with pytest.raises(InvalidInputError, match="seeds must be in"):
        build_inputs(mod, prompts, seeds=2**63 - 2)  # the third seed would overflow int64
