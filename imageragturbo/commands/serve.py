"""The serving commands: ``serve``, ``demo``, ``bench serve`` and ``bench soak``.

Standard library only at module level (the main CLI imports this for ``--help``). The
rendering flags come from ``serving.repository.RenderOptions`` (``flags``), which owns their
defaults; the export and index are made here (``assets``) and handed to ``serving``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from imageragturbo.client import contract as C
from imageragturbo.defaults import DATA_ROOT, DEFAULT_MODEL, export_dir_of, index_dir_of

from .flags import add_dataclass_flags, dataclass_from_args


def _options(args: argparse.Namespace):
    """``RenderOptions`` from serve's flags (each named after its field; the queue timeout
    is given in seconds)."""
    from imageragturbo.serving.repository import RenderOptions

    return dataclass_from_args(RenderOptions, args,
                               queue_timeout_us=int(args.queue_timeout * 1e6))


def _assets(args: argparse.Namespace):
    from .assets import prepare

    return prepare(args.model, args.export, args.index, args.data,
                   random_weights=args.random_weights, retrieval_items=args.retrieval_items,
                   quiet=args.quiet)


class _Signals:
    """SIGTERM and SIGINT for ``serve``: while the server starts, they interrupt the start
    (KeyboardInterrupt); once it serves (``serving``), the first asks for a graceful stop
    (``stop``) and a second cuts it short (``hurry``)."""

    def __init__(self):
        self.serving = False
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self.name = ""

    def __call__(self, signum, frame):
        if not self.serving:
            self.name = signal.Signals(signum).name
            raise KeyboardInterrupt
        if self.stop.is_set():
            self.hurry.set()
        else:
            self.name = signal.Signals(signum).name
            self.stop.set()


def _say(msg: str) -> None:
    print(f"serve: {msg}", file=sys.stderr, flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    from imageragturbo.serving.repository import render_repository
    from imageragturbo.serving.server import TritonServer
    from imageragturbo.serving.session import repository_dir
    from imageragturbo.serving.shutdown import (
        EXIT_DRAIN_INCOMPLETE,
        STOP_TIMEOUT_S,
        SUPERVISOR_STOP_S,
        graceful_stop,
        stop_budget,
    )
    from imageragturbo.serving.supervisor import Supervisor

    if args.profile == "gpu" and not args.render_only:
        raise ValueError("the gpu profile runs in NVIDIA's Triton container (onnxruntime "
                         "backend, TensorRT): render it with --render-only --out DIR and start "
                         "`tritonserver --model-repository DIR` there; this machine serves the "
                         "cpu profile")
    assets = _assets(args)
    out = args.out or repository_dir(assets, args.profile)
    link = args.link or ("copy" if args.profile == "gpu" else "symlink")
    render_repository(assets.export_dir, assets.index_dir, out, args.profile, _options(args),
                      link=link)
    if args.render_only:
        print(json.dumps({"repository": str(out), "profile": args.profile, "link": link,
                          "export": str(assets.export_dir), "index": str(assets.index_dir)},
                         indent=2))
        return 0
    server = TritonServer(out, host=args.host, grpc_port=args.grpc_port,
                          http_port=args.http_port, log_path=Path(out).parent / "tritonserver.log",
                          log_verbose=args.log_verbose, tls_cert=args.tls_cert,
                          tls_key=args.tls_key, tls_ca=args.tls_ca)
    # Ctrl-C, and SIGTERM from a process manager, drain and stop the server (shutdown.py;
    # SIGINT is set explicitly: a shell starts background jobs with it ignored).
    signals = _Signals()
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)
    print(f"serve: starting tritonserver ({assets.model}) on {args.host}: gRPC {server.grpc_port}, "
          f"HTTP {server.http_port}", file=sys.stderr, flush=True)
    server.start()
    supervisor = None
    try:
        server.wait_ready(args.ready_timeout)
        signals.serving = True
        print(f"serving {assets.model} at {server.url} (gRPC); try:\n"
              f"  imageragturbo generate --url {server.url} \"a red circle\" -o out.png\n"
              "Ctrl-C stops the server.", flush=True)
        _say(f"on SIGTERM or Ctrl-C: drain for up to {args.drain_timeout:g} s, gone within "
             f"{stop_budget(args.drain_timeout):g} s (exit code 0, or {EXIT_DRAIN_INCOMPLETE} "
             "if requests in flight were cut off)")
        if not args.no_supervise:
            # Heals a dead stub (reload) or a dead or stuck server (restart): README, "Faults".
            supervisor = Supervisor(server, canary_every=args.canary_interval,
                                    ready_timeout=args.ready_timeout).start()
        while not signals.stop.wait(0.5):
            if supervisor is None and server.process.poll() is not None:
                _say(f"tritonserver exited with code {server.process.returncode}; log "
                     f"{server.log_path}")
                return 1
            if supervisor is not None and not supervisor.alive:
                _say(f"could not bring tritonserver back ({supervisor.error}); log "
                     f"{server.log_path}")
                return 1
        print(file=sys.stderr)
        _say(f"{signals.name}: stopping")
        report = graceful_stop(server, supervisor, args.drain_timeout, signals.hurry, _say)
        _say(f"stopped in {report.seconds:.1f} s; exit code {report.exit_code}")
        return report.exit_code
    except KeyboardInterrupt:
        signals.serving = True  # from here a signal only hurries the stop
        if server.process is not None and server.process.poll() is None and server.is_ready():
            # Ready before serve noticed (it polls every 0.5 s): a load balancer probing
            # tritonserver may already route requests here, so drain them as on any stop.
            print(file=sys.stderr)
            _say(f"{signals.name or 'interrupt'} just as the models became ready: stopping")
            report = graceful_stop(server, None, args.drain_timeout, signals.hurry, _say)
            _say(f"stopped in {report.seconds:.1f} s; exit code {report.exit_code}")
            return report.exit_code
        # still starting: nothing is served yet, nothing to drain
        print("\nserve: interrupted while starting; stopping tritonserver", file=sys.stderr,
              flush=True)
        return 0
    finally:
        signals.serving = True  # from here a signal only hurries the stop
        signals.stop.set()
        if supervisor is not None:
            supervisor.stand_down()  # it must not restart the server it is about to lose
            supervisor.stop(timeout=SUPERVISOR_STOP_S)
        if server.process is not None:  # not stopped above (an error, or still starting)
            rc, killed = server.terminate(STOP_TIMEOUT_S, signals.hurry)
            _say(f"tritonserver {'killed' if killed else 'stopped'} (exit code {rc})")


def _cmd_demo(args: argparse.Namespace) -> int:
    from imageragturbo.serving.demo import run_demo

    path = run_demo(args, lambda: _assets(args))
    print(path)
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from imageragturbo.serving.bench import bench_serve, format_table

    res = bench_serve(args, lambda: _assets(args))
    print(json.dumps(res) if args.json else format_table(res))
    return 0


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from imageragturbo.serving.repository import RenderOptions
    from imageragturbo.serving.session import running_server
    from imageragturbo.serving.soak import soak

    quiet = args.quiet or args.json
    assets = _assets(args)
    opts = RenderOptions(max_queue_size=max(64, 4 * args.concurrency))
    with running_server(assets, opts, ready_timeout=args.ready_timeout, quiet=quiet) as server:
        res = soak(server, args.requests, args.concurrency, args.invalid_every)
    if args.json:
        print(json.dumps(res))
    else:
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("rss_kb")},
                         indent=2))
    return 1 if res["unexpected_count"] else 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="variant name (tiny-shapes, the shipped default) or a local diffusers "
                        "folder")
    p.add_argument("--random-weights", action="store_true",
                   help="serve the default tiny architecture with random weights (to try the "
                        "stack before tiny-shapes is trained; images are noise-like)")
    p.add_argument("--export", type=Path, default=None,
                   help=f"ONNX export folder (default {export_dir_of('<model name>')}; "
                        "exported there when missing)")
    p.add_argument("--index", type=Path, default=None,
                   help=f"retrieval index folder (default {index_dir_of('<model name>')}; "
                        "built from the ShapesWorld retrieval split when missing)")
    p.add_argument("--data", type=Path, default=DATA_ROOT,
                   help="ShapesWorld folder whose retrieval split the index is built from "
                        "(rendered there when missing)")
    p.add_argument("--retrieval-items", type=int, default=None,
                   help="index only the first N retrieval items (default: the whole split)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def _server_args(p: argparse.ArgumentParser, ports: bool = True) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address the server binds (0.0.0.0 exposes it to the network)")
    if ports:
        p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
        p.add_argument("--http-port", type=int, default=8000, help="HTTP port (health checks)")
    _ready_timeout_arg(p)


def _ready_timeout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for every model to load before giving up")


# serve's flags for RenderOptions fields, in --help order (defaults: the dataclass's).
DELAY_HELP = {
    "queue_delay_us": "how long the dynamic batcher of the UNet encoder, UNet decoder and VAE "
                      "decoder waits to fill a batch (microseconds)",
    "light_queue_delay_us": "the same for the light steps (preprocess, text encoder, "
                            "retriever, adapter, postprocess); default: --queue-delay-us",
}
QUEUE_HELP = {
    "max_queue_size": "queued requests per model before new ones get UNAVAILABLE",
    "default_k": "neighbours retrieved when a request sends no K",
    "max_k": "largest K a request may ask for",
    "rerank": "hybrid retrieval: re-rank the dense top N by the prompt's words and word pairs "
              "(0: dense only)",
    "neighbour_pool": "> 1: each request's K neighbours are drawn from the top K x POOL by its "
                      "seed (a model that follows its neighbours then varies with the seed); "
                      "default: the model's (a model trained with --start-pool P: P), else 1",
    "injection": "how retrieved H features enter: the trained H-adapter (ImageRAGTurbo; a "
                 "model without one falls back to slerp) or training-free slerp of the top-1 "
                 "neighbour (paper Eq. 3; STRENGTH = 1 - w, default 0.2)",
    "threads": "cpu profile: ONNX Runtime intra-op threads per stage",
    "instances": "instances of every composing model (one lets this Triton stall a queued "
                 "batch for ~500 ms)",
    "trt_cache": "gpu profile: TensorRT engine cache folder (inside the container)",
    "verify_index": "the retriever checks the sha256 of every index file when it loads (reads "
                    "the whole index in every instance before the server is ready; without it "
                    "the structure is checked and the arrays memory-mapped)",
}
INJECTIONS = ("adapter", "slerp")


def _delay_args(p: argparse.ArgumentParser) -> None:
    from imageragturbo.serving.repository import RenderOptions

    add_dataclass_flags(p, RenderOptions, DELAY_HELP)


def _render_args(p: argparse.ArgumentParser) -> None:
    from imageragturbo.serving.repository import RenderOptions

    add_dataclass_flags(p, RenderOptions, {
        "max_batch_size": "largest batch per request and per dynamic batch"})
    _delay_args(p)
    p.add_argument("--queue-timeout", type=float,
                   default=RenderOptions.queue_timeout_us / 1e6,
                   help="seconds a request may wait in a model's queue before it is rejected "
                        "(UNAVAILABLE)")
    add_dataclass_flags(p, RenderOptions, QUEUE_HELP, choices={"injection": INJECTIONS})


def _clean_errors(func):
    """Server and SDK failures as one error line (exit 1), not a traceback."""
    import functools

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from imageragturbo.client import ImageRAGTurboError
        from imageragturbo.serving.server import ServerError

        try:
            return func(args)
        except (ServerError, ImageRAGTurboError) as e:
            print(f"imageragturbo: error: {e}", file=sys.stderr)
            return 1
    return run


def add_parsers(sub, bench) -> None:
    """Add ``serve`` and ``demo`` to the top-level subparsers ``sub`` and ``serve`` to the
    ``bench`` group's subparsers."""
    from imageragturbo.serving.repository import RenderOptions
    from imageragturbo.serving.shutdown import DRAIN_TIMEOUT_S, EXIT_DRAIN_INCOMPLETE, stop_budget

    fmt = argparse.ArgumentDefaultsHelpFormatter

    s = sub.add_parser(
        "serve", help="serve the model as a Triton ensemble (gRPC), or render the repository",
        description="Serve one-step retrieval-augmented generation as the Triton ensemble "
                    f"'{C.ENSEMBLE_NAME}' ({', '.join(C.ENSEMBLE_MODELS)}). Exports the model to "
                    "ONNX and builds its retrieval index when they are missing, renders the "
                    "model repository, starts a real tritonserver (NVIDIA's on PATH, else the "
                    "one in the nvidia-pytriton wheel) bound to --host, waits until every model "
                    "is loaded, and runs until Ctrl-C. --render-only writes the repository "
                    "and exits: --profile gpu gives the onnxruntime-backend + TensorRT FP16 "
                    "configs for NVIDIA's Triton container.",
        formatter_class=fmt)
    _model_args(s)
    s.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: ONNX stages run by a Python-backend ONNX Runtime runner (this "
                        "machine); gpu: Triton's onnxruntime backend, TensorRT FP16, KIND_GPU")
    s.add_argument("--render-only", action="store_true",
                   help="write the model repository and exit")
    s.add_argument("--out", type=Path, default=None,
                   help="model repository folder (default runs/serve/<model>/"
                        "model_repository-<profile>); a previous rendering there is replaced")
    s.add_argument("--link", choices=["symlink", "copy"], default=None,
                   help="how graphs, tokenizer and index enter the repository (default: "
                        "symlink for cpu, copy for gpu so the folder can be shipped)")
    _server_args(s)
    s.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose")
    s.add_argument("--canary-interval", type=float, default=5.0,
                   help="seconds between the supervisor's canary requests through the ensemble "
                        "(it also watches the stub processes every 0.5 s)")
    s.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S,
                   help="on SIGTERM or Ctrl-C: seconds the requests in flight get to finish "
                        "(readiness false and new requests refused meanwhile); serve is gone "
                        f"within this + {stop_budget(0):g} s and exits 0, or "
                        f"{EXIT_DRAIN_INCOMPLETE} when requests in flight were cut off "
                        "(docs/serving.md, \"Stopping and rolling updates\")")
    s.add_argument("--no-supervise", action="store_true",
                   help="no supervisor: a dead stub or server stays dead (serve exits 1 when "
                        "tritonserver does)")
    s.add_argument("--tls-cert", type=Path, default=None,
                   help="serve gRPC over TLS with this certificate (PEM; with --tls-key)")
    s.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key")
    s.add_argument("--tls-ca", type=Path, default=None,
                   help="mutual TLS: accept only clients whose certificate this CA signed")
    _render_args(s)
    s.set_defaults(func=_clean_errors(_cmd_serve))

    d = sub.add_parser(
        "demo", help="the main job: start the server, draw a PNG grid through the SDK, stop",
        description="Starts the served ensemble (as `serve`, on free local ports), generates a "
                    "few ShapesWorld evaluation prompts through the gRPC SDK, each without and "
                    "with retrieval, and writes one PNG grid with the prompt under each pair and "
                    "the retrieved neighbours' captions; then stops the server and prints the "
                    "PNG's path. Uses the shipped default model tiny-shapes.",
        formatter_class=fmt)
    _model_args(d)
    d.add_argument("--n", type=int, default=8, help="evaluation prompts")
    d.add_argument("--seed", type=int, default=0, help="ShapesWorld seed and first image seed")
    d.add_argument("--k", type=int, default=3, help="neighbours to retrieve")
    d.add_argument("--strength", type=float, default=None,
                   help="retrieval strength (default: the server's)")
    d.add_argument("--url", default=None,
                   help="use a running server at HOST:PORT instead of starting one")
    d.add_argument("-o", "--output", type=Path, default=Path("outputs/demo/serving_demo.png"),
                   help="PNG grid to write")
    _ready_timeout_arg(d)
    d.set_defaults(func=_clean_errors(_cmd_demo))

    b = bench.add_parser(
        "serve", help="served latency (p50/p99) and throughput vs the in-process pipeline",
        description="Starts the served ensemble, loads it with tritonclient.grpc.aio at each "
                    "concurrency (one prompt per request, retrieval on), and reports p50/p99 "
                    "latency and images per second; in the same run, the in-process ONNX "
                    "Runtime pipeline's latency for the same request (tokenize, encode, "
                    "retrieve, generate) with the same threads, and the ratio (the serving "
                    "overhead).",
        formatter_class=fmt)
    _model_args(b)
    b.add_argument("--url", default=None,
                   help="measure a running server at HOST:PORT (its export must be --export)")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 8],
                   help="concurrent requests in flight")
    b.add_argument("--requests", type=int, default=64, help="timed requests per concurrency")
    b.add_argument("--warmup", type=int, default=8, help="untimed requests first")
    b.add_argument("--k", type=int, default=1, help="neighbours per request (0: no retrieval)")
    add_dataclass_flags(b, RenderOptions, {
        "threads": "ONNX Runtime threads per stage, served and in-process",
        "max_batch_size": "server's max batch size"})
    _delay_args(b)
    b.add_argument("--instances", type=int, default=None,
                   help="instances of every composing model (default: serve's)")
    b.add_argument("--bursts", type=int, default=0,
                   help="then send this many bursts of --burst-size requests at once and "
                        "report the slowest (batcher holds show there)")
    b.add_argument("--burst-size", type=int, default=13, help="requests per burst")
    _ready_timeout_arg(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_clean_errors(_cmd_bench_serve))

    so = bench.add_parser(
        "soak", help="a long mixed load (valid and invalid requests): errors by kind, "
                     "p50/p99, memory growth of tritonserver and every stub",
        description="Starts the served ensemble and sends --requests requests at "
                    "--concurrency, one in --invalid-every invalid (blank, over-long, NaN "
                    "strength, K out of range). Every invalid request must get "
                    "INVALID_ARGUMENT and every valid one an image; reports outcomes by kind, "
                    "p50/p99 of the valid ones, and the resident memory of tritonserver and "
                    "of each Python-backend stub after a warm-up and at the end. Exits 1 on "
                    "any unexpected outcome.",
        formatter_class=fmt)
    _model_args(so)
    so.add_argument("--requests", type=int, default=2000, help="requests in all")
    so.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    so.add_argument("--invalid-every", type=int, default=5,
                    help="every N-th request is invalid (0: none)")
    _ready_timeout_arg(so)
    so.add_argument("--json", action="store_true", help="print one JSON object")
    so.set_defaults(func=_clean_errors(_cmd_bench_soak))
