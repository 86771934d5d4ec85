"""Fixtures shared by test modules: the served ensemble on real tritonservers (a random-weight
tiny export with an H-adapter, one without, and a 40-item ShapesWorld index), started once per
session and stopped at its end; the SD 2.1-layout toy exported fp32 and fp16 (export and device
tests)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from imageragturbo import runtime
from imageragturbo import shapesworld as sw
from imageragturbo.client import (
    ImageRAGTurboClient,
)
from imageragturbo.commands.main import main
from imageragturbo.export import onnx_export as oe
from imageragturbo.model import family, load_retrieval_encoder
from imageragturbo.model.h_space import HAdapter, adapter_config_for_channels
from imageragturbo.retriever import build_index, shapesworld_pairs
from imageragturbo.serving.repository import render_repository
from imageragturbo.serving.server import TritonServer

# ----------------------------------------------------------------------------- fixtures


def _trained_like_adapter(channels: int, seed: int) -> HAdapter:
    """A fresh adapter is the identity (zero output projection); give it random output
    weights so the parity test checks a graph that actually changes h."""
    torch.manual_seed(seed)
    ad = HAdapter(adapter_config_for_channels(channels))
    torch.nn.init.normal_(ad.proj_out.weight, std=0.05)
    return ad.eval()


@pytest.fixture(scope="session")
def trained_like_adapter():
    """``_trained_like_adapter`` for test modules' own fixtures."""
    return _trained_like_adapter


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
    adapter = _trained_like_adapter(channels, 1)  # not the identity
    folder = root / "model"
    family.save_sd_folder(c, folder)
    adapter.save_pretrained(folder / "h_adapter")
    with_adapter = oe.export_from_model(folder, root / "onnx-adapter", progress=False)
    # the same weights, recorded as trained with a neighbour start (train adapter
    # --neighbour-init): the served retriever starts the step from the top-1 neighbour
    start_folder = root / "model-start"
    shutil.copytree(folder, start_folder)
    (start_folder / "adapter_training.json").write_text(json.dumps({"config": {
        "neighbour_init": True, "neighbour_sdedit": 0.5, "synth_steps": 25}}))
    with_start = oe.export_from_model(start_folder, root / "onnx-start", progress=False)
    without = oe.export_model(oe.random_tiny_components(seed=0), root / "onnx-slerp",
                              source="tiny-random", progress=False)
    data = sw.build_dataset(root / "sw", {"retrieval": 40}, workers=1, progress=False)
    index = build_index(shapesworld_pairs(data), load_retrieval_encoder(folder), root / "index",
                        progress=False, model_source=str(folder))
    return {"root": root, "model": folder, "adapter": with_adapter, "slerp": without,
            "start": with_start, "index": index}


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
        for name in ("adapter", "slerp", "start"):
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
    for name in ("adapter", "slerp", "start"):
        pipe = runtime.OnnxPipeline(assets[name], providers=runtime.choose_providers(["cpu"]),
                                    threads=1)
        out[name] = (pipe, runtime.load_index(assets["index"], int(pipe.manifest["text_dim"]),
                                              pipe.h_shape))
    return out


@pytest.fixture
def client(server):
    with ImageRAGTurboClient(server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def sd21(tmp_path_factory):
    """An SD 2.1-layout diffusers folder (with an h_adapter subfolder), exported through the
    CLI with a tiny external-data threshold, so every graph takes the >2 GB path."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("sd21-layout")
    c = family.sd21_layout_tiny(seed=0)
    family.save_sd_folder(c, folder)
    _trained_like_adapter(int(c.unet.config.block_out_channels[-1]), 2).save_pretrained(
        folder / "h_adapter")
    out = tmp_path_factory.mktemp("onnx-sd21") / "export"
    rc = main(["export", "--model", str(folder), "--out", str(out), "--quiet",
               "--external-data-threshold", "100000"])
    assert rc == 0
    c = family.load_components(folder)
    return c, out, runtime.OnnxPipeline(out, threads=1), folder


@pytest.fixture(scope="session")
def sd21_fp16(sd21, tmp_path_factory):
    """The ``sd21`` fixture's model folder (non-trivial adapter included) exported again with
    ``--fp16`` through the CLI, with the same 100 kB external-data threshold. Only exported
    here: the tests open the graphs themselves, so a graph that does not load fails a test,
    not the fixture."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("onnx-sd21-fp16") / "export"
    rc = main(["export", "--model", str(sd21[3]), "--out", str(out), "--fp16", "--quiet",
               "--external-data-threshold", "100000"])
    assert rc == 0
    return out
