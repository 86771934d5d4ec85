"""The serving code's decisions, without a tritonserver (issue 22, item 4): the supervisor's
reload-or-restart rules driven through a fake server, ``TritonServer.wait_ready``'s timeout
against a port nobody answers on, and the preprocess backend's request checks with a stand-in
for Triton's ``triton_python_backend_utils``. Cheap: seconds, no model, no server."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from backend_stub import pb_utils_stub

from imageragturbo.client.contract import ENSEMBLE_NAME as ENSEMBLE
from imageragturbo.serving.server import ServerError, TritonServer, free_port
from imageragturbo.serving.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- supervisor


class _Running:
    """A ``subprocess.Popen`` stand-in for a tritonserver that has not exited."""

    returncode = None

    def poll(self):
        return None


class FakeServer:
    """What the supervisor uses of a ``TritonServer``: stub processes by model (a reload
    starts a new stub; ``kill_stub`` is a ``kill -9`` of one), model control, readiness,
    kill/start/wait_ready; every action recorded in ``calls``."""

    http_url = "http://127.0.0.1:1"

    def __init__(self, models=("preprocess", "retriever", "unet_decoder")):
        self.process = _Running()
        self._next = 100
        self.stubs = {m: [self._pid()] for m in models}
        self.calls: list[tuple[str, str]] = []

    def _pid(self) -> int:
        self._next += 1
        return self._next

    def kill_stub(self, model: str) -> None:
        self.stubs[model] = []

    def stub_processes(self):
        return {m: list(p) for m, p in self.stubs.items() if p}

    def unload_model(self, name, timeout=60.0):
        self.calls.append(("unload", name))

    def load_model(self, name, timeout=120.0):
        self.calls.append(("load", name))
        if name in self.stubs:
            self.stubs[name] = [self._pid()]

    def http_ok(self, path, timeout=2.0):
        return True

    def kill(self):
        self.calls.append(("kill", ""))
        self.stubs = {m: [] for m in self.stubs}

    def start(self):
        self.calls.append(("start", ""))
        self.stubs = {m: [self._pid()] for m in self.stubs}
        return self

    def wait_ready(self, timeout=300.0, progress=True):
        self.calls.append(("wait_ready", ""))


def _supervisor(server, **kw) -> Supervisor:
    """A supervisor that has taken its first look at the stubs (``start``) but whose thread
    is already stopped: each step is driven by hand."""
    sup = Supervisor(server, interval=3600, canary_every=3600, quiet=True, **kw).start()
    sup.stop()
    return sup


def test_each_reload_counts_a_dead_instance_and_max_reloads_forces_a_restart():
    """Triton never finishes unloading an instance whose stub was killed: every reload leaves
    one behind. With ``max_reloads`` 2, two killed stubs are reloaded; the third kill (of a
    model reloaded before) is healed by a restart, which clears the count."""
    srv = FakeServer()
    sup = _supervisor(srv, max_reloads=2)
    for model in ("retriever", "preprocess", "retriever"):
        srv.kill_stub(model)
        sup.check()
    assert [(e.kind, e.models) for e in sup.events] == [
        ("reload", ["retriever"]), ("reload", ["preprocess"]), ("restart", ["retriever"])]
    assert "2 dead instances already" in sup.events[-1].reason
    assert [c for c in srv.calls if c[0] in ("load", "kill")] == [
        ("load", "retriever"), ("load", "preprocess"), ("kill", "")]
    assert sup.dead_instances == 0
    srv.kill_stub("unet_decoder")  # after the restart, reloads are allowed again
    sup.check()
    assert sup.events[-1].kind == "reload" and sup.dead_instances == 1


def test_two_models_in_one_heal_count_two_dead_instances():
    srv = FakeServer()
    sup = _supervisor(srv, max_reloads=2)
    srv.kill_stub("retriever"), srv.kill_stub("preprocess")
    sup.check()
    assert sup.events[-1].kind == "reload" and sup.dead_instances == 2
    srv.kill_stub("unet_decoder")
    sup.check()
    assert sup.events[-1].kind == "restart"


def test_a_healthy_watch_step_does_nothing():
    srv = FakeServer()
    sup = _supervisor(srv)
    sup.check()
    assert sup.events == [] and srv.calls == []


def test_the_canary_restarts_only_on_its_second_failure_in_a_row(monkeypatch):
    """A canary failure that names no stub (a stuck server) is tried again before acting;
    the second in a row restarts the server; a success in between resets the count."""
    srv = FakeServer()
    sup = _supervisor(srv)
    answers = iter(["no answer: timed out", None, "no answer: timed out",
                    "no answer: timed out", "HTTP 500"])
    monkeypatch.setattr(sup, "canary", lambda: next(answers))
    sup.canary_check()                        # failure 1
    sup.canary_check()                        # success: the count starts again
    sup.canary_check()                        # failure 1
    assert sup.events == [] and ("kill", "") not in srv.calls
    sup.canary_check()                        # failure 2 in a row
    assert [e.kind for e in sup.events] == ["restart"]
    assert "canary failed twice" in sup.events[0].reason
    assert srv.calls == [("kill", ""), ("start", ""), ("wait_ready", "")]
    sup.canary_check()                        # the restart reset the count: failure 1 again
    assert len(sup.events) == 1


def test_a_canary_naming_a_dead_stub_reloads_that_model_at_once(monkeypatch):
    srv = FakeServer()
    sup = _supervisor(srv)
    monkeypatch.setattr(sup, "canary", lambda: "Stub process 'retriever_0_0' is not healthy.")
    sup.canary_check()
    assert [(e.kind, e.models) for e in sup.events] == [("reload", ["retriever"])]
    assert ("unload", "retriever") in srv.calls and ("kill", "") not in srv.calls
    # the ensemble reports ready again, so it is not loaded by hand
    assert ("load", ENSEMBLE) not in srv.calls


# ----------------------------------------------------------------------------- wait_ready


def _wait_ready_in_thread(server: TritonServer, timeout: float, limit: float):
    """Run ``server.wait_ready(timeout)`` in a daemon thread; (exception, seconds), or fail
    the test when it has not returned after ``limit`` seconds (a hang)."""
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            server.wait_ready(timeout, progress=False)
            out["error"] = None
        except Exception as e:  # noqa: BLE001 - returned to the test
            out["error"] = e
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        pytest.fail(f"wait_ready({timeout}) still waiting after {limit} s")
    return out["error"], out["seconds"]


def _not_ready_server(tmp_path, http_port=None, tls=False) -> TritonServer:
    """A TritonServer whose process runs but never serves: a sleeping child stands in for a
    tritonserver stuck loading its models."""
    kw = {}
    if tls:  # readiness is then asked over HTTP (``http_ok``); the files only need to exist
        for f in ("cert", "key"):
            (tmp_path / f).write_text("x")
        kw = {"tls_cert": tmp_path / "cert", "tls_key": tmp_path / "key"}
    s = TritonServer(tmp_path, log_path=tmp_path / "server.log", cache=tmp_path,
                     http_port=http_port, **kw)
    (tmp_path / "server.log").write_text("loading models...\n")
    # SIGINT restored in the child: a test run started in the background (nohup, `cmd &`)
    # ignores SIGINT, the child would inherit that, and stop()'s SIGINT would do nothing for
    # its 30 s (a real tritonserver installs its own handler)
    s.process = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                                  "signal.SIGINT, signal.default_int_handler); time.sleep(120)"])
    return s


@pytest.mark.parametrize("answer", ["nobody", "503", "silent"])
def test_wait_ready_gives_up_after_its_timeout(tmp_path, answer):
    """A server that never becomes ready: nobody listens on its ports (gRPC readiness), its
    HTTP port answers 503 (TLS: readiness over HTTP), or it accepts connections and never
    answers. ``wait_ready`` raises ServerError with the log's tail after about ``timeout``
    seconds (plus one readiness probe, 2 s at most), and stops the process it gave up on."""
    import http.server
    import socket

    listener = httpd = None
    port = None
    if answer == "503":
        class Busy(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(503)
                self.end_headers()

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
        port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    elif answer == "silent":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections queue up, nothing is ever read or answered
        port = listener.getsockname()[1]
    server = _not_ready_server(tmp_path, http_port=port or free_port(),
                               tls=answer in ("503", "silent"))
    proc = server.process
    try:
        err, seconds = _wait_ready_in_thread(server, timeout=1.0, limit=20.0)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if httpd is not None:
            httpd.shutdown()
        if listener is not None:
            listener.close()
    assert isinstance(err, ServerError), err
    assert "not ready after 1 s" in str(err) and "loading models..." in str(err)
    assert 1.0 <= seconds < 6.0, seconds
    assert server.process is None and proc.returncode is not None  # stopped, not left running


# ----------------------------------------------------------------------------- preprocess


@pytest.fixture
def preprocess(monkeypatch):
    """The preprocess backend's model, as configured by a rendered repository with max_k 4
    (``initialize`` also loads the tokenizer, which these checks never reach)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils_stub())
    spec = importlib.util.spec_from_file_location(
        "preprocess_backend_under_test", ROOT / "model_repository/preprocess/1/model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.TritonPythonModel()
    m.max_length, m.latent_shape, m.timestep = 77, (4, 8, 8), 999
    m.default_k, m.max_k, m.has_adapter, m.max_prompt_chars = 2, 4, True, 1000
    return m


def _request(n=2, **inputs):
    req = {"PROMPT": np.array([f"prompt {i}".encode() for i in range(n)],
                              np.object_).reshape(n, 1)}
    for name, dtype in (("SEED", np.int64), ("K", np.int32), ("STRENGTH", np.float32)):
        if name in inputs:
            req[name] = np.full((n, 1), inputs[name], dtype)
    return req


def test_preprocess_accepts_every_k_from_0_to_max_k_and_refuses_the_rest(preprocess):
    """K in [0, max_k] is served (0: no retrieval; max_k: the most the retriever gives); K
    above max_k or negative gets INVALID_ARG naming the range; no K: the default."""
    for k in range(0, preprocess.max_k + 1):
        prompts, seeds, got, strength = preprocess._parse(_request(K=k, SEED=3))
        assert got == k and prompts == ["prompt 0", "prompt 1"]
        assert seeds.tolist() == [3, 3] and np.isnan(strength).all()
    assert preprocess._parse(_request())[2] == preprocess.default_k
    for k in (preprocess.max_k + 1, -1):
        (resp,) = preprocess.execute([_request(K=k)])
        assert resp.error is not None and resp.error.code == "INVALID_ARG"
        assert resp.error.message == f"K must be in [0, 4] (0 = no retrieval), got {k}"


def test_preprocess_refuses_bad_inputs_one_request_at_a_time(preprocess):
    bad = [_request(SEED=-1), _request(STRENGTH=-0.5), _request(STRENGTH=np.nan),
           {"PROMPT": np.array([b"  "], np.object_).reshape(1, 1)},
           {"PROMPT": np.array([b"\xff"], np.object_).reshape(1, 1)}, {}]
    messages = [r.error.message for r in preprocess.execute(bad)]
    assert [m.split(" ")[0] for m in messages] == [
        "SEED", "STRENGTH:", "STRENGTH", "PROMPT[0]", "PROMPT[0]", "PROMPT"]
    k = {"PROMPT": _request()["PROMPT"], "K": np.array([[1], [2]], np.int32)}
    with pytest.raises(ValueError, match="K must be the same for every prompt"):
        preprocess._parse(k)


# ----------------------------------------------------------------------------- graceful stop


class DrainingServer:
    """What ``graceful_stop`` uses of a ``TritonServer``: the process, model control and the
    ensemble's state in the repository index (``states`` answered in turn, the last one
    repeated), ``terminate``; every action recorded in ``calls``."""

    def __init__(self, states, exits=True):
        self.process = _Running()
        self.states = list(states)
        self.exits = exits              # whether tritonserver exits on SIGINT by itself
        self.calls: list[tuple] = []

    def unload_model(self, name, timeout=60.0):
        self.calls.append(("unload", name))

    def model_state(self, name, timeout=2.0):
        self.calls.append(("state", name))
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def terminate(self, timeout, hurry=None):
        self.calls.append(("terminate", timeout))
        return (0, False) if self.exits else (-9, True)


def test_a_drain_that_finishes_stops_the_supervisor_first_and_exits_0():
    """SIGTERM with requests in flight: the supervisor stands down before anything else, the
    ensemble is unloaded once, the stop waits while Triton says UNLOADING (requests in flight)
    and stops tritonserver once it says UNAVAILABLE; exit code 0."""
    from imageragturbo.serving.shutdown import STOP_TIMEOUT_S, graceful_stop

    srv = DrainingServer(["UNLOADING", "UNLOADING", "UNAVAILABLE"])
    sup = _supervisor(FakeServer())
    lines = []
    report = graceful_stop(srv, sup, drain_timeout=5.0, say=lines.append)
    assert sup.standing_down
    assert srv.calls == [("unload", ENSEMBLE), ("state", ENSEMBLE), ("state", ENSEMBLE),
                         ("state", ENSEMBLE), ("terminate", STOP_TIMEOUT_S)]
    assert report.drained and report.exit_code == 0 and not report.killed
    assert report.drain_seconds < 2.0
    assert any(line.startswith("drained in") for line in lines), lines


def test_a_drain_that_times_out_exits_3_and_says_so():
    """Requests still in flight when the drain timeout passes (Triton keeps answering
    UNLOADING): the stop goes on (tritonserver killed), and the exit code is
    EXIT_DRAIN_INCOMPLETE, not 0."""
    from imageragturbo.serving.shutdown import EXIT_DRAIN_INCOMPLETE, graceful_stop

    srv = DrainingServer(["UNLOADING"], exits=False)
    lines = []
    t0 = time.monotonic()
    report = graceful_stop(srv, None, drain_timeout=0.3, say=lines.append)
    assert 0.3 <= time.monotonic() - t0 < 1.5
    assert not report.drained and report.killed
    assert report.exit_code == EXIT_DRAIN_INCOMPLETE == 3
    assert "drain timeout" in report.note and any("cut off" in line for line in lines), lines
    assert srv.calls[-1][0] == "terminate"


def test_a_second_signal_cuts_the_drain_short():
    from imageragturbo.serving.shutdown import graceful_stop

    srv = DrainingServer(["UNLOADING"])
    hurry = threading.Event()
    threading.Timer(0.2, hurry.set).start()
    t0 = time.monotonic()
    report = graceful_stop(srv, None, drain_timeout=30.0, hurry=hurry)
    assert time.monotonic() - t0 < 2.0
    assert not report.drained and "second signal" in report.note and report.exit_code == 3


def test_an_ensemble_loaded_back_during_the_drain_is_unloaded_again():
    """A supervisor reload in progress at the signal can load the ensemble back after the
    drain unloaded it: the drain unloads it again rather than stopping under live traffic."""
    from imageragturbo.serving.shutdown import drain

    srv = DrainingServer(["READY", "UNLOADING", "UNAVAILABLE"])
    assert drain(srv, time.monotonic() + 5.0) == (True, "")
    assert [c for c in srv.calls if c[0] == "unload"] == [("unload", ENSEMBLE)] * 2


def test_a_supervisor_that_stood_down_reloads_and_restarts_nothing():
    srv = FakeServer()
    sup = _supervisor(srv)
    sup.stand_down()
    srv.kill_stub("retriever")
    sup.check()
    sup.restart([], "canary failed twice")
    assert srv.calls == [] and sup.events == []


def _sleeper(ignore_sigint: bool) -> subprocess.Popen:
    """A process in its own session (as tritonserver is started) with a child in its group:
    it exits on SIGINT, or ignores it (a tritonserver stuck unloading)."""
    handler = "signal.SIG_IGN" if ignore_sigint else "signal.default_int_handler"
    code = (f"import signal, subprocess, sys, time; signal.signal(signal.SIGINT, {handler}); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print('up', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         start_new_session=True)
    assert p.stdout.readline() == b"up\n"
    return p


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("stuck", [False, True])
def test_terminate_kills_the_process_group_when_sigint_is_not_enough(tmp_path, stuck):
    """``terminate``: a process that exits on SIGINT is left to exit (not killed); one that
    ignores it is SIGKILLed with its whole process group (its children: the stubs) after the
    timeout. Either way nothing is left, and the server cannot be started again."""
    server = TritonServer(tmp_path, log_path=tmp_path / "server.log", cache=tmp_path)
    server.process = p = _sleeper(ignore_sigint=stuck)
    t0 = time.monotonic()
    code, killed = server.terminate(timeout=1.0)
    seconds = time.monotonic() - t0
    try:
        assert killed is stuck and server.process is None
        assert (code == -9) if stuck else (code != 0 and seconds < 1.0), (code, seconds)
        assert seconds < 3.0
        deadline = time.monotonic() + 5
        while _group_alive(p.pid) and time.monotonic() < deadline:  # the child: being reaped
            time.sleep(0.05)
        assert not _group_alive(p.pid)
    finally:
        if _group_alive(p.pid):
            os.killpg(p.pid, 9)
    with pytest.raises(ServerError, match="shutting down"):
        server.start()
