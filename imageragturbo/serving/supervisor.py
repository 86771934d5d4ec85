"""Keep a served ensemble healthy without a person: ``serve`` runs a :class:`Supervisor` next
to its tritonserver.

Why: Triton 2.51 (the nvidia-pytriton build) does not restart a Python-backend stub that died.
After ``kill -9`` of one (the retriever, preprocess, an ONNX stage runner), every request fails
with INTERNAL "Stub process '<model>_0_0' is not healthy" for good, while the server and the
ensemble still report ready. The supervisor closes that gap:

- **Watch** (every ``interval`` seconds, 0.5 by default): the stub processes of tritonserver,
  by model. A stub that is gone (or a zombie) names the model to heal; nothing is sent to the
  server, so this costs no capacity.
- **Canary** (every ``canary_every`` seconds): one small request through the ensemble over
  HTTP. A "Stub process ... is not healthy" answer names the model; any other failure twice in
  a row (a stuck or broken server) restarts the server.
- **Heal a model**: unload it (the ensemble goes with it, so readiness reports false from
  here), then load it again (Triton loads the ensemble again; ready again). Model control is
  restricted to a secret only this process knows (:class:`TritonServer`).
- **Restart**: SIGKILL tritonserver and its stubs, start it again on the same ports, wait until
  ready. Used when a reload fails, the server process exited, the canary keeps failing, or
  ``max_reloads`` dead instances have piled up (this Triton never finishes unloading a model
  instance whose stub was killed; each reload leaves one such instance behind, so reloads are
  bounded and a restart clears them).

Clients see UNAVAILABLE-class errors meanwhile (the SDK maps the stub message and the
"no available versions" of an unloaded ensemble to :class:`RecoveringError`, and retries).

``stand_down`` (``serve`` draining on SIGTERM, ``serving/shutdown.py``) stops the thread and
any step in progress from acting further: no reload, no load of the ensemble, no restart.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from imageragturbo.client import contract as C

from .server import ServerError, TritonServer, http_error_message

_STUB = re.compile(r"Stub process '(.+)_\d+_\d+' is not healthy")
CANARY_PROMPT = "a red circle"


@dataclass
class Event:
    """One recovery: ``kind`` "reload" or "restart", the ``models`` it covered, why, when it
    started (monotonic seconds) and how long it took until the ensemble was ready again."""

    kind: str
    models: list[str]
    reason: str
    started: float
    seconds: float = 0.0
    ok: bool = False


class Supervisor:
    """Watch ``server`` (started and ready) from a background thread: ``start()``, ``stop()``.

    ``events`` lists the recoveries so far; ``error`` is set (and the thread ends) when the
    server could not be brought back, so the caller can exit non-zero.
    """

    def __init__(self, server: TritonServer, interval: float = 0.5,
                 canary_every: float = 5.0, canary_timeout: float = 30.0,
                 max_reloads: int = 8, ready_timeout: float = 300.0, quiet: bool = False):
        if interval <= 0 or canary_every <= 0:
            raise ValueError("supervisor intervals must be > 0 seconds")
        self.server = server
        self.interval = interval
        self.canary_every = canary_every
        self.canary_timeout = canary_timeout
        self.max_reloads = max_reloads
        self.ready_timeout = ready_timeout
        self.quiet = quiet
        self.events: list[Event] = []
        self.error: str | None = None
        self.dead_instances = 0        # reloaded models' instances Triton cannot unload
        self._known: dict[str, list[int]] = {}
        self._canary_failures = 0
        self._stop = threading.Event()
        self._standing_down = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Supervisor:
        self._known = self.server.stub_processes()
        self._thread = threading.Thread(target=self._run, name="imageragturbo-supervisor",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching; wait up to ``timeout`` seconds (None: until done) for a check, a
        reload or a restart in progress to finish (the thread is a daemon; ``stand_down``
        first keeps a step in progress from acting further)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def stand_down(self) -> None:
        """Act no more, from now on: the thread stops, and a check, reload or restart in
        progress ends at its next step (a drain has unloaded the ensemble on purpose; the
        server is about to be stopped). Returns at once; ``stop`` waits for the thread."""
        self._standing_down.set()
        self._stop.set()

    @property
    def standing_down(self) -> bool:
        return self._standing_down.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"serve: supervisor: {msg}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        next_canary = time.monotonic() + self.canary_every
        failures = 0
        while not self._stop.wait(self.interval):
            try:
                self.check()
                if time.monotonic() >= next_canary:
                    self.canary_check()
                    next_canary = time.monotonic() + self.canary_every
            except ServerError as e:  # a restart that failed: nothing more to try
                if self.standing_down:  # the server is being stopped under it: not a failure
                    return
                self.error = str(e)
                self._say(f"giving up: {e}")
                return
            except Exception as e:  # noqa: BLE001 - one odd answer must not end supervision
                if self.standing_down:
                    return
                failures += 1
                self._say(f"check failed ({type(e).__name__}: {e}); {failures} in a row")
                if failures >= 10:
                    self.error = f"{failures} checks in a row failed, last: {e}"
                    return
            else:
                failures = 0

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """One watch step: restart an exited server, heal models whose stubs are gone."""
        p = self.server.process
        if p is None or p.poll() is not None:
            code = None if p is None else p.returncode
            self.restart([], f"tritonserver exited (code {code})")
            return
        live = self.server.stub_processes()
        dead = sorted(m for m, pids in self._known.items()
                      if any(pid not in live.get(m, []) for pid in pids))
        if dead:
            self.heal(dead, "stub process gone")

    def canary(self) -> str | None:
        """One request through the ensemble (HTTP, so it works under mutual TLS); None when it
        gave an image of the served shape, else the error."""
        body = {"inputs": [
            {"name": t.name, "shape": [1, 1], "datatype": t.dtype, "data": [value]}
            for t, value in ((C.PROMPT, CANARY_PROMPT), (C.SEED, 0))],
            "outputs": [{"name": C.IMAGE_OUT.name, "parameters": {"binary_data": True}}]}
        req = urllib.request.Request(
            f"{self.server.http_url}/v2/models/{C.ENSEMBLE_NAME}/infer", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.canary_timeout) as r:
                data = r.read()
                n = int(r.headers.get("Inference-Header-Content-Length") or len(data))
        except urllib.error.HTTPError as e:
            return http_error_message(e) or f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            return f"no answer: {e}"
        try:
            out = json.loads(data[:n].decode())["outputs"][0]
            h, w, c = out["shape"][1:]
            if c != 3 or len(data) - n != h * w * 3:
                return f"canary image has shape {out['shape']} and {len(data) - n} bytes"
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return f"canary answer unreadable: {e}"
        return None

    def canary_check(self) -> None:
        err = self.canary()
        if self.standing_down:  # a drain unloads the ensemble: its canary fails by design
            return
        if err is None:
            self._canary_failures = 0
            return
        self._canary_failures += 1
        m = _STUB.search(err)
        if m:
            self.heal([m.group(1)], f"canary: {err}")
        elif self._canary_failures >= 2:
            self.restart([], f"canary failed twice: {err}")
        else:
            self._say(f"canary failed ({err}); trying again before acting")

    # ------------------------------------------------------------------ recovery

    def _ready(self, model: str) -> bool:
        return self.server.http_ok(f"/v2/models/{model}/ready", timeout=5.0)

    def heal(self, models: list[str], reason: str) -> Event:
        """Reload each of ``models`` (unload, load), then the ensemble if it did not come back;
        a restart instead when a reload fails or too many dead instances have piled up."""
        if self.dead_instances + len(models) > self.max_reloads:
            return self.restart(models, f"{reason}; {self.dead_instances} dead instances "
                                        "already (a restart clears them)")
        ev = Event("reload", list(models), reason, time.monotonic())
        if self.standing_down:
            return ev
        self._say(f"reloading {', '.join(models)} ({reason})")
        old = self.server.stub_processes()
        try:
            for m in models:
                self.server.unload_model(m)
            for m in models:
                if self.standing_down:
                    return ev
                self.server.load_model(m, timeout=self.ready_timeout)
                self.dead_instances += 1
            if self.standing_down:  # a drain unloads the ensemble: do not load it back
                return ev
            if not self._ready(C.ENSEMBLE_NAME):
                self.server.load_model(C.ENSEMBLE_NAME, timeout=self.ready_timeout)
        except ServerError as e:
            if self.standing_down:
                return ev
            self._say(f"reload failed ({e}); restarting the server")
            return self.restart(models, f"{reason}; reload failed: {e}")
        ev.seconds, ev.ok = time.monotonic() - ev.started, True
        self.events.append(ev)
        # Only the stubs the reload started are the models' now: the old instances' stubs
        # (another instance's included) are still being torn down and would look "gone".
        live = self.server.stub_processes()
        for m in models:
            live[m] = [pid for pid in live.get(m, []) if pid not in old.get(m, [])]
        self._known = live
        self._canary_failures = 0
        self._say(f"reloaded {', '.join(models)} in {ev.seconds:.1f} s")
        return ev

    def restart(self, models: list[str], reason: str) -> Event:
        """Kill tritonserver and its stubs, start it again on the same ports, wait until ready.
        ServerError when it does not come back."""
        ev = Event("restart", list(models), reason, time.monotonic())
        if self.standing_down:
            return ev
        self._say(f"restarting tritonserver ({reason})")
        self.events.append(ev)
        self.server.kill()
        if self.standing_down:  # ``start`` also refuses once the server is terminated
            return ev
        self.server.start()
        self.server.wait_ready(self.ready_timeout, progress=False)
        ev.seconds, ev.ok = time.monotonic() - ev.started, True
        self.dead_instances = 0
        self._known = self.server.stub_processes()
        self._canary_failures = 0
        self._say(f"restarted in {ev.seconds:.1f} s")
        return ev
