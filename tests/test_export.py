"""ONNX export of the five stages and the ONNX Runtime pipeline: per-stage parity with
PyTorch at batch 1 and 4 on the default tiny config and on the SD 2.1-layout tiny model,
end-to-end images within 2/255, the manifest, fp16 with fp32 attention, external data, the
CLI, and the benchmark and GPU-script plumbing. fp16 graphs: valid ONNX (full checker) that
ONNX Runtime opens, Resize's scales in float32, per-stage fp16-vs-fp32 bound, and the Triton gpu
profile of an fp16 export referencing only graphs that load. Real exports and real sessions
throughout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imageragturbo import runtime
from imageragturbo.checksums import sha256_file
from imageragturbo.client import contract as C
from imageragturbo.commands.main import main
from imageragturbo.export import onnx_export as oe
from imageragturbo.model.pipeline import student_generate
from imageragturbo.runtime.manifest import load_manifest

FP32_BOUND = 1e-4  # max abs difference ONNX Runtime vs PyTorch per stage, fp32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, trained_like_adapter):
    """The default tiny architecture, random weights, with an adapter; exported once (fp32,
    graphs inline)."""
    torch.set_num_threads(1)
    c = oe.random_tiny_components(seed=0)
    c.h_adapter = trained_like_adapter(int(c.unet.config.block_out_channels[-1]), 1)
    out = oe.export_model(c, tmp_path_factory.mktemp("onnx-tiny"), source="tiny-random",
                          progress=False)
    return c, out, runtime.OnnxPipeline(out, threads=1)


def _stage_diffs(c, pipe, batch: int, k: int = 3) -> dict[str, float]:
    diffs = {}
    for s in oe.stage_specs(c, c.h_adapter, batch=batch, k=k):
        with torch.no_grad():
            ref = s.module(*s.args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = pipe.sessions[s.name].run(None, {n: a.numpy() for n, a in zip(s.inputs, s.args)})
        assert len(got) == len(ref), s.name
        for r, g in zip(ref, got):
            assert g.shape == tuple(r.shape), s.name
        diffs[s.name] = max(float(np.abs(r.numpy() - g).max()) for r, g in zip(ref, got))
    return diffs


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("model", ["tiny", "sd21"])
def test_every_stage_matches_pytorch_within_1e4(model, batch, request):
    """Max abs difference ONNX Runtime vs PyTorch, fp32, <= 1e-4 for every stage, on inputs
    where every stage is well-conditioned (the SD 2.1-layout toy runs 128x128 images, so its
    mid-block is 2x2, not the 1x1 at which GroupNorm normalised two values per group)."""
    c, _, pipe = request.getfixturevalue(model)[:3]
    diffs = _stage_diffs(c, pipe, batch)
    print(f"{model} batch {batch}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert set(diffs) == set(C.STAGES)
    bad = {name: d for name, d in diffs.items() if not d <= FP32_BOUND}
    assert not bad, f"stages over {FP32_BOUND}: {bad}"


def test_h_adapter_graph_takes_any_number_of_neighbours(tiny):
    c, _, pipe = tiny
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 96, 4, 4, generator=g)
    lam = torch.tensor([0.3, 0.9])
    for k in (1, 5):
        h_retr = torch.randn(2, k, 96, 4, 4, generator=g)
        with torch.no_grad():
            ref = c.h_adapter(h, h_retr, lam).numpy()
        got = pipe.h_adapter(h.numpy(), h_retr.numpy(), lam.numpy())
        assert np.abs(ref - got).max() <= FP32_BOUND
        assert np.abs(got - h.numpy()).max() > 1e-3  # the adapter does change h


@pytest.mark.parametrize("model", ["tiny", "sd21"])
def test_onnx_image_matches_pytorch_image_within_2_of_255(model, request):
    c, _, pipe = request.getfixturevalue(model)[:3]
    prompts, seeds = ["a red circle left of a blue square", "three green triangles"], [0, 7]
    rng = np.random.default_rng(0)
    h_retr = rng.standard_normal((2, 2, *pipe.h_shape), dtype=np.float32)
    lam = np.array([0.5, 0.9], dtype=np.float32)
    cases = [{}, {"h_retr": h_retr, "lam": lam}, {"h_retr": h_retr, "slerp_w": 0.8}]
    for kw in cases:
        tkw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        a = student_generate(c, prompts, seeds, **tkw)
        b = pipe.generate(prompts, seeds, **kw)
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2, list(kw)


def test_manifest_records_stages_shapes_opset_identity_and_checksums(tiny):
    c, out, _ = tiny
    m = load_manifest(out, verify=True)
    assert m["opset"] == oe.DEFAULT_OPSET and m["dtype"] == "float32"
    assert m["source"]["weights_sha256"] == oe.model_identity(c)["weights_sha256"]
    assert list(m["stages"]) == list(C.STAGES)
    st = m["stages"]
    assert [v["name"] for v in st["text_encoder"]["outputs"]] == ["last_hidden_state", "pooled"]
    assert st["unet_encoder"]["outputs"][0]["shape"] == ["batch", 96, 4, 4]
    assert st["h_adapter"]["inputs"][1]["shape"] == ["batch", "k", 96, 4, 4]
    assert [v["name"] for v in st["unet_decoder"]["inputs"]][-3:] == [
        "encoder_hidden_states", "sample", "timestep"]
    assert st["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, 64, 64]
    for entry in st.values():
        assert not entry["external_data"]
        for f, info in entry["files"].items():
            assert sha256_file(out / f) == info["sha256"]


def test_large_graphs_go_to_external_data_and_still_load(sd21):
    _, out, pipe, _ = sd21
    m = pipe.manifest
    assert m["external_data_threshold"] == 100000
    assert m["stages"]["unet_decoder"]["external_data"]
    assert (out / "unet_decoder.onnx.data").stat().st_size > 100000
    assert m["source"]["source"] == str(sd21[3].resolve())
    # the pipeline above was built from these files: external data resolved beside the graph


def test_fp16_export_keeps_attention_core_in_fp32_when_asked(tiny, tmp_path):
    import onnx

    c, _, _ = tiny
    out = {}
    for att in (False, True):
        d = oe.export_model(c, tmp_path / f"fp16-{att}", fp16=True, fp32_attention=att,
                            progress=False)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(d / "unet_encoder.onnx")))
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        softmax_in = [types.get(n.input[0]) for n in model.graph.node if n.op_type == "Softmax"]
        assert softmax_in, "the UNet encoder has attention"
        out[att] = set(softmax_in)
        m = load_manifest(d)
        assert m["dtype"] == "float16" and m["fp32_attention"] is att
        assert m["stages"]["unet_encoder"]["inputs"][0]["dtype"] == "float32"  # io stays fp32
    assert out[False] == {onnx.TensorProto.FLOAT16}
    assert out[True] == {onnx.TensorProto.FLOAT}


def test_generate_cli_gives_the_same_png_on_both_backends(sd21, tmp_path):
    from PIL import Image

    _, out, _, folder = sd21
    pngs = {}
    for backend in ("onnx", "torch"):
        path = tmp_path / f"{backend}.png"
        rc = main(["generate", "a yellow star", "--backend", backend, "--seed", "3",
                   "--model", str(folder), "--onnx", str(out), "--threads", "1", "-o", str(path)])
        assert rc == 0
        pngs[backend] = np.asarray(Image.open(path)).astype(int)
    assert pngs["onnx"].shape == (128, 128, 3)  # the SD 2.1-layout toy draws 128x128
    assert np.abs(pngs["onnx"] - pngs["torch"]).max() <= 2


def test_generate_with_k_and_no_index_exits_2_with_a_clear_message(sd21, tmp_path, capsys):
    _, out, _, _ = sd21
    rc = main(["generate", "a yellow star", "--onnx", str(out), "--k", "2",
               "--index", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")])
    assert rc == 2
    assert "no retrieval index" in capsys.readouterr().err


def test_export_refuses_to_overwrite_and_missing_export_is_a_clear_error(tiny, tmp_path):
    c, out, _ = tiny
    with pytest.raises(FileExistsError, match="overwrite"):
        oe.export_model(c, out, progress=False)
    with pytest.raises(FileNotFoundError, match="no ONNX export"):
        runtime.OnnxPipeline(tmp_path)


def test_runtime_rejects_bad_retrieved_features(tiny):
    _, _, pipe = tiny
    h = np.zeros((2, *pipe.h_shape), dtype=np.float32)
    with pytest.raises(ValueError, match="h_retr must be"):
        pipe.h_adapter(h, np.zeros((2, 1, 95, 4, 4), dtype=np.float32), np.ones(2))
    with pytest.raises(ValueError, match="one value per sample"):
        pipe.h_adapter(h, np.zeros((2, 1, *pipe.h_shape), dtype=np.float32), np.ones(3))


def test_onnx_noise_and_slerp_equal_the_pytorch_pipeline_s():
    from imageragturbo.model import pipeline
    from imageragturbo.model.h_space import slerp_inject

    # one torch-free noise function serves every backend
    assert runtime.initial_noise is pipeline.initial_noise
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 2, 2, generator=g), torch.randn(3, 8, 2, 2, generator=g)
    for w in (0.0, 0.3, 1.0):
        ref = slerp_inject(a, b, w).numpy()
        assert np.abs(runtime.slerp_inject(a.numpy(), b.numpy(), w) - ref).max() < 1e-5
    same = runtime.slerp_inject(a.numpy(), a.numpy(), 0.4)  # angle 0: lerp
    assert np.abs(same - a.numpy()).max() < 1e-5


def test_retrieval_controls_follow_eq5_with_adapter_and_eq3_without():
    scores = np.array([[0.9, 0.5], [0.4, 0.1]], dtype=np.float32)
    lam, w = runtime.retrieval_controls(scores, None, has_adapter=True)
    assert np.allclose(lam, [0.9, 0.4]) and w is None
    lam, w = runtime.retrieval_controls(scores, None, has_adapter=False)
    assert lam is None and w == pytest.approx(0.8)
    with pytest.raises(ValueError):
        runtime.retrieval_controls(scores, 1.5, has_adapter=False)


def test_providers_fall_back_to_cpu_and_unknown_ones_are_refused():
    import onnxruntime as ort

    assert runtime.choose_providers()[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="not available"):
            runtime.choose_providers(["cuda"])


def test_bench_pipeline_reports_every_stage_and_end_to_end_for_both_backends():
    from imageragturbo.export.bench import bench_pipeline

    res = bench_pipeline(random_weights=True, batches=(2,), repeats=1, warmup=0, threads=1,
                         progress=False)
    row = res["batches"]["2"]
    want = {*C.STAGES, "end_to_end"}
    assert set(row["torch"]) == set(row["onnx"]) == want
    assert all(v > 0 for v in row["onnx"].values())
    assert row["image_max_abs_diff"] <= 2
    json.dumps(res)


def test_sdturbo_gpu_script_constructs_at_full_size_on_the_meta_device():
    from imageragturbo.export.gpu_bench import dry_run

    res = dry_run()
    p = res["parameters"]
    assert 860e6 < p["unet"] < 870e6             # SD 2.1's UNet: 865.9 M
    assert 330e6 < p["text_encoder"] < 350e6     # OpenCLIP-H text tower, 23 layers
    assert 35e6 < p["h_adapter"] < 37e6          # paper: "36M, 4%"
    assert res["shapes"]["h"] == [1, 1280, 8, 8]
    assert res["shapes"]["image"] == [1, 3, 512, 512]
    assert res["fp32_unet_over_2GB"]


def test_export_from_a_folder_records_the_weight_files_identity(sd21, tmp_path):
    """serve compares this with the weights on disk to tell a stale export from a current one.
    An export is made of the adapter and the decoder LoRA too, so retraining either makes it
    stale; a retrieval index caches only what the text encoder, VAE and UNet encoder give, so
    it stays current then, and goes stale when the UNet changes. Driven through
    ``ensure_export`` on a copy of the exported folder (same name: the identity includes it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from imageragturbo.commands.assets import ensure_export
    from imageragturbo.defaults import model_files_id

    _, out, _, folder = sd21
    recorded = json.loads((out / "manifest.json").read_text())["model_files_id"]
    model = tmp_path / folder.name
    shutil.copytree(folder, model)
    assert (model / "h_adapter").is_dir() and not (model / "unet_lora").exists()

    def nudge(f):
        sd = load_file(f)
        name = sorted(sd)[0]
        sd[name] = sd[name] + 1e-3
        save_file(sd, f)

    assert ensure_export(str(model), out, quiet=True) == out   # same weights: current
    index_id = model_files_id(model, index=True)
    nudge(next((model / "h_adapter").glob("*.safetensors")))  # the adapter retrained
    with pytest.raises(ValueError, match="made from other weights"):
        ensure_export(str(model), out, quiet=True)
    assert model_files_id(model, index=True) == index_id       # the index stays current
    shutil.copytree(folder / "h_adapter", model / "h_adapter", dirs_exist_ok=True)
    assert model_files_id(model) == recorded                   # back to the exported weights
    (model / "unet_lora").mkdir()
    (model / "unet_lora" / "adapter_config.json").write_text('{"r": 4}')
    assert model_files_id(model) != recorded                   # a decoder LoRA added: stale
    assert model_files_id(model, index=True) == index_id
    nudge(next((model / "unet").glob("*.safetensors")))        # the UNet changed
    assert model_files_id(model, index=True) != index_id


# ----------------------------------------------------------------------------- fp16 graphs

# Max |fp16 - fp32| over each output, relative to that output's max |fp32|, ONNX Runtime CPU,
# SD 2.1-layout toy, per stage on the same inputs. Measured at batch 1 / 4: text_encoder
# 0.9e-3 / 1.5e-3, unet_encoder 1.1e-3 / 1.5e-3, h_adapter 1.1e-4 / 2.0e-4, unet_decoder
# 3.2e-4 / 3.3e-4, vae_decoder 0.8e-3 / 1.5e-3: one to two fp16 steps (2^-10 ~ 9.8e-4) of the
# output's scale. The bound, 5e-3 (about five fp16 steps), leaves 3.3x over the worst of them.
FP16_REL_BOUND = 5e-3


def _cpu_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_fp16_graphs_pass_the_full_onnx_checker_and_load_in_onnx_runtime(sd21_fp16):
    """Every fp16 graph is valid ONNX (full check: strict type and shape inference, which
    rejects fp16 scales on Resize) and opens in an ONNX Runtime CPU session. Before the fix
    unet_decoder and vae_decoder failed both (INVALID_GRAPH: Resize's scales in fp16) and
    every graph with fp32 inputs failed the checker (casts not topologically sorted)."""
    import onnx

    m = load_manifest(sd21_fp16, verify=True)
    assert m["dtype"] == "float16" and list(m["stages"]) == list(C.STAGES)
    assert m["stages"]["unet_decoder"]["external_data"]  # the checker reads external data too
    for entry in m["stages"].values():
        path = sd21_fp16 / entry["file"]
        onnx.checker.check_model(str(path), full_check=True)
        _cpu_session(path)


def test_fp16_resize_scales_stay_float32_constants(sd21_fp16):
    """The ONNX spec allows only float32 for Resize's scales: each upsampler reads an fp32
    Constant (never rounded through fp16, no cast in between)."""
    import onnx
    from onnx import numpy_helper

    seen = 0
    for name in ("unet_decoder", "vae_decoder"):
        g = onnx.load(str(sd21_fp16 / f"{name}.onnx")).graph
        producer = {o: n for n in g.node for o in n.output}
        for node in (n for n in g.node if n.op_type == "Resize"):
            src = producer[node.input[2]]
            assert src.op_type == "Constant", (name, node.name, src.op_type)
            scales = numpy_helper.to_array(src.attribute[0].t)
            assert scales.dtype == np.float32 and scales.tolist() == [1.0, 1.0, 2.0, 2.0]
            seen += 1
    assert seen == 6  # three upsamplers in each decoder


@pytest.mark.parametrize("batch", [1, 4])
def test_fp16_stages_match_fp32_stages_within_5e3_of_output_scale(sd21, sd21_fp16, batch):
    """Per stage, the fp16 graph against the fp32 graph of the same model on the same inputs
    (ONNX Runtime CPU both): max |fp16 - fp32| / max |fp32| <= FP16_REL_BOUND (5e-3) for every
    output. Relative, because the scales differ by 20x: z0 = (z_t - sigma eps) / alpha at
    t = 999 reaches about 60, where fp16's own step is 0.03. ONNX Runtime's CPU provider has
    few fp16 kernels and runs the rest in fp32 behind casts it inserts, so this measures fp16
    rounding of weights and of the values between those ops, not fp16 accumulation as a GPU
    runs it."""
    c, _, pipe32, _ = sd21
    sessions = {s: _cpu_session(sd21_fp16 / f"{s}.onnx") for s in C.STAGES}
    rel = {}
    for s in oe.stage_specs(c, c.h_adapter, batch=batch, k=3):
        feed = {n: a.numpy() for n, a in zip(s.inputs, s.args)}
        ref = pipe32.sessions[s.name].run(None, feed)
        got = sessions[s.name].run(None, feed)
        rel[s.name] = max(float(np.abs(r - g).max() / np.abs(r).max())
                          for r, g in zip(ref, got))
    print(f"fp16 vs fp32 batch {batch}: " + ", ".join(f"{k} {v:.2e}" for k, v in rel.items()))
    assert set(rel) == set(C.STAGES)
    bad = {name: d for name, d in rel.items() if not d <= FP16_REL_BOUND}
    assert not bad, f"stages over {FP16_REL_BOUND} of their output's scale: {bad}"


def test_fp16_image_matches_fp32_image_within_2_of_255(sd21, sd21_fp16):
    """End to end through the ONNX Runtime pipeline, same prompts and seeds, with and without
    the adapter (measured: at most 1/255)."""
    _, _, pipe32, _ = sd21
    pipe16 = runtime.OnnxPipeline(sd21_fp16, providers=["CPUExecutionProvider"], threads=1)
    prompts, seeds = ["a red circle left of a blue square", "three green triangles"], [0, 7]
    rng = np.random.default_rng(0)
    h_retr = rng.standard_normal((2, 2, *pipe32.h_shape), dtype=np.float32)
    for kw in ({}, {"h_retr": h_retr, "lam": np.array([0.5, 0.9], dtype=np.float32)}):
        a, b = pipe32.generate(prompts, seeds, **kw), pipe16.generate(prompts, seeds, **kw)
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2, list(kw)


class _SelfAttention(torch.nn.Module):
    """One diffusers attention (named ``attn1``, as in the UNet) with identity projections."""

    def __init__(self, dim: int = 8):
        from diffusers.models.attention_processor import Attention

        super().__init__()
        self.attn1 = Attention(query_dim=dim, heads=1, dim_head=dim)
        with torch.no_grad():
            for lin in (self.attn1.to_q, self.attn1.to_k, self.attn1.to_v,
                        self.attn1.to_out[0]):
                lin.weight.copy_(torch.eye(dim))
                if lin.bias is not None:
                    lin.bias.zero_()

    def forward(self, x):
        return self.attn1(x)


def test_fp32_attention_keeps_scores_beyond_fp16_range_finite(tmp_path):
    """Attention scores of 1.2e5 (fp16 ends at 65504) with values and outputs near 200: with
    ``fp32_attention`` the exported graph gives PyTorch's fp32 output. Before the fix the
    converter cast each blocked node's output to fp16 and back before the next blocked node,
    so the scores went through fp16 between MatMul and Softmax and came out NaN."""
    m = _SelfAttention().eval()
    x = 200 + torch.arange(4 * 8, dtype=torch.float32).reshape(1, 4, 8) / 8
    assert float((x @ x.transpose(1, 2)).max()) / 8 ** 0.5 > 65504
    with torch.no_grad():
        ref = m(x).numpy()
    spec = oe.StageSpec("attn", m, (x,), ["x"], ["y"], {"x": {0: "b"}, "y": {0: "b"}})
    oe.export_stage(spec, tmp_path / "attn.onnx", fp16=True, fp32_attention=True)
    got = _cpu_session(tmp_path / "attn.onnx").run(None, {"x": x.numpy()})[0]
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def test_gpu_profile_of_an_fp16_export_references_only_graphs_that_load(sd21_fp16, tmp_path):
    """Render the Triton repository's gpu profile for the fp16 export (linked and copied) and
    open every ONNX graph its onnxruntime-backend models reference in an ONNX Runtime CPU
    session, then run it once on zeros at batch 1 as the profile's model_warmup does. The
    retrieval index is a three-item stand-in (rendering links it, or copies it checking its
    digests), and no retriever runs here."""
    from imageragturbo.retriever import Pair, build_index
    from imageragturbo.serving.repository import load_configs, render_repository

    class StandIn:  # not a model: fixed keys and zero tensors, enough for a whole index
        model_id, text_dim = "stand-in", 4

        def encode_text(self, captions):
            return np.eye(4, dtype=np.float32)[: len(captions)]

        def encode_images(self, images):
            return np.zeros((len(images), 4, 1, 1), np.float32)

        def h_features(self, latents, captions):
            return np.zeros((len(captions), 2, 1, 1), np.float32)

    index = build_index([Pair(str(i), f"item {i}", "-") for i in range(3)], StandIn(),
                        tmp_path / "index", progress=False, image_loader=lambda path: None)
    for link in ("symlink", "copy"):
        repo = render_repository(sd21_fp16, index, tmp_path / f"gpu-{link}", "gpu", link=link)
        onnx_models = {name: c for name, c in load_configs(repo).items()
                       if c.backend == "onnxruntime"}
        assert set(onnx_models) == set(C.STAGES)
        for name, c in onnx_models.items():
            path = repo / name / "1" / (c.default_model_filename or "model.onnx")
            sess = _cpu_session(path)
            feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                                     dtype=np.int64 if i.type == "tensor(int64)" else np.float32)
                    for i in sess.get_inputs()}
            for out in sess.run(None, feed):
                assert np.isfinite(out).all(), (link, name)


def test_repeated_casts_from_older_fp16_converters_are_merged(tmp_path):
    """onnxruntime's fp16 converter before 1.32 (the CUDA 13 build, 1.31.1) writes one identical
    Cast per blocked consumer of an fp16 tensor, same node and output name, and ONNX Runtime
    refuses the graph ("two nodes with same node name"). ``dedupe_nodes`` keeps one."""
    import onnx
    from onnx import TensorProto, helper

    from imageragturbo.export.graph import dedupe_nodes

    cast = helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="x_cast")
    nodes = [cast, helper.make_node("Relu", ["x32"], ["a"], name="relu"),
             helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="x_cast"),
             helper.make_node("Neg", ["x32"], ["b"], name="neg")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16,
                                                                     [2])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])
                           for n in ("a", "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(Exception, match="same node name|x32"):
        _cpu_session_of(m, tmp_path / "dup.onnx")
    assert dedupe_nodes(m) == 1
    onnx.checker.check_model(m, full_check=True)
    out = _cpu_session_of(m, tmp_path / "ok.onnx").run(
        None, {"x": np.array([1, -2], dtype=np.float16)})
    assert out[0].tolist() == [1.0, 0.0] and out[1].tolist() == [-1.0, 2.0]


def _cpu_session_of(model, path):
    import onnx

    onnx.save(model, path)
    return _cpu_session(path)


def test_to_uint8_rounds_to_the_nearest_pixel_value_not_down():
    """The VAE's [-1, 1] output to pixels: x = p / 127.5 - 1 lands on pixel p exactly, and a
    value 0.999 of a step above p gives p + 1 (rounded, as ``decode_latents``), 0.4 of a step
    stays p; out of range clips to 0 and 255; (B, 3, H, W) becomes (B, H, W, 3)."""
    from imageragturbo.runtime.request import to_uint8

    pixels = np.array([0.0, 0.4, 0.6, 0.999, 1.001, 127.4, 127.6, 200.999, 254.4, 254.999,
                       255.0, -40.0, 300.0])
    want = [0, 0, 1, 1, 1, 127, 128, 201, 254, 255, 255, 0, 255]
    x = (pixels / 127.5 - 1.0).astype(np.float32)
    img = np.stack([x, x[::-1], np.zeros_like(x)]).reshape(1, 3, 1, -1)    # (1, 3, 1, 13)
    out = to_uint8(img)
    assert out.dtype == np.uint8 and out.shape == (1, 1, len(want), 3)
    assert out[0, 0, :, 0].tolist() == want
    assert out[0, 0, :, 1].tolist() == want[::-1]
    assert out[0, 0, :, 2].tolist() == [128] * len(want)                  # 0.0 -> 127.5 -> 128
    assert to_uint8(img.astype(np.float16))[0, 0, :4, 0].tolist() == [0, 0, 1, 1]


def test_a_truncated_stage_file_is_refused_without_verify(tmp_path):
    """``load_manifest`` checks every stage file's size even without ``verify`` (which adds
    the sha256): a graph or external-data file cut short, e.g. by a copy that ran out of disk,
    is refused before ONNX Runtime sees it; a same-size alteration needs ``verify``."""
    import hashlib

    from imageragturbo.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST

    stages, blobs = {}, {}
    for i, name in enumerate(C.STAGES):
        files = {f"{name}.onnx": bytes(range(256)) * (i + 2)}
        if name == "unet_decoder":
            files[f"{name}.onnx.data"] = b"\x01" * 3000  # external data counts too
        for f, data in files.items():
            (tmp_path / f).write_bytes(data)
            blobs[f] = data
        stages[name] = {"files": {f: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                                  for f, d in files.items()}}
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                                                 "stages": stages}))
    assert set(load_manifest(tmp_path)["stages"]) == set(C.STAGES)
    for f, data in blobs.items():
        (tmp_path / f).write_bytes(data[:-1])
        with pytest.raises(ValueError, match=f"{f} differs from the manifest"):
            load_manifest(tmp_path)
        (tmp_path / f).write_bytes(data + b"\0")
        with pytest.raises(ValueError, match=f"{f} differs from the manifest"):
            load_manifest(tmp_path)
        (tmp_path / f).write_bytes(data)
    altered = bytes([blobs["unet_decoder.onnx"][0] ^ 0xFF]) + blobs["unet_decoder.onnx"][1:]
    (tmp_path / "unet_decoder.onnx").write_bytes(altered)
    load_manifest(tmp_path)  # same size: only the checksum tells
    with pytest.raises(ValueError, match="unet_decoder.onnx differs"):
        load_manifest(tmp_path, verify=True)
