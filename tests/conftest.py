"""Fixtures shared by test modules: the served ensemble on real tritonservers (a random-weight
tiny export with an H-adapter, one without, and a 40-item ShapesWorld index), started once per
session and stopped at its end."""

from __future__ import annotations

import subprocess

import pytest
import torch

from imageragturbo import runtime
from imageragturbo import shapesworld as sw
from imageragturbo.client import (
    ImageRAGTurboClient,
)
from imageragturbo.export import onnx_export as oe
from imageragturbo.model import family, load_retrieval_encoder
from imageragturbo.model.h_space import HAdapter, adapter_config_for_channels
from imageragturbo.retriever import build_index, shapesworld_pairs
from imageragturbo.serving.repository import render_repository
from imageragturbo.serving.server import TritonServer

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A random-weight tiny model with a non-trivial H-adapter (saved as a diffusers folder),
    exported twice (with the adapter, and without it: the slerp path), and one index over 40
    ShapesWorld retrieval items built with the model's own encoder (the adapter does not
    change the cached features)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serving")
    c = oe.random_tiny_components(seed=0)
    channels = int(c.unet.config.block_out_channels[-1])
    torch.manual_seed(1)
    adapter = HAdapter(adapter_config_for_channels(channels))
    torch.nn.init.normal_(adapter.proj_out.weight, std=0.05)  # not the identity
    folder = root / "model"
    family.save_sd_folder(c, folder)
    adapter.eval().save_pretrained(folder / "h_adapter")
    with_adapter = oe.export_from_model(folder, root / "onnx-adapter", progress=False)
    without = oe.export_model(oe.random_tiny_components(seed=0), root / "onnx-slerp",
                              source="tiny-random", progress=False)
    data = sw.build_dataset(root / "sw", {"retrieval": 40}, workers=1, progress=False)
    index = build_index(shapesworld_pairs(data), load_retrieval_encoder(folder), root / "index",
                        progress=False, model_source=str(folder))
    return {"root": root, "model": folder, "adapter": with_adapter, "slerp": without,
            "index": index}


def _start(assets, export, name):
    repo = render_repository(export, assets["index"], assets["root"] / f"repo-{name}", "cpu")
    server = TritonServer(repo, log_path=assets["root"] / f"{name}.log",
                          cache=assets["root"] / "cache")
    server.start()
    return server


@pytest.fixture(scope="session")
def servers(assets):
    """Both servers (H-adapter export and slerp export), started together, ready, and stopped
    at the end of the session; each must exit cleanly."""
    started = {}
    try:
        for name in ("adapter", "slerp"):
            started[name] = _start(assets, assets[name], name)
        for s in started.values():
            s.wait_ready(timeout=180, progress=False)
        yield started
    finally:
        codes = {name: s.stop() for name, s in started.items()}
    assert all(rc == 0 for rc in codes.values()), codes
    left = subprocess.run(["pgrep", "-f", str(assets["root"])], capture_output=True, text=True)
    assert not left.stdout.strip(), f"processes left behind: {left.stdout}"


@pytest.fixture(scope="session")
def server(servers):
    return servers["adapter"]


@pytest.fixture(scope="session")
def pipes(assets):
    out = {}
    for name in ("adapter", "slerp"):
        pipe = runtime.OnnxPipeline(assets[name], providers=runtime.choose_providers(["cpu"]),
                                    threads=1)
        out[name] = (pipe, runtime.load_index(assets["index"], int(pipe.manifest["text_dim"]),
                                              pipe.h_shape))
    return out


@pytest.fixture
def client(server):
    with ImageRAGTurboClient(server.url, timeout=60) as c:
        yield c


