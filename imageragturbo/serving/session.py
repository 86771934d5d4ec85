"""From the assets a server needs (an export and an index, made by the commands:
``commands.assets.prepare``) to a ready server: rendering, start, stop."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .repository import RenderOptions, render_repository
from .server import TritonServer

DEFAULT_RUNS = Path("runs/serve")


@dataclass
class Assets:
    model: str            # variant name or folder the export and index come from
    export_dir: Path
    index_dir: Path


def repository_dir(assets: Assets, profile: str = "cpu") -> Path:
    return DEFAULT_RUNS / (Path(assets.model).name or "model") / f"model_repository-{profile}"


@contextlib.contextmanager
def running_server(assets: Assets, options: RenderOptions | None = None,
                   host: str = "127.0.0.1", grpc_port: int | None = None,
                   http_port: int | None = None, ready_timeout: float = 300.0,
                   repo: Path | None = None, quiet: bool = False) -> Iterator[TritonServer]:
    """Render the cpu repository for ``assets``, start tritonserver, wait until it is ready,
    yield it, and stop it on exit (also on Ctrl-C or an error)."""
    repo = repo or repository_dir(assets)
    render_repository(assets.export_dir, assets.index_dir, repo, "cpu", options)
    server = TritonServer(repo, host=host, grpc_port=grpc_port, http_port=http_port,
                          log_path=repo.parent / "tritonserver.log", cache=DEFAULT_RUNS)
    if not quiet:
        print(f"serve: starting tritonserver on {host} (gRPC {server.grpc_port}, HTTP "
              f"{server.http_port}) with {repo}", file=sys.stderr, flush=True)
    server.start()
    try:
        server.wait_ready(ready_timeout, progress=not quiet)
        yield server
    finally:
        if not quiet:
            print("serve: stopping tritonserver", file=sys.stderr, flush=True)
        server.stop()


__all__ = ["DEFAULT_RUNS", "Assets", "repository_dir", "running_server"]
