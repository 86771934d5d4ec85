"""Rolling updates (issue 21, item 6): ``imageragturbo serve`` sent SIGTERM with requests in
flight stops reporting ready at once, answers every request in flight, refuses new ones with
the contract's retryable error, and exits within its stop budget with an honest code; also
after its supervisor has reloaded a model (Triton 2.51 then never finishes unloading the old
instance). ``serve`` runs as a real process here (its signal handling is the subject), on the
test model of conftest.py, each test with its own tritonserver."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from serving_support import PROMPTS

from imageragturbo.client import (
    NO_RETRY,
    AsyncImageRAGTurboClient,
    ImageRAGTurboClient,
    RecoveringError,
)
from imageragturbo.serving.server import free_port
from imageragturbo.serving.shutdown import EXIT_DRAIN_INCOMPLETE, stop_budget

IN_FLIGHT = 16   # concurrent requests at the signal, each of BATCH prompts (~1-3 s of work here)
BATCH = 8
READY_FALSE_S = 1.0  # stated bound, SIGTERM -> readiness false (measured 0.01-0.03 s)


class Serve:
    """``imageragturbo serve`` on the test model as a child process (own ports, repository
    and log under ``tmp``), and what a load balancer and a client see of it."""

    def __init__(self, assets, tmp, *args: str):
        self.tmp = tmp
        self.grpc, self.http = free_port(), free_port()
        self.log = tmp / "serve.log"
        cmd = [sys.executable, "-m", "imageragturbo.commands", "serve", "--model",
               str(assets["model"]), "--export", str(assets["adapter"]), "--index",
               str(assets["index"]), "--out", str(tmp / "repo"), "--grpc-port", str(self.grpc),
               "--http-port", str(self.http), *args]
        with open(self.log, "wb") as log:  # cwd: runs/ and data/ of serve's defaults go there
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready",
                                        timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_until(self, what, timeout: float, why: str) -> None:
        end = time.monotonic() + timeout
        while not what():
            assert self.process.poll() is None, f"serve exited: {self.text()[-3000:]}"
            assert time.monotonic() < end, f"{why} not within {timeout} s: {self.text()[-3000:]}"
            time.sleep(0.1)

    def stubs(self, model: str) -> list[int]:
        """Pids of the Python-backend stubs of ``model`` (children of serve's tritonserver)."""
        def children(pid):
            out = []
            for d in os.listdir("/proc"):
                try:
                    if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1]
                                           .split()[1]) == pid:
                        out.append(int(d))
                except OSError:
                    pass
            return out
        triton = children(self.process.pid)
        return [c for t in triton for c in children(t)
                if f"/{model}/1/model.py".encode() in open(f"/proc/{c}/cmdline", "rb").read()]

    def leftovers(self) -> str:
        return subprocess.run(["pgrep", "-f", str(self.tmp / "repo")], capture_output=True,
                              text=True).stdout.strip()

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.leftovers().split():  # a failed test's tritonserver and stubs
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def serve(assets, tmp_path):
    started = []

    def start(*args: str) -> Serve:
        s = Serve(assets, tmp_path, *args)
        started.append(s)
        # serve's own state, not only tritonserver's: the signal path under test is the one
        # taken once serve has seen the models ready (it polls every 0.5 s)
        s.wait_until(lambda: s.ready() and "Ctrl-C stops the server" in s.text(), 180, "ready")
        return s

    yield start
    for s in started:
        s.cleanup()


def _sigterm_under_load(s: Serve):
    """IN_FLIGHT requests of BATCH prompts sent at once, SIGTERM to serve while they run,
    then one request more. Returns (seconds from SIGTERM to readiness false, each in-flight
    request's (error or None, answered after the signal?), the late request's error, the
    monotonic time of the signal)."""
    async def run():
        async with AsyncImageRAGTurboClient(s.url, timeout=60, retry=NO_RETRY) as c:
            await c.generate_batch([PROMPTS[0]] * BATCH, seeds=list(range(BATCH)), k=1)
            signalled = []

            async def one(i):
                try:
                    await c.generate_batch([PROMPTS[i % 3]] * BATCH,
                                           seeds=list(range(BATCH)), k=1)
                    return None, bool(signalled)
                except Exception as e:  # noqa: BLE001 - what comes back is the subject
                    return e, bool(signalled)

            tasks = [asyncio.create_task(one(i)) for i in range(IN_FLIGHT)]
            await asyncio.sleep(0.05)                 # sent: queued and running on the server
            s.process.send_signal(signal.SIGTERM)
            t_sig = time.monotonic()
            signalled.append(t_sig)
            while await asyncio.to_thread(s.ready):
                assert time.monotonic() - t_sig < 10, "readiness stayed true"
                await asyncio.sleep(0.01)
            not_ready = time.monotonic() - t_sig
            try:
                await c.generate(PROMPTS[1], seed=1, k=1)
                late = None
            except Exception as e:  # noqa: BLE001
                late = e
            return not_ready, await asyncio.gather(*tasks), late, t_sig

    return asyncio.run(run())


def _check_drained(s: Serve, not_ready, results, late, t_sig, budget):
    rc = s.process.wait(timeout=budget + 30)
    stopped = time.monotonic() - t_sig
    errors = [repr(e) for e, _ in results if e is not None]
    after = sum(after for _, after in results)
    print(f"SIGTERM -> not ready {not_ready:.2f} s; {len(results) - len(errors)} of "
          f"{len(results)} in-flight requests served ({after} answered after the signal); "
          f"late request: {late!r}; serve exit code {rc} after {stopped:.1f} s")
    assert not_ready < READY_FALSE_S
    assert not errors, errors
    assert after >= 4, "the requests were not in flight at the signal: nothing was drained"
    # the contract's retryable refusal (docs/service-contract.md, "Errors: what to retry")
    assert isinstance(late, RecoveringError), repr(late)
    assert late.status in ("NOT_FOUND", "UNAVAILABLE") and "no available versions" in str(late)
    assert rc == 0, s.text()[-3000:]
    assert stopped <= budget, f"stopped in {stopped:.1f} s, budget {budget} s"
    assert "every request in flight was answered" in s.text()
    assert not s.leftovers(), f"processes left behind: {s.leftovers()}"
    return stopped


def test_sigterm_drains_requests_in_flight_and_exits_0_within_the_budget(serve):
    s = serve()
    budget = stop_budget()
    _check_drained(s, *_sigterm_under_load(s), budget)
    assert f"gone within {budget:g} s" in s.text()


def test_sigterm_after_a_supervisor_reload_exits_within_the_budget(serve):
    """kill -9 of the retriever's stub under traffic, healed by serve's supervisor (a reload:
    Triton 2.51 then never finishes unloading the old instance, and used to wait its 30 s exit
    timeout and exit 1); then SIGTERM with requests in flight: drained, exit 0, within the
    budget (tritonserver is killed once the drain is done)."""
    s = serve()
    with ImageRAGTurboClient(s.url, timeout=60) as c:
        c.generate(PROMPTS[0], seed=1, k=1)
        os.kill(s.stubs("retriever")[0], signal.SIGKILL)
        for i in range(20):  # traffic through the reload (the default retry policy rides it)
            c.generate(PROMPTS[0], seed=i, k=1)
    s.wait_until(lambda: "reloaded retriever" in s.text() and s.ready(), 30, "the reload")
    stopped = _check_drained(s, *_sigterm_under_load(s), stop_budget())
    killed = "killed its process group" in s.text()
    print(f"after a reload: stopped in {stopped:.1f} s (tritonserver killed after the drain: "
          f"{killed})")


def test_a_drain_that_times_out_exits_3_within_the_budget(serve):
    """A drain timeout shorter than the work in flight: serve stops anyway, within
    ``stop_budget(drain timeout)``, and exits EXIT_DRAIN_INCOMPLETE (3), saying that requests
    in flight were cut off."""
    s = serve("--drain-timeout", "0.2")
    not_ready, results, late, t_sig = _sigterm_under_load(s)
    rc = s.process.wait(timeout=stop_budget(0.2) + 30)
    stopped = time.monotonic() - t_sig
    print(f"drain timeout 0.2 s: exit code {rc} after {stopped:.1f} s; "
          f"{sum(e is None for e, _ in results)} of {len(results)} in-flight requests served")
    assert rc == EXIT_DRAIN_INCOMPLETE == 3, s.text()[-3000:]
    assert stopped <= stop_budget(0.2)
    assert "cut off" in s.text() and "exit code 3" in s.text()
    assert not s.leftovers(), f"processes left behind: {s.leftovers()}"
