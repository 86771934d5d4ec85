"""The device-resident ONNX Runtime path on CPU (issue 14, items 2-4): IO binding gives the numpy
path's image bytes, dynamic and fixed-shape; the fixed-shape profile's free-dimension overrides
leave no Shape node in any optimized fp16 graph (the shape arithmetic ORT would otherwise place
on the CPU inside CUDA graphs, behind Memcpy nodes); a profile refuses another batch with a clear
message; and the GPU yardstick's report writer and its CPU smoke run. Real exports of the SD
2.1-layout toy (fp32 and fp16, a non-trivial adapter) and real ONNX Runtime CPU sessions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imageragturbo import runtime
from imageragturbo.runtime import device

CPU = ["CPUExecutionProvider"]
PROMPTS, SEEDS = ["a red circle left of a blue square", "three green triangles"], [0, 7]


@pytest.fixture(scope="module")
def exports(sd21, sd21_fp16):
    """The SD 2.1-layout toy with an adapter that changes h, exported fp32 and fp16 (the
    session's exports, conftest)."""
    return {"fp32": sd21[1], "fp16": sd21_fp16}


def _cases(h_shape):
    rng = np.random.default_rng(0)
    h_retr = rng.standard_normal((2, 2, *h_shape), dtype=np.float32)
    return {"none": {}, "adapter": {"h_retr": h_retr, "lam": np.array([0.5, 0.9], np.float32)},
            "slerp": {"h_retr": h_retr, "slerp_w": 0.8}}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_io_binding_gives_the_numpy_path_s_image_bytes_on_cpu(exports, dtype):
    """The device chain runs the same sessions on the same inputs as the numpy path, so on CPU
    its images and z0 are the same bytes: dynamic binding against the plain pipeline, and the
    fixed-shape profile (preallocated values, bindings built once, run twice) against the numpy
    path on the very same fixed-shape sessions. Without retrieval, with the adapter, with
    slerp (the one host round trip)."""
    path = exports[dtype]
    plain = runtime.OnnxPipeline(path, providers=CPU, threads=1)
    bound = runtime.OnnxPipeline(path, providers=CPU, threads=1, io_binding=True)
    static = runtime.OnnxPipeline(path, providers=CPU, threads=1, io_binding=True,
                                  static_batch=2, static_k=2)
    assert plain.chain is None and bound.io_binding and static.static == (2, 2)
    for name, kw in _cases(plain.h_shape).items():
        a, za = plain.generate(PROMPTS, SEEDS, return_latents=True, **kw)
        b, zb = bound.generate(PROMPTS, SEEDS, return_latents=True, **kw)
        assert a.dtype == b.dtype == np.uint8 and a.tobytes() == b.tobytes(), name
        assert za.tobytes() == zb.tobytes(), name
        c1, zc = static.generate(PROMPTS, SEEDS, return_latents=True, **kw)
        static.chain, chain = None, static.chain       # the numpy path, same sessions
        d, zd = static.generate(PROMPTS, SEEDS, return_latents=True, **kw)
        static.chain = chain
        c2 = static.generate(PROMPTS, SEEDS, **kw)      # the bindings reused
        assert c1.tobytes() == d.tobytes() == c2.tobytes() and zc.tobytes() == zd.tobytes(), name
        # Folding the shapes lets ORT fuse differently: same model, rounding apart (<= 1/255).
        assert np.abs(a.astype(int) - c1.astype(int)).max() <= 1, name
    assert set(bound.timings) == {*runtime.manifest.STAGES, "end_to_end"} - {"h_adapter"}


def test_latents_returned_by_the_fixed_shape_profile_survive_the_next_call(exports):
    """The fixed-shape profile reuses one preallocated z0 buffer; on the CPU numpy() of it is
    a view, so the pipeline must hand back a copy that the next request cannot overwrite."""
    static = runtime.OnnxPipeline(exports["fp32"], providers=CPU, threads=1, io_binding=True,
                                  static_batch=2)
    _, first = static.generate(PROMPTS, SEEDS, return_latents=True)
    kept = first.copy()
    _, second = static.generate(PROMPTS[::-1], [3, 4], return_latents=True)
    assert not np.array_equal(kept, second)
    assert np.array_equal(first, kept)


def test_fixed_shape_profile_leaves_no_shape_node_in_the_optimized_fp16_graphs(exports,
                                                                              tmp_path):
    """With the batch and k axes fixed (``add_free_dimension_override_by_name``) ORT folds
    every Shape chain of every fp16 stage; without, each graph keeps dozens (text_encoder 14,
    unet_decoder 98 measured). Those int64 chains are what ORT places on the CPU in a CUDA
    session, with Memcpy nodes to and from the GPU, and what keeps CUDA graphs off. Counted in
    the optimized graphs ORT writes. Memcpy nodes themselves are not asserted here: a CPU-only
    session never inserts any, so a count of 0 would prove nothing; the GPU bench counts them
    with ``count_ops`` (whose counting is checked below on a graph that has them)."""
    path = exports["fp16"]
    counts = {}
    for static in (None, 1):
        opt = tmp_path / f"opt-{static}"
        pipe = runtime.OnnxPipeline(path, providers=CPU, threads=1, static_batch=static,
                                    optimized_dir=opt)
        counts[static] = {s: device.count_ops(opt / f"{s}.onnx", ["Shape"])
                          for s in pipe.sessions}
    print({s: (counts[None][s]["Shape"], counts[1][s]["Shape"]) for s in counts[1]})
    assert set(counts[1]) == set(runtime.manifest.STAGES)
    assert all(c["Shape"] > 0 for c in counts[None].values())
    assert {s: c["Shape"] for s, c in counts[1].items()} == dict.fromkeys(counts[1], 0)


def test_count_ops_counts_the_copies_ort_inserts_between_devices(tmp_path):
    """What the GPU bench reports as Memcpy per graph: MemcpyFromHost and MemcpyToHost nodes
    (the com.microsoft ops ORT inserts between providers) counted together, every op type by
    name, and the ops asked for reported as 0 when absent. On a hand-made graph that has
    them, since no CPU session ever makes one."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("MemcpyFromHost", ["x"], ["a"], domain="com.microsoft"),
             helper.make_node("Shape", ["a"], ["s"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("MemcpyToHost", ["b"], ["c"], domain="com.microsoft"),
             helper.make_node("MemcpyToHost", ["s"], ["t"], domain="com.microsoft")]
    graph = helper.make_graph(
        nodes, "copies", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("t", TensorProto.INT64, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "g.onnx")
    c = device.count_ops(tmp_path / "g.onnx", ["Shape", "Memcpy", "Cast"])
    assert (c["Memcpy"], c["MemcpyToHost"], c["MemcpyFromHost"]) == (3, 2, 1)
    assert (c["Shape"], c["Relu"], c["Cast"]) == (1, 1, 0)


def test_fixed_shape_profile_refuses_another_batch_and_cuda_graphs_need_a_gpu(exports):
    pipe = runtime.OnnxPipeline(exports["fp32"], providers=CPU, threads=1, static_batch=1)
    assert pipe.io_binding is False  # CPU: off unless asked; the sessions are still fixed
    bound = runtime.OnnxPipeline(exports["fp32"], providers=CPU, threads=1, static_batch=1,
                                 io_binding=True)
    with pytest.raises(ValueError, match="runs batch 1 with k = 1, got batch 2"):
        bound.generate(PROMPTS, SEEDS)
    h = _cases(bound.h_shape)["adapter"]
    with pytest.raises(ValueError, match="got batch 1, k = 2"):
        bound.generate(PROMPTS[:1], SEEDS[:1], h_retr=h["h_retr"][:1], lam=h["lam"][:1])
    with pytest.raises(ValueError, match="CUDA graphs need the CUDA or TensorRT provider"):
        runtime.OnnxPipeline(exports["fp32"], providers=CPU, cuda_graph=True)


def _fake_result() -> dict:
    stages = {"text_encoder": 5.0, "unet_encoder": 8.0, "unet_decoder": 11.0,
              "vae_decoder": 20.0}
    runs = []
    for config, scale in (("torch_eager", 1.0), ("ort_cuda", 0.9), ("ort_cuda_graph", 0.5)):
        for batch in (1, 4):
            for retrieval in (False, True):
                med = {k: v * scale * batch ** 0.5 for k, v in stages.items()}
                if retrieval:
                    med["h_adapter"] = 2.0 * scale
                med["end_to_end"] = sum(med.values()) + 1.0
                runs.append({"config": config, "batch": batch, "retrieval": retrieval,
                             "median_ms": med})
    return {"device": "fake GPU", "image_size": 512, "k": 1, "runs": runs,
            "configs": {"torch_eager": {"memory_mib": {"1": 3000.0}},
                        "ort_cuda_graph": {"memcpy": {"unet_decoder b1": 0}},
                        "ort_tensorrt": {"error": "TensorRT provider not available"}}}


def test_gpu_report_writes_json_png_and_a_summary_judging_the_targets(tmp_path):
    """The report writer on fake numbers (not a timing test): JSON with the summary, a PNG,
    the text table; the best ORT configuration at batch 1 is judged against both targets."""
    from PIL import Image

    from imageragturbo.export.gpu_report import write_report

    paths = write_report(_fake_result(), tmp_path / "out")
    res = json.loads(paths["json"].read_text())
    t = res["summary"]["targets"]
    assert t["best_ort_config_batch1"] == "ort_cuda_graph"
    assert t["ort_vs_eager_batch1"] == pytest.approx(24 / 47, abs=1e-3)    # 0.51 <= 0.6
    assert t["retrieval_ratio_batch1"] == pytest.approx(24 / 23, abs=1e-3)  # 1.04 > 1.02
    assert t["ort_vs_eager_met"] is True and t["retrieval_ratio_met"] is False
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 600 and im.size[1] > 300
    text = paths["txt"].read_text()
    assert "ERROR ort_tensorrt" in text and "Memcpy nodes, ort_cuda_graph" in text
    assert "NOT MET" in text and len(text.splitlines()) < 30  # one screen


def test_gpu_bench_runs_every_configuration_through_on_cpu(tmp_path):
    """``bench sdturbo-gpu --device cpu``: the GPU run's orchestration (export once, torch
    eager, ORT plain, the same sessions with IO binding, a fixed-shape profile per batch,
    Memcpy counts, the report) on the SD 2.1-layout toy with the CPU provider, so that a GPU
    run does not find its bugs. Not a measurement."""
    from imageragturbo.commands.main import main

    rc = main(["bench", "sdturbo-gpu", "--device", "cpu", "--batch", "1", "2", "--repeats", "1",
               "--warmup", "0", "--out", str(tmp_path / "export"), "--report",
               str(tmp_path / "report"), "--json"])
    assert rc == 0
    res = json.loads((tmp_path / "report" / "sdturbo_gpu.json").read_text())
    got = {(r["config"], r["batch"], r["retrieval"]) for r in res["runs"]}
    configs = ("torch_eager", "ort_cpu", "ort_cpu_iobinding", "ort_cpu_static")
    assert got == {(c, b, r) for c in configs for b in (1, 2) for r in (False, True)}
    assert not any("error" in c for c in res["configs"].values()), res["configs"]
    assert res["configs"]["ort_cpu_static"]["shape_nodes"] == {
        f"{s} b{b}": 0 for s in runtime.manifest.STAGES for b in (1, 2)}
    assert (tmp_path / "report" / "sdturbo_gpu.png").stat().st_size > 10_000
