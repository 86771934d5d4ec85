"""The stage contract (client/contract.py) is the one written form of the five stages: it
imports nothing outside the standard library (export and training code import it without the
SDK's dependencies), its chain routes the stages as documented, and the rendered ensemble's
steps, inputs and outputs, and the Python models' tensors, are the contract's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imageragturbo.client import contract as C


def test_the_contract_imports_only_the_standard_library():
    code = ("import json, sys\n"
            "before = set(sys.modules)\n"
            "import imageragturbo.client.contract\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout)
    ours = {"imageragturbo", "imageragturbo.client", "imageragturbo.client.contract"}
    foreign = [m for m in loaded if m not in ours
               and m.split(".")[0] not in sys.stdlib_module_names]
    assert not foreign, foreign
    assert "numpy" not in loaded and not any(m.startswith("tritonclient") for m in loaded)
    assert "imageragturbo.client.sdk" not in loaded   # the SDK is not run to get the names


def test_the_chain_routes_each_value_to_the_stages_that_read_it():
    calls = []

    def run(stage, *args):
        calls.append((stage, C.named(stage, args, 2)))
        return [f"{stage}.{o}" for o in C.stage_outputs(stage, 2)]

    image, z0 = C.one_step(run, "z", "t", ids="ids", h_retr="hr", lam="l")
    assert [s for s, _ in calls] == ["text_encoder", "unet_encoder", "h_adapter",
                                     "unet_decoder", "vae_decoder"]
    dec = calls[3][1]
    assert dec == {"h": "h_adapter.h", "temb": "unet_encoder.temb",
                   "skip_0": "unet_encoder.skip_0", "skip_1": "unet_encoder.skip_1",
                   "encoder_hidden_states": "text_encoder.last_hidden_state",
                   "sample": "z", "timestep": "t"}
    assert (image, z0) == ("vae_decoder.image", "unet_decoder.z0")
    calls.clear()
    C.one_step(run, "z", "t", ehs="e", h_retr="hr", slerp_w="w", decode=False)
    assert [s for s, _ in calls] == ["unet_encoder", "h_slerp", "unet_decoder"]
    assert calls[1][1] == {"h_tgt": "unet_encoder.h", "h_retr": "hr", "slerp_w": "w"}
    with pytest.raises(ValueError, match="lam"):
        C.one_step(run, "z", "t", ids="ids", h_retr="hr")
    with pytest.raises(ValueError, match="exactly one"):
        C.one_step(run, "z", "t")


def test_no_wire_tensor_changes_meaning_with_the_injection_mode():
    adapter, slerp = C.ensemble_steps(3, True), C.ensemble_steps(3, False)
    assert [s.model for s in adapter] == [s.model for s in slerp]
    step = {s.model: s for s in adapter}["h_adapter"]
    assert "lam" in step.inputs and "slerp_w" not in step.inputs
    step = {s.model: s for s in slerp}["h_adapter"]
    assert "slerp_w" in step.inputs and "lam" not in step.inputs


def test_the_rendered_ensemble_is_the_contracts(assets, tmp_path):
    """Rendered for both injection modes and parsed with Triton's own config schema."""
    from imageragturbo.runtime.manifest import load_manifest
    from imageragturbo.serving.repository import RenderOptions, render_repository, wiring

    skips = int(load_manifest(assets["adapter"])["num_skips"])
    for mode in ("adapter", "slerp"):
        repo = render_repository(assets["adapter"], assets["index"], tmp_path / mode, "cpu",
                                 RenderOptions(injection=mode))
        w = wiring(repo)
        ens = w[C.ENSEMBLE_NAME]
        want = [(s.model, s.inputs, s.outputs) for s in C.ensemble_steps(skips,
                                                                         mode == "adapter")]
        assert ens["steps"] == want, mode
        assert [i[0] for i in ens["inputs"]] == [t.name for t in C.ENSEMBLE_INPUTS]
        assert all(i[4] for i in ens["inputs"])               # every input optional
        assert [o[0] for o in ens["outputs"]] == [t.name for t in C.ENSEMBLE_OUTPUTS]
        for model, (ins, outs) in C.PYTHON_MODEL_IO.items():
            assert [i[0] for i in w[model]["inputs"]] == ins, model
            assert [o[0] for o in w[model]["outputs"]] == outs, model
        for stage in C.STAGES:
            names = C.stage_inputs(C.H_SLERP if stage == "h_adapter" and mode == "slerp"
                                   else stage, skips)
            assert [i[0] for i in w[stage]["inputs"]] == names, stage
    # a template that drifts from the contract is refused at render time
    from imageragturbo.serving import repository

    text = (repo / C.ENSEMBLE_NAME / "config.pbtxt").read_text()
    bad = tmp_path / "bad.pbtxt"
    bad.write_text(text.replace('value: "z_T"', 'value: "z_T2"', 1))
    with pytest.raises(ValueError, match="differs from the stage contract"):
        repository.check_ensemble(bad, skips, False)


# ----------------------------------------------------------------------------- the backends

BACKENDS = sorted((Path(__file__).resolve().parents[1] / "model_repository").glob("*/1/model.py"))


def test_backends_load_neither_the_pipeline_nor_the_index_builder():
    """A Triton stub imports its model.py (and, in initialize, what that imports lazily): the
    request path's NumPy steps and the index reader, never OnnxPipeline or the builder."""
    code = r'''
import importlib.util, json, sys, types
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
out = {}
for path in sys.argv[1:]:
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("b" + str(len(out)), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out[path] = {"has_finalize": hasattr(mod.TritonPythonModel, "finalize")}
import imageragturbo.runtime.request as r
r.load_index  # the retriever's initialize reads the index through this
import imageragturbo.retriever.index
print(json.dumps({"backends": out, "modules": sorted(sys.modules)}))
'''
    r = subprocess.run([sys.executable, "-c", code, *map(str, BACKENDS)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(info["backends"]) == 5 and all(b["has_finalize"]
                                              for b in info["backends"].values())
    unused = {"imageragturbo.runtime.pipeline", "imageragturbo.runtime.manifest",
              "imageragturbo.retriever.build", "imageragturbo.retriever.pairs", "torch",
              "transformers", "onnxruntime", "tritonclient"}
    assert not unused & set(info["modules"]), unused & set(info["modules"])


def _backend(name, monkeypatch, config):
    import importlib.util

    from backend_stub import pb_utils_stub

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils_stub())
    path = next(p for p in BACKENDS if p.parent.parent.name == name)
    spec = importlib.util.spec_from_file_location(f"{name}_backend_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.TritonPythonModel()
    m.initialize({"model_config": json.dumps(config)})
    return m


def test_the_slerp_step_reads_slerp_w_and_its_dtype_from_the_config(monkeypatch):
    """slerp_w is slerp's target weight: 1 keeps h_tgt bit for bit, any other value is
    runtime.slerp_inject's result; the output dtype is the config's."""
    import numpy as np

    from imageragturbo.runtime.request import slerp_inject

    m = _backend("h_slerp", monkeypatch,
                 {"output": [{"name": "h", "data_type": "TYPE_FP32", "dims": [2, 1, 1]}]})
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    h_retr = rng.standard_normal((3, 2, 2, 1, 1)).astype(np.float32)
    w = np.array([[1.0], [0.8], [0.0]], np.float32)
    (resp,) = m.execute([{"h_tgt": h, "h_retr": h_retr, "slerp_w": w}])
    out = resp.outputs["h"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], h[0])
    np.testing.assert_array_equal(out[1:], slerp_inject(h[1:], h_retr[1:, 0], w[1:, 0]))
    m.finalize()


def test_postprocess_writes_the_configs_dtype(monkeypatch):
    import numpy as np

    m = _backend("postprocess", monkeypatch,
                 {"output": [{"name": "IMAGE", "data_type": "TYPE_UINT8", "dims": [2, 2, 3]}]})
    (resp,) = m.execute([{"image": np.zeros((1, 3, 2, 2), np.float32)}])
    assert resp.outputs["IMAGE"].dtype == np.uint8
    assert (resp.outputs["IMAGE"] == 128).all()   # 0 in [-1, 1] -> 127.5, rounded half to even
    m.finalize()
