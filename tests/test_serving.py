"""The served ensemble on a real tritonserver (nvidia-pytriton's, cpu profile; fixtures in
conftest.py): served images must equal the in-process ONNX Runtime pipeline's for the same seed
(within 2/255), with and without retrieval, through the H-adapter graph and through the slerp
step; bad requests get INVALID_ARG with a clear message and the server keeps serving. Also:
both repository profiles render, the gpu one names the onnxruntime backend / TensorRT FP16 /
KIND_GPU, and the wiring is identical."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serving_support import PIXEL_BOUND, PROMPTS, _inp, _maxdiff, _prompt, in_process
from tritonclient.utils import InferenceServerException

from imageragturbo.client import (
    AsyncImageRAGTurboClient,
    DeadlineExceededError,
    ImageRAGTurboClient,
    InvalidInputError,
    RetryPolicy,
)
from imageragturbo.commands.main import main
from imageragturbo.model import family
from imageragturbo.serving.repository import load_configs, render_repository, wiring

# ----------------------------------------------------------------------------- rendering


def test_both_profiles_render_and_parse_with_tritons_config_schema(assets, tmp_path):
    for profile in ("cpu", "gpu"):
        repo = render_repository(assets["adapter"], assets["index"], tmp_path / profile, profile)
        configs = load_configs(repo)
        assert set(configs) == {"imageragturbo", "preprocess", "text_encoder", "retriever",
                                "unet_encoder", "h_adapter", "unet_decoder", "vae_decoder",
                                "postprocess"}
        for name in ("text_encoder", "unet_encoder", "h_adapter", "unet_decoder",
                     "vae_decoder"):
            assert (repo / name / "1" / "model.onnx").exists()


def test_gpu_profile_names_onnxruntime_backend_tensorrt_fp16_kind_gpu_and_warmup(assets,
                                                                                 tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    repo = render_repository(assets["adapter"], assets["index"], tmp_path / "gpu", "gpu",
                             link="copy")
    configs = load_configs(repo)
    for name in ("text_encoder", "unet_encoder", "h_adapter", "unet_decoder", "vae_decoder"):
        c = configs[name]
        assert c.backend == "onnxruntime", name
        assert c.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        acc = c.optimization.execution_accelerators.gpu_execution_accelerator
        assert acc[0].name == "tensorrt"
        assert acc[0].parameters["precision_mode"] == "FP16"
        assert acc[0].parameters["trt_engine_cache_enable"] == "1"
        assert acc[0].parameters["trt_engine_cache_path"]
        assert [w.batch_size for w in c.model_warmup] == [1, 8]
        assert not (repo / name / "1" / "model.onnx").is_symlink()  # copied: shippable
    assert not configs["imageragturbo"].model_warmup  # ensembles reject model_warmup
    assert configs["imageragturbo"].platform == "ensemble"


def test_cpu_and_gpu_profiles_have_identical_wiring(assets, tmp_path):
    for export in ("adapter", "slerp"):
        cpu = render_repository(assets[export], assets["index"], tmp_path / f"c{export}", "cpu")
        gpu = render_repository(assets[export], assets["index"], tmp_path / f"g{export}", "gpu")
        a, b = wiring(cpu), wiring(gpu)
        assert a == b
        steps = [s[0] for s in a["imageragturbo"]["steps"]]
        assert steps == ["preprocess", "text_encoder", "retriever", "unet_encoder", "h_adapter",
                         "unet_decoder", "vae_decoder", "postprocess"]
        for name, w in a.items():
            if name != "imageragturbo":
                assert w["dynamic_batching"] and "max_queue_size: 64" in w["dynamic_batching"]
                assert "default_timeout_microseconds" in w["dynamic_batching"]
    assert load_configs(cpu)["text_encoder"].backend == "python"


def test_slerp_injection_option_serves_an_adapter_export_training_free(assets, tmp_path):
    """``serve --injection slerp``: the h_adapter step of an export that has a trained adapter
    becomes the python slerp step (paper Eq. 3), fed slerp_w where the graph takes lam."""
    from imageragturbo.serving.repository import RenderOptions

    adapter = render_repository(assets["adapter"], assets["index"], tmp_path / "a", "cpu")
    slerp = render_repository(assets["adapter"], assets["index"], tmp_path / "s", "cpu",
                              RenderOptions(injection="slerp"))
    assert "onnx" in (adapter / "h_adapter" / "config.pbtxt").read_text().lower() or (
        adapter / "h_adapter" / "1" / "model.onnx").exists()
    assert not (slerp / "h_adapter" / "1" / "model.onnx").exists()
    assert "slerp" in (slerp / "h_adapter" / "1" / "model.py").read_text()
    assert 'key: "has_adapter" value: { string_value: "false" }' in (
        slerp / "retriever" / "config.pbtxt").read_text()
    # the same steps; the adapter step takes lam (the graph) or slerp_w (the slerp step)
    a, s = wiring(adapter)["imageragturbo"]["steps"], wiring(slerp)["imageragturbo"]["steps"]
    assert [x[0] for x in a] == [x[0] for x in s]
    moded = ("h_adapter", "retriever")  # lam or slerp_w: into the adapter step, out of retrieval
    assert {m: (i, o) for m, i, o in a if m not in moded} == {
        m: (i, o) for m, i, o in s if m not in moded}
    steps_a, steps_s = {m: (i, o) for m, i, o in a}, {m: (i, o) for m, i, o in s}
    assert steps_a["h_adapter"][0]["lam"] == "lam" and "slerp_w" not in steps_a["h_adapter"][0]
    assert steps_s["h_adapter"][0]["slerp_w"] == "slerp_w" and "lam" not in steps_s["h_adapter"][0]
    assert "lam" in steps_a["retriever"][1] and "slerp_w" in steps_s["retriever"][1]
    with pytest.raises(ValueError, match="injection"):
        RenderOptions(injection="sometimes")


def test_a_copied_index_is_checked_as_it_is_copied_and_a_corrupted_one_refused(assets,
                                                                                tmp_path):
    """``--link copy`` (the gpu default) copies the index through ``copy_index``, which checks
    every file's sha256, so the served load can check only the structure (``verify`` "false"
    unless ``--verify-index``); a corrupted index fails the render and leaves nothing behind."""
    import shutil

    from imageragturbo.retriever import IndexFormatError, RetrievalIndex
    from imageragturbo.serving.repository import RenderOptions

    repo = render_repository(assets["adapter"], assets["index"], tmp_path / "gpu", "gpu",
                             link="copy")
    copied = repo / "retriever" / "1" / "index"
    assert copied.is_dir() and not copied.is_symlink()
    assert len(RetrievalIndex.load(copied, verify=True)) == 40
    verify = 'key: "verify" value: { string_value: "%s" }'
    assert verify % "false" in (repo / "retriever" / "config.pbtxt").read_text()
    checked = render_repository(assets["adapter"], assets["index"], tmp_path / "v", "cpu",
                                RenderOptions(verify_index=True))
    assert verify % "true" in (checked / "retriever" / "config.pbtxt").read_text()

    bad = tmp_path / "bad-index"
    shutil.copytree(assets["index"].resolve(), bad)
    h = bytearray((bad / "h.f16.npy").read_bytes())
    h[-1] ^= 0xFF
    (bad / "h.f16.npy").write_bytes(bytes(h))
    with pytest.raises(IndexFormatError, match="sha256 of h.f16.npy differs"):
        render_repository(assets["adapter"], bad, tmp_path / "bad", "gpu", link="copy")
    assert not any((tmp_path / "bad").iterdir())


def test_render_refuses_to_overwrite_a_folder_that_is_not_a_rendering(assets, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a rendered model repository"):
        render_repository(assets["adapter"], assets["index"], tmp_path, "cpu")


def test_cli_serve_render_only_writes_gpu_repository(assets, tmp_path, capsys):
    out = tmp_path / "gpu-repo"
    rc = main(["serve", "--model", str(assets["model"]), "--export", str(assets["adapter"]),
               "--index", str(assets["index"]), "--profile", "gpu", "--render-only",
               "--out", str(out), "--quiet"])
    assert rc == 0
    assert load_configs(out)["unet_decoder"].backend == "onnxruntime"


def test_cli_serve_without_trained_default_model_says_to_train_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(family.VARIANTS, "tiny-shapes", tmp_path / "missing")
    assert main(["serve", "--render-only"]) == 2
    assert "train it first" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parity


def test_served_image_equals_in_process_without_retrieval_plain_tritonclient(server, pipes):
    with grpcclient.InferenceServerClient(server.url) as c:
        res = c.infer("imageragturbo", [_prompt(PROMPTS[0]),
                                        _inp("SEED", np.array([[7]], np.int64), "INT64"),
                                        _inp("K", np.array([[0]], np.int32), "INT32")])
    image = res.as_numpy("IMAGE")
    assert image.dtype == np.uint8 and image.shape == (1, 64, 64, 3)
    assert res.as_numpy("NEIGHBOUR_IDS").shape == (1, 0)
    ref, _ = in_process(pipes, "adapter", PROMPTS[:1], [7])
    assert _maxdiff(image, ref) <= PIXEL_BOUND


def test_served_image_equals_in_process_with_h_adapter_retrieval(client, pipes):
    r = client.generate(PROMPTS[1], seed=11, k=3)
    ref, nb = in_process(pipes, "adapter", PROMPTS[1:2], [11], k=3)
    assert _maxdiff(r.array[None], ref) <= PIXEL_BOUND
    plain, _ = in_process(pipes, "adapter", PROMPTS[1:2], [11])
    assert _maxdiff(ref, plain) > PIXEL_BOUND  # retrieval changed the image: a real check
    assert [n.id for n in r.neighbours] == nb.item_ids[0]
    assert [n.caption for n in r.neighbours] == nb.captions[0]
    np.testing.assert_allclose([n.score for n in r.neighbours], nb.scores[0], atol=1e-4)


def test_served_image_equals_in_process_with_slerp_retrieval(servers, pipes):
    with ImageRAGTurboClient(servers["slerp"].url, timeout=60) as c:
        r = c.generate(PROMPTS[2], seed=5, k=2, strength=0.6)
        r0 = c.generate(PROMPTS[2], seed=5, k=0)
    ref, nb = in_process(pipes, "slerp", PROMPTS[2:3], [5], k=2, strength=0.6)
    assert _maxdiff(r.array[None], ref) <= PIXEL_BOUND
    plain, _ = in_process(pipes, "slerp", PROMPTS[2:3], [5])
    assert _maxdiff(r0.array[None], plain) <= PIXEL_BOUND
    assert _maxdiff(ref, plain) > PIXEL_BOUND
    assert [n.caption for n in r.neighbours] == nb.captions[0]


def test_a_neighbour_start_model_is_served_from_its_top1_neighbour_as_in_process(servers,
                                                                                   pipes):
    """A model trained with a neighbour start (beyond the paper): served, its step starts from
    the top-1 neighbour's latent noised to its start timestep, as in process (2/255); the
    start changes the image against the same weights started from z_T; K = 0 is the plain
    step from z_T at t = 999, in a batch with a K > 0 request as alone."""
    pipe, index = pipes["start"]
    assert pipe.neighbour_start["timestep"] < 999
    with ImageRAGTurboClient(servers["start"].url, timeout=60) as c:
        r = c.generate(PROMPTS[1], seed=11, k=3)
        r0 = c.generate(PROMPTS[1], seed=11, k=0)
    ref, nb = in_process(pipes, "start", PROMPTS[1:2], [11], k=3)
    assert _maxdiff(r.array[None], ref) <= PIXEL_BOUND
    assert [n.id for n in r.neighbours] == nb.item_ids[0]
    same_weights_from_z_t, _ = in_process(pipes, "adapter", PROMPTS[1:2], [11], k=3)
    assert _maxdiff(ref, same_weights_from_z_t) > PIXEL_BOUND   # the start is used
    plain, _ = in_process(pipes, "start", PROMPTS[1:2], [11])
    assert _maxdiff(r0.array[None], plain) <= PIXEL_BOUND
    with grpcclient.InferenceServerClient(servers["start"].url) as g:
        res = g.infer("imageragturbo", [_prompt(PROMPTS[1], PROMPTS[1]),
                                        _inp("SEED", np.array([[11], [11]], np.int64), "INT64"),
                                        _inp("K", np.array([[3], [3]], np.int32), "INT32")])
    assert _maxdiff(res.as_numpy("IMAGE")[:1], ref) <= PIXEL_BOUND


def test_batch_request_returns_each_prompts_image_as_in_process(client, pipes):
    rs = client.generate_batch(PROMPTS, seeds=[1, 2, 3], k=2)
    assert [r.seed for r in rs] == [1, 2, 3] and all(len(r.neighbours) == 2 for r in rs)
    ref, _ = in_process(pipes, "adapter", PROMPTS, [1, 2, 3], k=2)
    assert _maxdiff(np.stack([r.array for r in rs]), ref) <= PIXEL_BOUND


def test_strength_zero_retrieves_neighbours_but_keeps_the_plain_image(client):
    r = client.generate(PROMPTS[0], seed=4, k=2, strength=0.0)
    plain = client.generate(PROMPTS[0], seed=4, k=0)
    assert len(r.neighbours) == 2
    assert _maxdiff(r.array, plain.array) == 0


def test_request_without_seed_reports_the_random_seed_it_used(client):
    r = client.generate(PROMPTS[0], k=0)
    again = client.generate(PROMPTS[0], seed=r.seed, k=0)
    assert _maxdiff(r.array, again.array) == 0
    assert r.png[:8] == b"\x89PNG\r\n\x1a\n" and r.image.size == (64, 64)


def test_concurrent_requests_are_dynamically_batched_and_match_single_requests(server, client):
    async def burst():
        async with AsyncImageRAGTurboClient(server.url, timeout=60) as ac:
            return await asyncio.gather(*(ac.generate(PROMPTS[i % 3], seed=100 + i, k=1)
                                          for i in range(8)))

    with grpcclient.InferenceServerClient(server.url) as c:
        before = c.get_inference_statistics("unet_encoder").model_stats[0]
        results = asyncio.run(burst())
        after = c.get_inference_statistics("unet_encoder").model_stats[0]
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == 8 and executions < 8, (inferences, executions)  # some were batched
    for i in range(8):  # every one of them, not a sample
        single = client.generate(PROMPTS[i % 3], seed=100 + i, k=1)
        assert _maxdiff(results[i].array, single.array) <= PIXEL_BOUND, i


def test_one_bad_request_in_a_dynamic_batch_fails_alone(server, client):
    """Seven valid requests and one blank prompt sent together: the seven get their images
    (each equal to its single request), the bad one alone gets INVALID_ARGUMENT."""
    async def burst():
        async with AsyncImageRAGTurboClient(server.url, timeout=60) as ac:
            calls = [ac.generate(PROMPTS[i % 3], seed=200 + i, k=1) for i in range(7)]
            calls.insert(3, ac.generate("   ", seed=1, k=1))
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst())
    assert isinstance(results[3], InvalidInputError), results[3]
    good = [r for j, r in enumerate(results) if j != 3]
    assert not any(isinstance(r, BaseException) for r in good), good
    for i, r in enumerate(good):
        assert _maxdiff(r.array, client.generate(PROMPTS[i % 3], seed=200 + i, k=1).array) \
            <= PIXEL_BOUND


# ----------------------------------------------------------------------------- bad input


BAD = {
    "empty_prompt": ([_prompt("")], "PROMPT[0] is empty"),
    "blank_prompt": ([_prompt("   ")], "PROMPT[0] is empty"),
    "non_utf8_prompt": ([_prompt(b"\xff\xfe red")], "not valid UTF-8"),
    "wrong_dtype_seed": ([_prompt("a red circle"), _inp("SEED", np.array([[1.0]], np.float32),
                                                        "FP32")], "expects 'INT64'"),
    "wrong_dtype_prompt": ([_inp("PROMPT", np.array([[3]], np.int32), "INT32")],
                           "expects 'BYTES'"),
    "missing_prompt": ([_inp("SEED", np.array([[1]], np.int64), "INT64")], "PROMPT is required"),
    "too_large_batch": ([_prompt(*["a red circle"] * 9)], "batch-size must be <= 8"),
    "negative_seed": ([_prompt("a red circle"), _inp("SEED", np.array([[-3]], np.int64),
                                                     "INT64")], "SEED must be >= 0"),
    "k_too_large": ([_prompt("a red circle"), _inp("K", np.array([[99]], np.int32), "INT32")],
                    "K must be in [0, 16]"),
    "k_differs_in_request": ([_prompt("a", "b"), _inp("K", np.array([[1], [2]], np.int32),
                                                      "INT32")], "K must be the same"),
    "too_long_prompt": ([_prompt("a" * 100_000)], "PROMPT[0] has 100000 characters"),
    "nan_strength": ([_prompt("a red circle"),
                      _inp("STRENGTH", np.array([[np.nan]], np.float32), "FP32")],
                     "STRENGTH must be a finite number"),
    "inf_strength": ([_prompt("a red circle"),
                      _inp("STRENGTH", np.array([[np.inf]], np.float32), "FP32")],
                     "STRENGTH must be a finite number"),
    "wrong_item_shape": ([_prompt("a red circle"), _inp("SEED", np.array([[1, 2]], np.int64),
                                                        "INT64")], "SEED"),
    "negative_strength": ([_prompt("a red circle"),
                           _inp("STRENGTH", np.array([[-1.0]], np.float32), "FP32")],
                          "strength must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_infer_raises_invalid_arg_with_clear_message_then_serves_next_request(server, case):
    inputs, message = BAD[case]
    with grpcclient.InferenceServerClient(server.url) as c:
        with pytest.raises(InferenceServerException) as e:
            c.infer("imageragturbo", inputs)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
        assert message in e.value.message()
        ok = c.infer("imageragturbo", [_prompt("a red circle"),
                                       _inp("SEED", np.array([[1]], np.int64), "INT64")])
        assert ok.as_numpy("IMAGE").shape == (1, 64, 64, 3)


def test_sdk_raises_typed_errors_for_invalid_input_and_deadline(client, server):
    with pytest.raises(InvalidInputError, match="PROMPT\\[0\\] is empty") as e:
        client.generate("", seed=0)
    assert e.value.status == "INVALID_ARGUMENT"
    with ImageRAGTurboClient(server.url, retry=RetryPolicy(max_attempts=1)) as c:
        with pytest.raises(DeadlineExceededError):
            c.generate_batch(PROMPTS * 2, seeds=0, timeout=0.001)
    assert client.generate(PROMPTS[0], seed=0).array.shape == (64, 64, 3)


def _ensemble_successes(url: str) -> int:
    from imageragturbo.serving.bench import _model_stats

    return _model_stats(url)["imageragturbo"]["count"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_request_past_its_deadline_is_abandoned_not_cancelled_on_the_server(server, kind):
    """The SDK keeps the caller's deadline itself: DeadlineExceededError on time, while the
    request runs to completion on the server (its success is counted there), because a gRPC
    cancellation can crash tritonserver 2.51 or leave an inference in flight for good."""
    import time

    before = _ensemble_successes(server.url)
    t0 = time.perf_counter()
    if kind == "sync":
        with ImageRAGTurboClient(server.url, retry=RetryPolicy(max_attempts=1)) as c:
            with pytest.raises(DeadlineExceededError, match="abandoned"):
                c.generate_batch(PROMPTS * 2, seeds=0, timeout=0.001)
    else:
        async def late():
            async with AsyncImageRAGTurboClient(server.url,
                                                retry=RetryPolicy(max_attempts=1)) as ac:
                with pytest.raises(DeadlineExceededError, match="abandoned"):
                    await ac.generate_batch(PROMPTS * 2, seeds=0, timeout=0.001)
        asyncio.run(late())
    assert time.perf_counter() - t0 < 30
    deadline = time.monotonic() + 30
    while _ensemble_successes(server.url) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ensemble_successes(server.url) == before + 1


def test_health_checks_report_live_and_ready(client, server):
    assert client.is_live() and client.is_ready()
    assert server.url.startswith("127.0.0.1:")

    async def check():
        async with AsyncImageRAGTurboClient(server.url) as ac:
            return await ac.is_live(), await ac.is_ready()

    assert asyncio.run(check()) == (True, True)




def test_the_served_neighbour_pool_defaults_to_the_pool_the_model_was_trained_with(assets,
                                                                                  tmp_path):
    """A model trained with ``--start-pool P`` carries "pool": P in its export's
    ``neighbour_start``; ``serve`` then draws each request's neighbours from the top K x P by
    default (as the model learnt), ``--neighbour-pool`` overrides it, and a model without one
    (or served with slerp, which starts from z_T) keeps the top K."""
    import json
    import shutil

    from imageragturbo.serving.repository import RenderOptions

    def pool(export, name, opts=None):
        out = render_repository(export, assets["index"], tmp_path / name, "cpu", opts)
        text = (out / "retriever" / "config.pbtxt").read_text()
        return int(re.search(r'key: "pool" value: \{ string_value: "(\d+)" \}', text)[1])

    pooled = tmp_path / "pooled-export"
    shutil.copytree(assets["start"], pooled)
    m = json.loads((pooled / "manifest.json").read_text())
    m["neighbour_start"]["pool"] = 4
    (pooled / "manifest.json").write_text(json.dumps(m))
    assert pool(pooled, "a") == 4
    assert pool(pooled, "b", RenderOptions(neighbour_pool=1)) == 1
    assert pool(pooled, "c", RenderOptions(injection="slerp")) == 1
    assert pool(assets["start"], "d") == 1 and pool(assets["adapter"], "e") == 1
    with pytest.raises(ValueError, match="neighbour pool must be positive"):
        RenderOptions(neighbour_pool=0)
