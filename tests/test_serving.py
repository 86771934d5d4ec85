"""The served ensemble on a real tritonserver (nvidia-pytriton's, cpu profile): started once
per session on free ports for a random-weight tiny export and a 40-item ShapesWorld index, and
called with plain tritonclient and with the SDK. Served images must equal the in-process ONNX
Runtime pipeline's for the same seed (within 2/255), with and without retrieval, through the
H-adapter graph and through the slerp step; bad requests get INVALID_ARG with a clear message
and the server keeps serving. Also: both repository profiles render, the gpu one names the
onnxruntime backend / TensorRT FP16 / KIND_GPU, and the wiring is identical."""

from __future__ import annotations

import asyncio
import subprocess
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from imageragturbo import shapesworld as sw
from imageragturbo.cli import main
from imageragturbo.client import (
    AsyncImageRAGTurboClient,
    DeadlineExceededError,
    ImageRAGTurboClient,
    InvalidInputError,
    RetryPolicy,
)
from imageragturbo.export import onnx_export as oe
from imageragturbo.export import runtime
from imageragturbo.model import family, load_retrieval_encoder
from imageragturbo.model.h_space import HAdapter
from imageragturbo.retriever import build_index, shapesworld_pairs
from imageragturbo.serving.repository import load_configs, render_repository, wiring
from imageragturbo.serving.server import TritonServer

PIXEL_BOUND = 2  # max abs difference served vs in-process, in uint8 steps (2/255)
PROMPTS = ["a red circle in the top left corner", "two blue squares",
           "a small green triangle left of a yellow circle"]


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
    adapter = HAdapter(oe.fresh_adapter_config(channels))
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


def in_process(pipes, name, prompts, seeds, k=0, strength=None):
    pipe, index = pipes[name]
    if k == 0:
        return pipe.generate(prompts, seeds), None
    _, pooled = pipe.encode_prompt(prompts)
    h_retr, scores, nb = runtime.retrieve(index, pooled, k)
    lam, w = runtime.retrieval_controls(scores, strength, pipe.has_adapter)
    return pipe.generate(prompts, seeds, h_retr=h_retr, lam=lam, slerp_w=w), nb


def _inp(name, array, dtype):
    x = grpcclient.InferInput(name, list(array.shape), dtype)
    x.set_data_from_numpy(array)
    return x


def _prompt(*texts):
    return _inp("PROMPT", np.array([t.encode() if isinstance(t, str) else t for t in texts],
                                   dtype=np.object_).reshape(-1, 1), "BYTES")


def _maxdiff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


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
    becomes the python slerp step (paper Eq. 3); the wiring stays the adapter rendering's."""
    from imageragturbo.serving.repository import RenderOptions

    adapter = render_repository(assets["adapter"], assets["index"], tmp_path / "a", "cpu")
    slerp = render_repository(assets["adapter"], assets["index"], tmp_path / "s", "cpu",
                              RenderOptions(injection="slerp"))
    assert "onnx" in (adapter / "h_adapter" / "config.pbtxt").read_text().lower() or (
        adapter / "h_adapter" / "1" / "model.onnx").exists()
    assert not (slerp / "h_adapter" / "1" / "model.onnx").exists()
    assert "slerp" in (slerp / "h_adapter" / "1" / "model.py").read_text()
    assert 'string_value: "false"' in (slerp / "retriever" / "config.pbtxt").read_text()
    assert wiring(adapter)["imageragturbo"] == wiring(slerp)["imageragturbo"]
    with pytest.raises(ValueError, match="injection"):
        RenderOptions(injection="sometimes")


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


def test_health_checks_report_live_and_ready(client, server):
    assert client.is_live() and client.is_ready()
    assert server.url.startswith("127.0.0.1:")

    async def check():
        async with AsyncImageRAGTurboClient(server.url) as ac:
            return await ac.is_live(), await ac.is_ready()

    assert asyncio.run(check()) == (True, True)


def _ensemble_counters(server) -> dict[str, float]:
    """nv_inference_request_{success,failure} of the ensemble (failures summed over their
    reasons), scraped from /metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    out = {}
    for kind in ("success", "failure"):
        # one line per failure reason (BACKEND, REJECTED, ...): the sum is the count
        found = re.findall(rf'^nv_inference_request_{kind}\{{[^}}]*model="imageragturbo"'
                           r'[^}]*\} ([0-9.e+]+)$', text, re.M)
        out[kind] = sum(float(x) for x in found)
    return out


def test_sdk_does_not_retry_invalid_argument(server, client):
    """A refused request reaches the server once: one SDK call moves the ensemble's failure
    counter exactly as much as one plain tritonclient request does (UNAVAILABLE alone is
    retried; the counter may move by more than one per refused request)."""
    before = _ensemble_counters(server)["failure"]
    with grpcclient.InferenceServerClient(server.url) as c:
        with pytest.raises(InferenceServerException):
            c.infer("imageragturbo", [_prompt("   ")])
    one_request = _ensemble_counters(server)["failure"] - before
    assert one_request >= 1
    before = _ensemble_counters(server)["failure"]
    with pytest.raises(InvalidInputError):
        client.generate("   ", seed=1)
    assert _ensemble_counters(server)["failure"] - before == one_request


def _broken_copy(src, dst, name):
    """A copy of ``src`` (a folder) whose file ``name`` has one byte changed."""
    import shutil

    shutil.copytree(src, dst)
    f = dst / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("broken", ["index", "graph"])
def test_server_with_a_broken_index_or_graph_never_reports_ready(assets, tmp_path, broken):
    """A changed byte in the index's H features (the retriever checks the manifest's sha256)
    or a truncated ONNX graph: the server does not become ready, and says why in its log."""
    from imageragturbo.serving.server import ServerError

    index = assets["index"]
    if broken == "index":
        index = _broken_copy(assets["index"], tmp_path / "index", "h.f16.npy")
    repo = render_repository(assets["adapter"], index, tmp_path / "repo", "cpu", link="copy")
    if broken == "graph":  # broken after rendering (rendering itself checks the manifest)
        graph = repo / "unet_decoder" / "1" / "model.onnx"
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    s = TritonServer(repo, log_path=tmp_path / "server.log", cache=assets["root"] / "cache")
    s.start()
    try:
        with pytest.raises(ServerError):
            s.wait_ready(timeout=60, progress=False)
        assert not s.is_ready()
    finally:
        s.stop()
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert ("sha256" in log) if broken == "index" else ("unet_decoder" in log)


def test_prometheus_metrics_count_ensemble_successes_and_failures(server, client):
    """Triton's metrics endpoint is on, bound to the server's host, and the ensemble's success
    and failure counters move with served and refused requests."""
    assert server.metrics_url.startswith("http://127.0.0.1:")
    before = _ensemble_counters(server)
    client.generate("a red star", seed=1, k=1)
    with pytest.raises(InvalidInputError):
        client.generate("   ", seed=1)
    after = _ensemble_counters(server)
    assert after["success"] >= before["success"] + 1
    assert after["failure"] >= before["failure"] + 1


def test_cli_generate_url_writes_png_through_the_server(server, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", "--url", server.url, "a red circle", "--seed", "3", "--k", "2",
                 "-o", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    assert '"neighbours"' in capsys.readouterr().out


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate, made
    with the openssl command for these tests."""
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=imageragturbo-test-ca")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *ext)
    return {k: str(d / k) for k in ("ca.crt", "server.crt", "server.key", "client.crt",
                                    "client.key")}


def _tls_server(assets, tmp_path, certs, mutual: bool):
    repo = render_repository(assets["adapter"], assets["index"], tmp_path / "repo", "cpu")
    s = TritonServer(repo, log_path=tmp_path / "tls.log", cache=assets["root"] / "cache",
                     tls_cert=certs["server.crt"], tls_key=certs["server.key"],
                     tls_ca=certs["ca.crt"] if mutual else None)
    s.start()
    s.wait_ready(timeout=120, progress=False)
    return s


def test_tls_serves_a_client_with_the_ca_and_refuses_plaintext(assets, tmp_path, certs):
    from imageragturbo.client import ImageRAGTurboError

    s = _tls_server(assets, tmp_path, certs, mutual=False)
    try:
        with ImageRAGTurboClient(s.url, timeout=60, root_certificates=certs["ca.crt"]) as c:
            assert c.generate(PROMPTS[0], seed=1, k=1).array.shape[2] == 3
        with ImageRAGTurboClient(s.url, timeout=10, retry=RetryPolicy(max_attempts=1)) as c:
            with pytest.raises(ImageRAGTurboError):  # plaintext to a TLS server: typed
                c.generate(PROMPTS[0], seed=1, k=1)
    finally:
        assert s.stop() == 0


def test_mutual_tls_refuses_a_client_without_a_certificate(assets, tmp_path, certs):
    from imageragturbo.client import ImageRAGTurboError

    s = _tls_server(assets, tmp_path, certs, mutual=True)
    try:
        with ImageRAGTurboClient(s.url, timeout=60, root_certificates=certs["ca.crt"],
                                 private_key=certs["client.key"],
                                 certificate_chain=certs["client.crt"]) as c:
            assert c.generate(PROMPTS[0], seed=1, k=1).array.shape[2] == 3
        with ImageRAGTurboClient(s.url, timeout=10, root_certificates=certs["ca.crt"],
                                 retry=RetryPolicy(max_attempts=1)) as c:
            with pytest.raises(ImageRAGTurboError):
                c.generate(PROMPTS[0], seed=1, k=1)
    finally:
        assert s.stop() == 0


def test_tls_options_are_checked_before_the_server_starts(tmp_path):
    from imageragturbo.serving.server import ServerError

    with pytest.raises(ServerError, match="both a certificate"):
        TritonServer(tmp_path, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")


# ----------------------------------------------------------------------------- overload


@pytest.mark.parametrize("case", ["queue_full", "queue_timeout"])
def test_overload_gets_a_fast_typed_error_not_a_timeout(assets, tmp_path, case):
    """A full queue (max_queue_size 1) or a queue wait past its timeout (2 ms): the requests
    that do not fit are refused within a second with OverloadedError / QueueTimeoutError
    (both UNAVAILABLE, so the SDK backs off and retries them), the rest are served."""
    from imageragturbo.client import OverloadedError, QueueTimeoutError
    from imageragturbo.serving.repository import RenderOptions

    opts = (RenderOptions(max_queue_size=1, max_batch_size=1, queue_delay_us=0)
            if case == "queue_full" else
            RenderOptions(max_batch_size=1, queue_delay_us=0, queue_timeout_us=2000))
    expected = OverloadedError if case == "queue_full" else QueueTimeoutError
    repo = render_repository(assets["adapter"], assets["index"], tmp_path / "repo", "cpu", opts)
    s = TritonServer(repo, log_path=tmp_path / "ov.log", cache=assets["root"] / "cache")
    s.start()

    async def burst():
        async with AsyncImageRAGTurboClient(s.url, timeout=60,
                                            retry=RetryPolicy(max_attempts=1)) as c:
            async def one(i):
                t0 = time.perf_counter()
                try:
                    await c.generate(PROMPTS[i % 3], seed=i, k=1)
                    return None, time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - what comes back is the subject
                    return e, time.perf_counter() - t0
            return await asyncio.gather(*(one(i) for i in range(24)))

    try:
        s.wait_ready(timeout=120, progress=False)
        results = asyncio.run(burst())
    finally:
        assert s.stop() == 0
    refused = [(e, t) for e, t in results if e is not None]
    assert refused and len(refused) < 24
    assert all(type(e) is expected for e, _ in refused), {type(e).__name__ for e, _ in refused}
    assert max(t for _, t in refused) < 1.0


def test_a_short_soak_gets_every_answer_right_and_reads_every_stubs_memory(server):
    """`bench soak` in small: 120 mixed requests at concurrency 8, every fifth invalid: every
    invalid one INVALID_ARGUMENT, every valid one an image, nothing else; the resident memory
    of tritonserver and of all its Python-backend stubs is read before and after."""
    from imageragturbo.serving.soak import soak

    res = soak(server, requests=120, concurrency=8, invalid_every=5, warmup=8)
    assert res["outcomes"] == {"image": 96, "INVALID_ARGUMENT": 24}, res["unexpected"]
    assert res["unexpected_count"] == 0
    stubs = [k for k in res["rss_kb_end"] if k.startswith("stub:")]
    assert "tritonserver" in res["rss_kb_end"] and len(stubs) >= 8, res["rss_kb_end"]
    assert all(v > 0 for v in res["rss_kb_end"].values())
    assert res["p50_ms"] > 0 and res["max_rss_growth_percent"] is not None
