"""``index build --device`` and several processes (issue 20, item 5): ``--device cpu`` builds
the same index as before, a device that is not here is a one-line error (no traceback), and
two processes, each encoding every other batch into the shared memory maps, give the same
arrays as one. The CUDA path itself was not run on this CPU machine."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from imageragturbo.commands.main import main
from imageragturbo.retriever import RetrievalIndex, build_index, shapesworld_pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from imageragturbo import shapesworld as sw

    root = tmp_path_factory.mktemp("idxdev")
    sw.build_dataset(root / "data", {"retrieval": 20}, progress=False)
    return root


def test_index_build_on_the_cpu_device(data, tmp_path):
    assert main(["index", "build", "--data", str(data / "data"), "--out",
                 str(tmp_path / "index"), "--device", "cpu", "--batch-size", "8",
                 "--quiet"]) == 0
    assert len(RetrievalIndex.load(tmp_path / "index")) == 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_a_device_that_is_not_here_is_a_one_line_error(data, tmp_path, capsys):
    rc = main(["index", "build", "--data", str(data / "data"), "--out",
               str(tmp_path / "index"), "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA device is available here" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "index").exists()


def test_two_processes_encode_their_shares_into_the_same_index(data, tmp_path):
    """Two ranks (threads standing in for the processes of `accelerate launch`, with a
    barrier), batch j encoded by rank j mod 2: the same arrays as a one-process build; only
    rank 0 publishes."""
    from imageragturbo.model import load_retrieval_encoder

    pairs = shapesworld_pairs(data / "data", "retrieval")
    enc = load_retrieval_encoder("tiny-shapes", "cpu")
    one = build_index(pairs, enc, tmp_path / "one", batch_size=4, progress=False)
    bar = threading.Barrier(2, timeout=300)
    out: dict = {}

    def rank(r):
        out[r] = build_index(pairs, enc, tmp_path / "two", batch_size=4, progress=False,
                             rank=r, world=2, barrier=bar.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out == {0: tmp_path / "two", 1: None}
    a, b = RetrievalIndex.load(one), RetrievalIndex.load(tmp_path / "two")
    rows = np.arange(20)
    assert np.array_equal(a.latents(rows), b.latents(rows))
    assert np.array_equal(a.h(rows), b.h(rows))
