"""Stop ``serve`` on SIGTERM (a rolling update, a scale-down) without failing a request: a
drain bounded in time, then a stop bounded in time, then an exit code that says which.

Why not just pass the signal on: measured on this Triton (2.51, ``tests/test_serving_rolling.py``),
a tritonserver sent SIGINT or SIGTERM stops every model's scheduler at once, so each ensemble
request in flight fails at its next step with UNAVAILABLE "Server is stopping, scheduler for
model has stopped accepting new inference requests" (16 of 16 in flight, measured); and after a
supervisor reload of a model whose stub was killed it never finishes unloading the old
instance, waits its exit timeout (30 s) and exits 1. So ``serve``, on the first SIGTERM or
SIGINT (:func:`graceful_stop`):

1. **stops the supervisor** acting: no reload, no restart from here (a step in progress gets
   ``SUPERVISOR_STOP_S``);
2. **drains**: unloads the ensemble through model control. Server and ensemble readiness
   answer false at once (a load balancer stops sending); a new request is refused with
   NOT_FOUND "... has no available versions", retryable under docs/service-contract.md (the
   SDK raises ``RecoveringError``, an ``UnavailableError``); the requests in flight run to the
   end through the composing models, which stay loaded. Triton reports the ensemble
   UNAVAILABLE once the last one has answered. Bounded by ``drain_timeout``
   (``serve --drain-timeout``, default ``DRAIN_TIMEOUT_S``);
3. **stops tritonserver**: SIGINT (it unloads the composing models and exits, 2-5 s measured);
   after ``STOP_TIMEOUT_S`` SIGKILL of its process group, stubs included (the reloaded instance
   that never unloads). Nothing is in flight by then, so nothing is lost by the kill.

A second signal during all this cuts the drain short and kills at once.

Exit code of ``serve`` after a signal: 0 when every request in flight was answered (also when
tritonserver had to be killed after the drain); ``EXIT_DRAIN_INCOMPLETE`` (3) when it was not
(the drain timed out, was cut short, or tritonserver stopped answering): requests still in
flight were cut off.

The budget: the whole stop takes at most :func:`stop_budget` seconds (26 s with the defaults),
inside Kubernetes' default ``terminationGracePeriodSeconds`` (``GRACE_PERIOD_S``, 30 s), and
inside the Helm chart's grace period less its preStop pause (tests/test_serving_logic.py reads
deploy/helm/imageragturbo/values.yaml).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .server import ServerError  # standard library only (the CLI reads the defaults for --help)

GRACE_PERIOD_S = 30.0      # Kubernetes' default terminationGracePeriodSeconds: the stop fits in it
SUPERVISOR_STOP_S = 2.0    # a supervisor step in progress (a canary, a reload) may finish in this
DRAIN_TIMEOUT_S = 15.0     # requests in flight (serve --drain-timeout)
STOP_TIMEOUT_S = 8.0       # tritonserver unloading its models after the drain (2-5 s measured)
KILL_WAIT_S = 1.0          # SIGKILL to the process reaped (and the HTTP calls' slack)
POLL_S = 0.05              # how often the drain asks Triton for the ensemble's state
EXIT_DRAIN_INCOMPLETE = 3  # serve's exit code when requests in flight may have been cut off


def stop_budget(drain_timeout: float = DRAIN_TIMEOUT_S) -> float:
    """The most seconds ``serve`` takes from a SIGTERM to its exit."""
    return SUPERVISOR_STOP_S + drain_timeout + STOP_TIMEOUT_S + KILL_WAIT_S


@dataclass
class StopReport:
    """What one graceful stop did: whether the drain finished (every request in flight
    answered) and how long it took; tritonserver's exit code and whether it was killed; the
    whole stop's seconds; ``note``, why the drain did not finish (empty when it did)."""

    drained: bool
    drain_seconds: float
    tritonserver_code: int | None
    killed: bool
    seconds: float
    note: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.drained else EXIT_DRAIN_INCOMPLETE


def drain(server, deadline: float, hurry: threading.Event | None = None,
          model: str | None = None) -> tuple[bool, str]:
    """Unload ``model`` and wait, until the monotonic ``deadline``, for Triton to report it
    unloaded (its requests in flight all answered); ``model`` defaults to the ensemble.
    (True, "") when it did; (False, why) when the deadline passed, ``hurry`` was set, or the
    server stopped answering first. A model that comes back READY meanwhile (a reload that was
    in progress) is unloaded again."""
    if model is None:
        from imageragturbo.client.contract import ENSEMBLE_NAME

        model = ENSEMBLE_NAME
    p = server.process
    if p is None or p.poll() is not None:
        return True, ""  # no tritonserver (a restart in progress): nothing can be in flight
    unload = True
    last_error = ""
    while True:
        try:
            if unload:
                server.unload_model(model, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                unload = False
            state = server.model_state(model, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            if state == "UNAVAILABLE":
                return True, ""
            unload = state in ("READY", "LOADING")
        except ServerError as e:
            if server.process is None or server.process.poll() is not None:
                return False, f"tritonserver exited during the drain ({e})"
            last_error = f"; last answer: {e}"
        if hurry is not None and hurry.is_set():
            return False, "a second signal cut the drain short"
        if time.monotonic() >= deadline:
            return False, f"requests still in flight after the drain timeout{last_error}"
        time.sleep(POLL_S)


def graceful_stop(server, supervisor=None, drain_timeout: float = DRAIN_TIMEOUT_S,
                  hurry: threading.Event | None = None,
                  say: Callable[[str], None] | None = None) -> StopReport:
    """Drain ``server`` (a running ``TritonServer``) and stop it within
    ``stop_budget(drain_timeout)`` seconds, ``supervisor`` (if any) stopped first; what
    happened goes to ``say``, one line per step."""
    say = say or (lambda msg: None)
    t0 = time.monotonic()
    if supervisor is not None:
        supervisor.stand_down()  # no reload, no restart from here on
    say(f"draining: readiness is false and new requests are refused (retryable); requests in "
        f"flight get up to {drain_timeout:g} s")
    drained, note = drain(server, t0 + drain_timeout, hurry)
    drain_seconds = time.monotonic() - t0
    if drained:
        say(f"drained in {drain_seconds:.1f} s: every request in flight was answered")
    else:
        say(f"drain not finished after {drain_seconds:.1f} s ({note}): requests still in "
            "flight are cut off")
    if supervisor is not None:
        supervisor.stop(timeout=SUPERVISOR_STOP_S)
    t1 = time.monotonic()
    code, killed = server.terminate(STOP_TIMEOUT_S, hurry)
    if killed:
        say(f"tritonserver had not exited {time.monotonic() - t1:.1f} s after SIGINT "
            f"(unloading its models; a model reloaded after its stub died never finishes, "
            "Triton 2.51): killed its process group")
    elif code is not None:
        say(f"tritonserver exited with code {code} in {time.monotonic() - t1:.1f} s")
    return StopReport(drained, drain_seconds, code, killed, time.monotonic() - t0, note)
