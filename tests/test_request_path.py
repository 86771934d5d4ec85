"""The request path needs no torch: a deployment installs the ``serve`` extra (no torch) and
must be able to prepare an existing export and index, render the model repository, and run
every Python backend. Checked in a subprocess where importing torch (or the training code)
raises, and statically: every distribution the request path imports is in the serve extra."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

# Modules and files a served request (and `serve` with an existing export and index) runs.
REQUEST_MODULES = [
    "imageragturbo.defaults", "imageragturbo.checksums", "imageragturbo.commands.main",
    "imageragturbo.commands.assets", "imageragturbo.serving.repository",
    "imageragturbo.serving.server", "imageragturbo.commands.serve", "imageragturbo.serving.demo",
    "imageragturbo.serving.bench", "imageragturbo.runtime", "imageragturbo.runtime.pipeline",
    "imageragturbo.runtime.request", "imageragturbo.runtime.manifest",
    "imageragturbo.commands.generate", "imageragturbo.retriever", "imageragturbo.client",
]
REQUEST_FILES = [
    "imageragturbo/defaults.py", "imageragturbo/checksums.py",
    "imageragturbo/commands/generate.py",
    "imageragturbo/serving/repository.py", "imageragturbo/serving/server.py",
    "imageragturbo/runtime/__init__.py", "imageragturbo/runtime/pipeline.py",
    "imageragturbo/runtime/request.py", "imageragturbo/runtime/manifest.py",
    "imageragturbo/runtime/device.py",
    "retriever/__init__.py", "retriever/index.py",
    "client/__init__.py", "client/sdk.py", "client/errors.py",
    *[str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("model_repository/*/1/model.py"))],
]

CHILD = r'''
import importlib, importlib.util, json, sys, types

# As if torch, the training and the export code were not installed: importing them raises, and probes
# (importlib.util.find_spec, which transformers uses) find nothing.
for name in ("torch", "imageragturbo.training", "imageragturbo.export"):
    sys.modules[name] = None
args = json.loads(sys.argv[1])
for m in args["modules"]:
    importlib.import_module(m)
# the Triton Python backends, with a stand-in for Triton's own utility module
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
for i, path in enumerate(args["backends"]):
    spec = importlib.util.spec_from_file_location(f"backend_{i}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
# what `serve` does with an existing export and index, then a request in process
from pathlib import Path
from imageragturbo.commands.assets import prepare
from imageragturbo.serving.repository import render_repository
from imageragturbo import runtime
a = prepare(args["model"], Path(args["export"]), Path(args["index"]), quiet=True)
render_repository(a.export_dir, a.index_dir, Path(args["out"]), "cpu")
pipe = runtime.OnnxPipeline(a.export_dir, threads=1)
index = runtime.load_index(a.index_dir, int(pipe.manifest["text_dim"]), pipe.h_shape)
_, pooled = pipe.encode_prompt(["a red star"])
h, scores, _ = runtime.retrieve(index, pooled, 2)
lam, w = runtime.retrieval_controls(scores, None, pipe.has_adapter)
img = pipe.generate(["a red star"], [0], h_retr=h, lam=lam, slerp_w=w)
assert img.shape[0] == 1 and img.dtype.name == "uint8"
print("served without torch")
'''


def test_serving_an_existing_export_and_index_imports_no_torch(assets, tmp_path):
    """The session's model folder, adapter export and index (conftest's ``assets``)."""
    args = {"modules": REQUEST_MODULES,
            "backends": [str(ROOT / f) for f in REQUEST_FILES if f.startswith("model_repo")],
            "model": str(assets["model"]), "export": str(assets["adapter"]),
            "index": str(assets["index"]), "out": str(tmp_path / "repo")}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("served without torch")
    assert (tmp_path / "repo" / "imageragturbo" / "config.pbtxt").is_file()


def _top_level_imports(path: Path) -> set[str]:
    """Top-level package names a file imports, except optional ones (inside a ``try`` that
    catches ImportError, e.g. pyarrow for Parquet pairs)."""
    tree = ast.parse(path.read_text())
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                               "ModuleNotFoundError")
                for h in node.handlers):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _extra_closure(extra: str) -> set[str]:
    """Distribution names (normalised) the ``extra`` installs by itself, extras expanded."""
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    out, todo = set(), [extra]
    for req in project["dependencies"]:
        out.add(re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-"))
    while todo:
        for req in extras[todo.pop()]:
            m = re.match(r"imageragturbo\[([^\]]+)\]", req)
            if m:
                todo += m.group(1).split(",")
                continue
            out.add(re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return out


def test_serve_extra_lists_every_distribution_the_request_path_imports():
    from importlib.metadata import packages_distributions

    provided = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    needed = {}
    for f in REQUEST_FILES:
        for top in _top_level_imports(ROOT / f):
            if top in stdlib or top in ("imageragturbo", "triton_python_backend_utils"):
                continue
            dists = provided.get(top)
            assert dists, f"{f} imports {top!r}, which no installed distribution provides"
            needed.setdefault(dists[0].lower().replace("_", "-"), set()).add(f)
    missing = {d: sorted(fs) for d, fs in needed.items() if d not in _extra_closure("serve")}
    assert not missing, f"the serve extra lacks {missing}"
    assert "torch" not in needed


def test_the_wheel_carries_what_serve_needs(tmp_path):
    """A deployment installs the wheel, not the checkout: it must hold the model repository
    source (templates, backends), the shipped weights with the trained adapter, and the
    request path's modules."""
    import shutil
    import zipfile

    had_build = (ROOT / "build").exists()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if not had_build:  # setuptools builds in the source tree: leave it as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("imageragturbo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = ["imageragturbo/model_repository/dynamic_batching.pbtxt.in",
            "imageragturbo/model_repository/onnx_stage/config.gpu.pbtxt.in",
            "imageragturbo/model_repository/preprocess/1/model.py",
            "imageragturbo/model_repository/retriever/1/model.py",
            "imageragturbo/weights/tiny-shapes/h_adapter/model.safetensors",
            "imageragturbo/weights/tiny-shapes/unet_lora/lora.safetensors",
            "imageragturbo/runtime/pipeline.py", "imageragturbo/defaults.py",
            "imageragturbo/commands/main.py"]
    assert not [w for w in want if w not in names], [w for w in want if w not in names]
