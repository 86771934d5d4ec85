"""Recovery of the served ensemble (issue 15, item 1): ``serve``'s supervisor heals a killed
Python-backend stub, readiness is false while requests would fail, and an SDK client whose
retries outlast the stated heal bound sees no error at all. Also: a cancelled asyncio request
frees its slot.
Real tritonservers throughout (fixtures in conftest.py); each test here starts its own, since
killing stubs of the shared session servers would break the tests after it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serving_support import PROMPTS
from tritonclient.utils import InferenceServerException

from imageragturbo.client import (
    NO_RETRY,
    AsyncImageRAGTurboClient,
    ImageRAGTurboClient,
    RecoveringError,
    RetryPolicy,
)
from imageragturbo.serving.repository import RenderOptions, render_repository
from imageragturbo.serving.server import TritonServer
from imageragturbo.serving.supervisor import Supervisor

HEAL_S = 15.0  # stated bound, kill to a served request (measured ~2-4 s on 2 busy cores)
HEALED_EXIT_S = 3   # exit timeout of a server whose stubs get killed (it exits 1 anyway)
# Exit timeout of a server that must exit 0: the server's default. Unloading the 8 models took
# 3-4 s on 2 cores at a load average of 8-10 (so 3 s made it exit 1, with nothing in flight);
# a request left in flight still holds it the whole 30 s and makes it exit 1.
CLEAN_EXIT_S = 30


def retry_window(policy: RetryPolicy) -> float:
    """The least time a client with ``policy`` goes on retrying after its first failed
    attempt: every backoff at the low end of its jitter (the attempts themselves add more)."""
    return (1 - policy.jitter) * sum(
        min(policy.max_backoff, policy.initial_backoff * policy.multiplier ** (n - 1))
        for n in range(1, policy.max_attempts))


# The load client's retries outlast HEAL_S (13 attempts: at least 15.4 s), so "the client sees
# no error" holds for any heal the test accepts. The default policy's (8 attempts: at least
# 6.4 s) outlasts the heals measured (docs/serving.md; preprocess's 3.6-4.0 s at a load average
# of 7-10), but a preprocess heal has taken 6.9 s on a more loaded machine: with the default, a
# heal well within HEAL_S could fail the test. A stub that never heals still fails it: each
# heal is asserted within HEAL_S of its kill, and the client gives up soon after.
HEALING_RETRY = RetryPolicy(max_attempts=13)
assert retry_window(HEALING_RETRY) >= HEAL_S


@pytest.fixture
def own_server(assets, tmp_path):
    """A fresh adapter-export server; stopped after the test, and nothing of it left running.
    Its exit timeout defaults to a short one: a server that reloaded a model whose stub was
    killed waits that long at shutdown and exits 1 (server.py); a test that asserts a clean
    exit passes ``exit_timeout=CLEAN_EXIT_S``."""
    started = []

    def start(opts: RenderOptions | None = None, exit_timeout: int = HEALED_EXIT_S
              ) -> TritonServer:
        repo = render_repository(assets["adapter"], assets["index"], tmp_path / "repo", "cpu",
                                 opts)
        s = TritonServer(repo, log_path=tmp_path / "server.log", cache=assets["root"] / "cache",
                         exit_timeout=exit_timeout)
        started.append(s)
        s.start()
        s.wait_ready(timeout=120, progress=False)
        return s

    yield start
    for s in started:
        s.stop(timeout=s.exit_timeout + 12)  # SIGINT: Triton's own exit timeout, then some
    # A server that exits on its exit timeout leaves its stubs to notice within a second.
    deadline = time.monotonic() + 10
    while True:
        left = subprocess.run(["pgrep", "-f", str(tmp_path / "repo")], capture_output=True,
                              text=True).stdout.strip()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"


class _Load:
    """A background SDK client (``HEALING_RETRY``) sending the same request in a loop, and a
    readiness poller: what an application and a load balancer would see."""

    def __init__(self, server, reference: np.ndarray):
        self.server, self.reference = server, reference
        self.errors: list[BaseException] = []
        self.served: list[float] = []       # monotonic time of each served image
        self.wrong = 0                      # images that differ from the reference
        self.not_ready: list[float] = []    # monotonic times readiness answered false
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client), threading.Thread(
            target=self._ready)]

    def _client(self):
        with ImageRAGTurboClient(self.server.url, timeout=60, retry=HEALING_RETRY) as c:
            while not self._stop.is_set():
                try:
                    r = c.generate(PROMPTS[0], seed=7, k=1)
                except Exception as e:  # noqa: BLE001 - any error at all is the failure
                    self.errors.append(e)
                    continue
                self.served.append(time.monotonic())
                self.wrong += int(not np.array_equal(r.array, self.reference))

    def _ready(self):
        while not self._stop.is_set():
            if not self.server.http_ok("/v2/health/ready", timeout=1):
                self.not_ready.append(time.monotonic())
            time.sleep(0.05)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


def test_killed_stubs_heal_while_an_sdk_client_sees_no_error(own_server):
    """kill -9 the stub of the retriever, preprocess, an ONNX stage runner (unet_decoder) and
    postprocess in turn, under a steady SDK client: each time the supervisor reloads that
    model, readiness answers false meanwhile, an image is served again within HEAL_S, the
    client (retrying for longer than HEAL_S) sees no error and every image equals the one
    before the faults; model control stays refused to an outside client."""
    server = own_server()
    with ImageRAGTurboClient(server.url, timeout=60) as c:
        reference = c.generate(PROMPTS[0], seed=7, k=1).array
    with grpcclient.InferenceServerClient(server.url) as outsider:
        with pytest.raises(InferenceServerException, match="restricted"):
            outsider.unload_model("retriever")
    sup = Supervisor(server, quiet=True).start()
    heals = {}
    try:
        with _Load(server, reference) as load:
            for model in ("retriever", "preprocess", "unet_decoder", "postprocess"):
                time.sleep(1.0)  # steady traffic before the fault
                before = len(sup.events)
                pid = server.stub_processes()[model][0]
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                while len(sup.events) == before or not any(t > killed for t in load.served):
                    assert time.monotonic() - killed < HEAL_S, \
                        f"{model}: not healed in {HEAL_S} s; events {sup.events}"
                    time.sleep(0.05)
                ev = sup.events[-1]
                healed = ev.started + ev.seconds
                while not any(t > healed for t in load.served):
                    assert time.monotonic() - killed < HEAL_S, f"{model}: nothing served"
                    time.sleep(0.05)
                # kill -> ensemble ready again, and -> first image served after that
                heals[model] = (round(healed - killed, 2),
                                round(min(t for t in load.served if t > healed) - killed, 2))
                assert ev.ok and ev.kind == "reload" and ev.models == [model], sup.events
                assert any(t > killed for t in load.not_ready), f"{model}: readiness stayed true"
                assert server.http_ok("/v2/health/ready", timeout=1)
                assert model in server.stub_processes() and pid not in \
                    server.stub_processes()[model]
            time.sleep(0.5)
    finally:
        sup.stop()
    assert not load.errors, [repr(e) for e in load.errors]
    assert load.wrong == 0 and len(load.served) > 20
    assert sup.error is None
    print(f"heal seconds (kill -> ready again, -> next image): {heals}; the default "
          f"RetryPolicy retries for at least {retry_window(RetryPolicy()):.1f} s")


def test_canary_names_a_dead_stub_and_the_sdk_maps_it_to_recovering(own_server):
    """Without the watch, a request after a killed stub gets INTERNAL "Stub process
    'retriever_0_0' is not healthy"; the SDK raises it as RecoveringError (retryable), and the
    supervisor's canary finds the model in that message and reloads it. Every instance's stub
    is killed (with one left, Triton routes around the dead one)."""
    server = own_server()
    for pid in server.stub_processes()["retriever"]:
        os.kill(pid, signal.SIGKILL)
    with ImageRAGTurboClient(server.url, timeout=60, retry=NO_RETRY) as c:
        with pytest.raises(RecoveringError, match="is not healthy") as info:
            c.generate(PROMPTS[0], seed=1, k=1)
        assert info.value.status == "INTERNAL"
        sup = Supervisor(server, quiet=True)   # not started: one canary step by hand
        sup.canary_check()
        assert [(e.kind, e.models) for e in sup.events] == [("reload", ["retriever"])]
        assert sup.canary() is None
        assert c.generate(PROMPTS[0], seed=1, k=1).array.shape[2] == 3


def test_a_dead_server_process_is_restarted_on_the_same_port(own_server):
    """kill -9 of tritonserver itself: the supervisor starts it again on the same ports and
    an SDK client that retries long enough is served."""
    from imageragturbo.client import RetryPolicy

    server = own_server()
    port = server.grpc_port
    sup = Supervisor(server, quiet=True).start()
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
        with ImageRAGTurboClient(server.url, timeout=60,
                                 retry=RetryPolicy(max_attempts=30, max_backoff=1.0)) as c:
            assert c.generate(PROMPTS[0], seed=1, k=1).array.shape[2] == 3
        # the client can be served before the supervisor's own readiness poll (every 0.5 s)
        # has seen the restarted server and marked the restart done
        deadline = time.monotonic() + 10
        while not (sup.events and sup.events[0].ok) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e.kind for e in sup.events] == ["restart"] and sup.events[0].ok
        assert server.grpc_port == port and sup.error is None
    finally:
        sup.stop()


def test_a_cancelled_async_request_frees_its_slot_without_crashing_the_server(own_server):
    """12 async requests cancelled 10 ms after they were sent: each caller gets CancelledError
    at once; the requests finish on the server and leave it (the SDK does not cancel the RPC,
    since cancelling one can crash tritonserver 2.51 with SIGSEGV: see sdk.py); the next
    request waits for no more than that accepted work, the server process is the same one,
    and it stops cleanly with nothing left in flight (exit code 0: a request still in flight
    would hold it for the whole exit timeout and make it exit 1)."""
    server = own_server(exit_timeout=CLEAN_EXIT_S)
    pid = server.process.pid

    async def run():
        async with AsyncImageRAGTurboClient(server.url, timeout=60) as c:
            await c.generate(PROMPTS[0], seed=1, k=1)       # warm
            t0 = time.perf_counter()
            for i in range(3):
                await c.generate(PROMPTS[0], seed=i, k=1)
            idle = (time.perf_counter() - t0) / 3
            t0 = time.perf_counter()
            await asyncio.gather(*(c.generate(PROMPTS[0], seed=i, k=1) for i in range(12)))
            busy12 = time.perf_counter() - t0
            timings = []
            for _ in range(3):
                tasks = [asyncio.create_task(c.generate(PROMPTS[1], seed=i, k=1))
                         for i in range(12)]
                await asyncio.sleep(0.01)                  # sent, queued on the server
                t0 = time.perf_counter()
                for t in tasks:
                    t.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                cancelled = time.perf_counter() - t0
                assert all(isinstance(r, asyncio.CancelledError) for r in results)
                t0 = time.perf_counter()
                await c.generate(PROMPTS[2], seed=99, k=1)
                timings.append((cancelled, time.perf_counter() - t0))
            while c._pending:                              # the abandoned ones finish
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            await c.generate(PROMPTS[2], seed=99, k=1)
            return idle, busy12, timings, time.perf_counter() - t0

    idle, busy12, timings, settled = asyncio.run(run())
    print(f"idle {idle * 1e3:.0f} ms, 12 at once {busy12 * 1e3:.0f} ms, (cancel, next) "
          f"{[(round(a * 1e3), round(b * 1e3)) for a, b in timings]} ms, then {settled * 1e3:.0f}"
          " ms")
    assert all(cancel < 0.05 for cancel, _ in timings)
    # + 0.6 s: this Triton's batcher now and then holds a queued batch ~500 ms when an instance
    # frees up (README, "Serving overhead"); what this guards against, waiting for the abandoned
    # requests' 60 s timeout or for a server restart, is far longer
    assert all(nxt < busy12 + 3 * idle + 0.6 for _, nxt in timings), (busy12, timings)
    assert settled < 3 * idle + 0.1, (idle, settled)
    assert server.process.poll() is None and server.process.pid == pid
    assert server.stop(timeout=CLEAN_EXIT_S + 12) == 0, server.log_tail()
