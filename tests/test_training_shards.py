"""Streamed training caches (issue 20, item 3; ``training/shards.py``): the data stage's peak
memory does not grow with the number of items, a data stage killed (SIGKILL) in the middle of
a shard resumes at the first incomplete shard and reaches the same shards and the same
training losses, a shard whose bytes changed is redone, the stream is seeded and bounded,
and a run folder from before the shards is refused with what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from imageragturbo.model import family
from imageragturbo.training import shards

# One data stage in a fresh interpreter: ShapesWorld items through a tiny random SD 2.1-layout
# model (the same folder as student and teacher), no retrieval; prints the peak RSS. With
# KILL_AT=i the process SIGKILLs itself halfway through writing shard i.
SCRIPT = textwrap.dedent("""
    import json, os, resource, signal, sys
    import torch
    torch.set_num_threads(1)
    from imageragturbo.training import shards
    from imageragturbo.training.adapter import AdapterConfig, AdapterRun
    model, run_dir, n, shard_mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    kill_at = int(os.environ.get("KILL_AT", "-1"))
    if kill_at >= 0:
        write = shards.write
        def dying(root, i, tensors, meta):
            if i == kill_at:
                tmp = root / (shards.shard_name(i) + ".tmp")
                tmp.write_bytes(b"half a shard")       # killed while writing it
                os.kill(os.getpid(), signal.SIGKILL)
            return write(root, i, tensors, meta)
        shards.write = dying
    cfg = AdapterConfig.quick(model=model, teacher=model, retrieval="none", n_train=n,
                              shard_mb=shard_mb, threads=1, synth_prompts=16)
    run = AdapterRun(run_dir, cfg, progress=False)
    out = run.run(["data"])
    print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "shards": out["data"]["shards"]}))
""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    c = family.sd21_layout_tiny(seed=0)
    family.save_sd_folder(c, root / "model")
    return root


def _data_stage(tiny, run_dir, n, shard_mb, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at is not None:
        env["KILL_AT"] = str(kill_at)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tiny / "model"), str(run_dir),
                           str(n), str(shard_mb)], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.timeout(600)
def test_data_stage_peak_memory_does_not_grow_with_the_items(tiny):
    """200 items, then 2,000 (about 11 MB of cached states and 96 MB of renders, which the
    in-memory cache held at once): the peak RSS of the 10x run is within 10% of the 1x
    run's."""
    peaks = {}
    for n in (200, 2000):
        res = _data_stage(tiny, tiny / f"mem{n}", n, 0.25)
        assert res.returncode == 0, res.stderr[-3000:]
        peaks[n] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_kib"]
    m = shards.manifest(tiny / "mem2000" / "data" / "shards")
    assert m["items"] == 2000 and len(m["shards"]) >= 10
    print(f"peak RSS: 200 items {peaks[200] / 1024:.0f} MiB, "
          f"2000 items {peaks[2000] / 1024:.0f} MiB")
    assert peaks[2000] <= 1.10 * peaks[200], peaks


@pytest.mark.timeout(600)
def test_a_data_stage_killed_mid_shard_resumes_to_the_same_shards_and_losses(tiny):
    """SIGKILL halfway through shard 2 of 5: the rerun keeps shards 0 and 1 (not rewritten),
    writes 2-4, and its manifest (counts and sha256 of every shard) equals an uninterrupted
    run's; trained from either, the same losses step by step."""
    from imageragturbo.training.adapter import AdapterConfig, AdapterRun

    whole, part = tiny / "whole", tiny / "part"
    assert _data_stage(tiny, whole, 40, 0.06).returncode == 0
    killed = _data_stage(tiny, part, 40, 0.06, kill_at=2)
    assert killed.returncode == -9
    root = part / "data" / "shards"
    assert shards.done(root, 0) and shards.done(root, 1) and not shards.done(root, 2)
    assert not (part / "data" / "done.json").exists()
    before = {i: (root / shards.shard_name(i)).stat().st_mtime_ns for i in (0, 1)}
    res = _data_stage(tiny, part, 40, 0.06)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {i: (root / shards.shard_name(i)).stat().st_mtime_ns for i in (0, 1)} == before
    a = shards.manifest(whole / "data" / "shards")
    b = shards.manifest(root)
    assert len(a["shards"]) == 5
    assert [(s["items"], s["sha256"]) for s in a["shards"]] == \
        [(s["items"], s["sha256"]) for s in b["shards"]]
    assert (whole / "data" / "items.jsonl").read_text() == \
        (part / "data" / "items.jsonl").read_text()

    model = str(tiny / "model")
    hist = []
    for run_dir in (whole, part):
        cfg = AdapterConfig.quick(model=model, teacher=model, retrieval="none", n_train=40,
                                  shard_mb=0.06, threads=1, synth_prompts=16, steps=2, batch=4,
                                  real_fraction=0.5, perceptual_weight=0.0)
        AdapterRun(run_dir, cfg, progress=False, reconfigure=True).run(
            ["data", "synth", "train"])
        hist.append(json.loads((run_dir / "train" / "history.json").read_text()))
    for x, y in zip(*hist):
        assert x["distill"] == pytest.approx(y["distill"], rel=1e-5)


def test_a_damaged_shard_is_redone_and_the_stream_is_seeded_and_bounded(tmp_path):
    root = tmp_path / "s"
    shards.prepare(root, {"p": 1}, True)
    for i in range(4):
        shards.write(root, i, {"x": torch.arange(10 * i, 10 * i + 10).float()}, {"items": 10})
    (root / shards.shard_name(2)).write_bytes(b"changed")
    assert [i for i in range(4) if shards.done(root, i) is None] == [2]
    with pytest.raises(RuntimeError, match="shard 2 is missing or damaged"):
        shards.finalize(root, 4)
    shards.write(root, 2, {"x": torch.arange(20, 30).float()}, {"items": 10})
    m = shards.finalize(root, 4)
    assert [s["first"] for s in m["shards"]] == [0, 10, 20, 30] and m["items"] == 40

    def take(seed, n=60, rank=0, world=1):
        st = shards.Stream(root, ("x",), seed, rank, world, buffer=8)
        return [(d["row"], int(d["x"])) for d in st.draw(n)]

    a = take(0)
    assert a == take(0) and a != take(1)
    assert all(r == x for r, x in a)                    # the row is the item's global row
    assert sorted(r for r, _ in a[:32]) != [r for r, _ in a[:32]]   # shuffled
    st = shards.Stream(root, ("x",), 0, buffer=8)
    st.skip(25)
    assert [d["row"] for d in st.draw(35)] == [r for r, _ in a[25:]]  # resumable by skipping
    # two processes: each its own half of the shards in an epoch
    r0 = {r // 10 for r, _ in take(0, 12, 0, 2)}
    r1 = {r // 10 for r, _ in take(0, 12, 1, 2)}
    assert len(r0) <= 2 and len(r1) <= 2 and not r0 & r1
    # re-preparing with another plan clears the folder
    shards.prepare(root, {"p": 2}, True)
    assert not list(root.glob("shard-*"))


def test_a_run_folder_with_the_old_in_memory_cache_is_refused_with_what_to_do(tmp_path):
    from imageragturbo.training.adapter import AdapterConfig, AdapterRun

    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    torch.save({"latents": torch.zeros(1)}, run_dir / "data" / "cache.pt")
    (run_dir / "data" / "done.json").write_text(json.dumps({"items": 1, "real_items": 1}))
    run = AdapterRun(run_dir, AdapterConfig.quick(retrieval="none"), progress=False)
    with pytest.raises(FileNotFoundError, match=r"older version \(data/cache.pt.*rerun"):
        run.run(["synth"])


@pytest.mark.timeout(400)
def test_bf16_trains_and_gradient_checkpointing_gives_the_same_losses(tiny):
    """Issue 20, item 4 on the CPU: a bf16-autocast run trains two steps with finite losses;
    gradient checkpointing on the student UNet gives the same losses as without (step 2
    follows an update, so the gradients agreed too), and so does a run that writes a
    validation grid every step; steps/s, images/s and peak memory are logged per step and
    summed up in done.json."""
    import shutil

    from imageragturbo.training.adapter import AdapterConfig, AdapterRun

    model, run_dir = str(tiny / "model"), tiny / "precision"
    hist = {}
    for name, kw in (("plain", {"validation_every": 1}), ("ckpt", {"gradient_checkpointing": True}),
                     ("bf16", {"mixed_precision": "bf16"})):
        cfg = AdapterConfig.quick(model=model, teacher=model, retrieval="none", n_train=16,
                                  threads=1, synth_prompts=8, synth_steps=1, steps=2, batch=4,
                                  perceptual_weight=0.0, **kw)
        out = AdapterRun(run_dir, cfg, progress=False, reconfigure=True).run(
            ["data", "synth", "train"])
        hist[name] = json.loads((run_dir / "train" / "history.json").read_text())
        assert out["train"]["steps_per_s"] > 0 and out["train"]["peak_memory_bytes"] > 0
        log = [json.loads(x) for x in (run_dir / "train" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [0, 1] and all(r["images_per_s"] > 0 for r in log)
        if name == "plain":  # a grid per step: 4 prompts, with and without retrieval
            from PIL import Image

            grids = sorted((run_dir / "train" / "validation").glob("*.png"))
            assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
            assert Image.open(grids[0]).size == (4 * 128, 2 * 128)
        shutil.rmtree(run_dir / "train")
    for a, b in zip(hist["plain"], hist["ckpt"]):
        assert a["distill"] == pytest.approx(b["distill"], rel=1e-4)
    assert all(np.isfinite(h["distill"]) for h in hist["bf16"])
    assert hist["bf16"][0]["distill"] == pytest.approx(hist["plain"][0]["distill"], rel=0.05)
