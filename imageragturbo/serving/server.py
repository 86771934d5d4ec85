"""Start and stop a real Triton Inference Server for a rendered model repository.

NVIDIA's ``tritonserver`` on PATH is used when there is one (its own backends directory);
otherwise the server inside the ``nvidia-pytriton`` wheel, with a Python backend directory
assembled from the wheel's parts (docs/design.md, "Facts about the
machines"). The server is started from this interpreter's environment (its ``bin`` first on
PATH), so the Python backend's model.py files import this environment's numpy, onnxruntime,
hnswlib and ``imageragturbo``. It binds 127.0.0.1 unless told otherwise.

Model control is explicit and restricted: the server loads every model at start
(``--model-control-mode=explicit --load-model=*``) and accepts load and unload only with a
header whose value is a secret this object draws for each server (``--grpc-restricted-protocol``
and ``--http-restricted-api``), so ``serve``'s supervisor can reload a broken model and an
outside client cannot unload anything.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerError(RuntimeError):
    """The server could not be found, did not start, or did not become ready."""


@dataclass
class TritonBinary:
    """Where a tritonserver lives: the executable, its backends folder and extra libraries."""

    executable: Path
    backend_dir: Path
    lib_dirs: list[Path] = field(default_factory=list)
    source: str = "nvidia"


def _pytriton_root() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def python_backend_dir(pytriton: Path, cache: Path) -> Path:
    """A backends folder whose ``python/`` holds the wheel's libtriton_python.so and
    triton_python_backend_utils.py plus the stub for this Python version (the wheel keeps
    the stubs apart)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = pytriton / "tritonserver" / "backends" / "python"
    stub = pytriton / "tritonserver" / "python_backend_stubs" / version / \
        "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} "
                          f"({stub} is missing)")
    dst = cache / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (src / "libtriton_python.so", src / "triton_python_backend_utils.py", stub):
        link = dst / f.name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and link.resolve() == f.resolve():
                continue
            link.unlink()
        link.symlink_to(f.resolve())
    return dst.parent


def find_tritonserver(cache: str | Path = "runs/serve") -> TritonBinary:
    """NVIDIA's tritonserver on PATH (with /opt/tritonserver/backends or TRITON_BACKENDS), else
    the one in the nvidia-pytriton wheel."""
    exe = shutil.which("tritonserver")
    if exe:
        backends = Path(os.environ.get("TRITON_BACKENDS", "/opt/tritonserver/backends"))
        return TritonBinary(Path(exe), backends, [], "nvidia")
    root = _pytriton_root()
    if root is None:
        raise ServerError("no tritonserver found: none on PATH and the nvidia-pytriton wheel is "
                          "not installed (pip install -e '.[serve]')")
    exe = root / "tritonserver" / "bin" / "tritonserver"
    if not exe.exists():
        raise ServerError(f"nvidia-pytriton is installed but {exe} is missing")
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonBinary(exe, python_backend_dir(root, Path(cache).resolve()), [libs] if libs.is_dir()
                        else [], "nvidia-pytriton")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


ADMIN_KEY = "imageragturbo-admin"  # the header that carries the model-control secret


def http_error_message(e) -> str:
    """The ``error`` Triton put in an HTTP error answer's JSON body ("" when there is none)."""
    try:
        return json.loads(e.read().decode()).get("error", "")
    except ValueError:
        return ""


class TritonServer:
    """A tritonserver process serving ``repository``: ``start()``, ``wait_ready()``,
    ``stop()``, or use it as a context manager (started and ready on entry, stopped on exit).

    ``grpc_port`` / ``http_port`` default to free ports; the log goes to ``log_path``.
    """

    def __init__(self, repository: str | Path, host: str = "127.0.0.1",
                 grpc_port: int | None = None, http_port: int | None = None,
                 log_path: str | Path | None = None, cache: str | Path = "runs/serve",
                 log_verbose: int = 0, extra_args: list[str] | None = None,
                 metrics_port: int | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, tls_ca: str | Path | None = None,
                 exit_timeout: int = 30):
        self.repository = Path(repository).resolve()
        self.host = host
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        # gRPC over TLS (server certificate and key); with ``tls_ca`` mutual TLS: clients must
        # present a certificate that CA signed.
        if bool(tls_cert) != bool(tls_key):
            raise ServerError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if tls_ca and not tls_cert:
            raise ServerError("mutual TLS (--tls-ca) needs the server's --tls-cert and --tls-key")
        for f in (tls_cert, tls_key, tls_ca):
            if f and not Path(f).is_file():
                raise ServerError(f"TLS file {f} does not exist")
        self.tls = {"cert": tls_cert, "key": tls_key, "ca": tls_ca} if tls_cert else None
        self.cache = Path(cache)
        self.log_path = Path(log_path) if log_path else self.cache / "tritonserver.log"
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self.binary: TritonBinary | None = None
        # Seconds Triton waits for in-flight work at shutdown. A model whose stub was killed
        # never finishes unloading in this Triton (2.51): a server that healed one waits this
        # long and exits 1.
        self.exit_timeout = int(exit_timeout)
        # The model-control secret: clients over the network never see it, but it is on
        # tritonserver's command line, so any local user can read it through /proc (unless
        # /proc is mounted with hidepid): on a shared host, local users can unload models.
        self._admin_secret = secrets.token_hex(16)
        self._started = False
        # ``terminate`` closes the server for good: a ``start`` after it (a supervisor restart
        # racing a shutdown) is refused, so no tritonserver outlives ``serve``.
        self._lock = threading.Lock()
        self._closed = False

    @property
    def _client_host(self) -> str:
        """Where a local client reaches the server (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def metrics_url(self) -> str:
        """Triton's Prometheus endpoint."""
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def url(self) -> str:
        """host:port of the gRPC endpoint (what the SDK takes)."""
        return f"{self._client_host}:{self.grpc_port}"

    def command(self) -> list[str]:
        b = self.binary
        return [str(b.executable), f"--model-repository={self.repository}",
                f"--backend-directory={b.backend_dir}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                # Prometheus metrics, bound like the rest (http://host:metrics_port/metrics)
                "--allow-metrics=true", "--allow-gpu-metrics=false",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--strict-readiness=true", "--exit-on-error=true",
                f"--exit-timeout-secs={self.exit_timeout}",
                "--model-control-mode=explicit", "--load-model=*",
                f"--grpc-restricted-protocol=model-repository:{ADMIN_KEY}={self._admin_secret}",
                f"--http-restricted-api=model-repository:{ADMIN_KEY}={self._admin_secret}",
                f"--log-verbose={self.log_verbose}", *self._tls_args(), *self.extra_args]

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.tls['cert']).resolve()}",
                f"--grpc-server-key={Path(self.tls['key']).resolve()}"]
        if self.tls["ca"]:
            args += [f"--grpc-root-cert={Path(self.tls['ca']).resolve()}",
                     "--grpc-use-ssl-mutual=true"]
        return args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        bindir = sysconfig.get_path("scripts")  # this environment's bin/ first on PATH
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        libs = [str(p) for p in self.binary.lib_dirs]
        # The stub embeds libpython: make it load this interpreter's own (the system's may be
        # another patch release whose lib-dynload modules, e.g. _ssl, do not link against it).
        libdir = sysconfig.get_config_var("LIBDIR")
        ldlib = sysconfig.get_config_var("LDLIBRARY")
        if libdir and ldlib and (Path(libdir) / ldlib).exists():
            libs.insert(0, libdir)
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self) -> TritonServer:
        if self.process is not None:
            raise ServerError("server already started")
        for port in (self.grpc_port, self.http_port, self.metrics_port):
            if _port_in_use(self.host if self.host != "0.0.0.0" else "127.0.0.1", port):
                raise ServerError(f"port {port} on {self.host} is in use (another server?); "
                                  "choose another with --grpc-port / --http-port")
        self.binary = find_tritonserver(self.cache)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._closed:
                raise ServerError("the server is shutting down: not starting it again")
            # A restart (by the supervisor) appends, so the log of the failure stays.
            log = open(self.log_path, "ab" if self._started else "wb")
            self._started = True
            try:
                # Own process group, so Ctrl-C in a terminal reaches us, and we stop it in order.
                self.process = subprocess.Popen(self.command(), stdout=log,
                                                stderr=subprocess.STDOUT,
                                                env=self.environment(), start_new_session=True)
            finally:
                log.close()
        return self

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    def http_ok(self, path: str, timeout: float = 2.0) -> bool:
        """Whether a GET of ``path`` on Triton's HTTP API answers 200 (e.g.
        ``/v2/health/ready``, ``/v2/models/<name>/ready``); False when it answers otherwise or
        not at all."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _post(self, path: str, body: dict | None = None, admin: bool = False,
              timeout: float = 60.0) -> dict | list:
        """POST to Triton's HTTP API (plain HTTP on the server's host, so it works under TLS and
        mutual TLS, which cover gRPC); ServerError with Triton's message on failure."""
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if admin:
            headers[ADMIN_KEY] = self._admin_secret
        req = urllib.request.Request(self.http_url + path, data=json.dumps(body or {}).encode(),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode() or "{}"
                return json.loads(text)
        except urllib.error.HTTPError as e:
            raise ServerError(f"{path}: HTTP {e.code} {http_error_message(e)}".strip()) from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{path}: {e}") from None

    def unload_model(self, name: str, timeout: float = 60.0) -> None:
        """Unload ``name`` (its dependents, the ensemble, go with it): model control with the
        secret header."""
        self._post(f"/v2/repository/models/{name}/unload", admin=True, timeout=timeout)

    def load_model(self, name: str, timeout: float = 120.0) -> None:
        """Load (or reload) ``name`` from the repository; Triton loads its dependents again."""
        self._post(f"/v2/repository/models/{name}/load", admin=True, timeout=timeout)

    def model_state(self, name: str, timeout: float = 2.0) -> str:
        """The state of ``name`` in Triton's repository index: "READY", "LOADING", "UNLOADING"
        (an unloaded model with requests still in flight) or "UNAVAILABLE" (unloaded, or not
        in the index). Model control, so with the secret; ServerError when Triton does not
        answer."""
        index = self._post("/v2/repository/index", admin=True, timeout=timeout)
        states = {m.get("state", "") for m in index if m.get("name") == name}
        return next((s for s in ("READY", "LOADING", "UNLOADING") if s in states),
                    "UNAVAILABLE")

    def stub_processes(self) -> dict[str, list[int]]:
        """The live Python-backend stub processes of this server, {model name: [pid, ...]}
        (children of tritonserver whose arguments name a model's ``model.py``; exited and
        zombie stubs are left out)."""
        out: dict[str, list[int]] = {}
        if self.process is None:
            return out
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) != self.process.pid or fields[0] in ("Z", "X"):
                    continue
                cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            model = next((Path(a.decode()).parent.parent.name for a in cmd
                          if a.endswith(b"model.py")), None)
            if model:
                out.setdefault(model, []).append(int(stat.parent.name))
        return out

    def kill(self) -> None:
        """SIGKILL tritonserver and its stubs (its own process group): for a server that is
        stuck, when waiting out its exit timeout would only lengthen the outage."""
        p = self.process
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
        self.process = None

    def terminate(self, timeout: float,
                  hurry: threading.Event | None = None) -> tuple[int | None, bool]:
        """Stop for good within ``timeout`` seconds (plus a moment to reap): SIGINT (Triton
        unloads its models and exits), then, if it is still running when ``timeout`` passes or
        ``hurry`` is set, SIGKILL of its process group (tritonserver and its stubs). Later
        ``start`` calls are refused. Returns (tritonserver's exit code, whether it was
        killed); (None, False) when nothing was running.

        A SIGINT with ensemble requests in flight fails them (Triton 2.51 stops every
        model's scheduler at once): drain first (``serving/shutdown.py``)."""
        with self._lock:
            self._closed = True
            p = self.process
        if p is None:
            return None, False
        killed = False
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
            end = time.monotonic() + timeout
            while p.poll() is None and time.monotonic() < end:
                if hurry is not None and hurry.is_set():
                    break
                time.sleep(0.05)
            if p.poll() is None:  # the leader is alive, so its group id is still its own
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                    killed = True
                except (ProcessLookupError, PermissionError):
                    pass
        p.wait()
        if not killed:  # stubs a tritonserver that gave up (exit timeout) may have left
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process = None
        return p.returncode, killed

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def is_ready(self) -> bool:
        if self.tls:  # gRPC needs a client certificate under mutual TLS: ask HTTP instead
            return self.http_ok("/v2/health/ready")
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        try:
            with grpcclient.InferenceServerClient(self.url) as c:
                return bool(c.is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False

    def wait_ready(self, timeout: float = 300.0, progress: bool = True) -> None:
        """Block until the server reports ready (every model loaded: graphs, tokenizer,
        index), printing progress every few seconds; raise ServerError with the log's tail
        if it exits or ``timeout`` passes first."""
        t0 = time.monotonic()
        last = -10.0
        while True:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} "
                                  f"while loading; log {self.log_path}:\n{self.log_tail()}")
            if self.is_ready():
                if progress:
                    print(f"serve: ready on {self.url} (gRPC) in "
                          f"{time.monotonic() - t0:.1f} s; metrics at {self.metrics_url}",
                          file=sys.stderr, flush=True)
                return
            waited = time.monotonic() - t0
            if waited > timeout:
                self.stop()
                raise ServerError(f"tritonserver not ready after {timeout:.0f} s; log "
                                  f"{self.log_path}:\n{self.log_tail()}")
            if progress and waited - last >= 5.0:
                last = waited
                print(f"serve: waiting for the models to load ({waited:.0f} s; log "
                      f"{self.log_path})", file=sys.stderr, flush=True)
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (Triton unloads the models and exits), then SIGTERM, then SIGKILL."""
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0),
                              (signal.SIGKILL, 10.0)):
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process = None
        return p.returncode

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
