"""The slim SDK distribution, ``imageragturbo-client`` (client/pyproject.toml; it installs the
SDK as ``imageragturbo_client``): its version and dependencies are the main distribution's;
built as a wheel from a copy of client/ and installed with requirements.lock's versions into a
clean venv, it brings none of the model stack (no scipy, matplotlib, fonttools, torch, model
weights, nothing under ``imageragturbo/``), and from that venv it gets the same image, neighbours
and typed error from the session's real tritonserver as the in-repo SDK. Installed beside the
main distribution's wheel, the two share no file: each package comes from its own, and
uninstalling either leaves the other whole."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from serving_support import PROMPTS

import imageragturbo

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# Distributions an application must not get with the SDK (the 433 MB).
MODEL_STACK = {"imageragturbo", "scipy", "matplotlib", "fonttools", "contourpy", "kiwisolver",
               "torch", "onnxruntime", "transformers", "hnswlib", "nvidia-pytriton"}
# du of the slim venv's site-packages, locked versions, no pip: 156 MiB measured (2026-12-04);
# the bound leaves room for another filesystem's block size, not for another dependency.
MAX_SITE_PACKAGES_MIB = 185


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", LOCK.read_text(), re.M)
    return {_norm(n): v for n, v in pins}


def test_slim_sdk_has_the_main_distributions_version_and_client_extra():
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())
    slim = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    assert slim["project"]["name"] == "imageragturbo-client"
    assert slim["project"]["version"] == main["project"]["version"] == imageragturbo.__version__
    assert slim["project"]["dependencies"] == main["project"]["optional-dependencies"]["client"]
    assert slim["tool"]["setuptools"] == {"packages": ["imageragturbo_client"],
                                          "package-dir": {"imageragturbo_client": "."}}
    # The main distribution still installs the same folder as imageragturbo.client.
    assert main["tool"]["setuptools"]["package-dir"]["imageragturbo.client"] == "client"


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory):
    """A clean venv (no pip, nothing else) holding the slim SDK's wheel, built offline with this
    environment's setuptools from a copy of client/ (setuptools builds in the source tree: the
    checkout stays as it was), and its dependencies at requirements.lock's versions (from the
    index, or pip's cache: the same packages the main install fetched)."""
    tmp = tmp_path_factory.mktemp("slim-sdk")
    src = tmp / "src"
    shutil.copytree(ROOT / "client", src,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp / "dist"), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("imageragturbo_client-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    r = subprocess.run([*pip, "--python", str(python), "install", "-q", "-c", str(LOCK),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (site,) = venv.glob("lib/python3*/site-packages")
    return {"python": python, "site": site, "wheel": wheel, "tmp": tmp}


SIDE_BY_SIDE = """
import importlib.metadata as md, importlib.util, json
import imageragturbo, imageragturbo.defaults
print(json.dumps({
    "version": imageragturbo.__version__,
    "main": imageragturbo.__file__,
    "client": importlib.util.find_spec("imageragturbo.client").origin,
    "slim": importlib.util.find_spec("imageragturbo_client").origin,
    "files": {d: [str(f) for f in md.files(d)] for d in ("imageragturbo", "imageragturbo-client")},
}))
"""


def test_slim_and_main_wheels_side_by_side_share_no_file_and_uninstall_cleanly(slim_venv,
                                                                              tmp_path):
    """Both wheels, without dependencies (only what imports with the standard library is
    imported), in one venv. (The checkout installed editable beside the slim wheel was checked
    by hand: docs/environment.md, "The slim SDK".)"""
    pip = [sys.executable, "-m", "pip"]
    had_build = (ROOT / "build").exists()
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if not had_build:  # setuptools builds in the source tree: leave it as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (main_wheel,) = tmp_path.glob("imageragturbo-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    (site,) = venv.glob("lib/python3*/site-packages")
    target = [*pip, "--python", str(python)]

    def install(*wheels):
        r = subprocess.run([*target, "install", "-q", "--no-deps", *map(str, wheels)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    def uninstall(name):
        r = subprocess.run([*target, "uninstall", "-y", "-q", name], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    install(main_wheel, slim_venv["wheel"])
    info = _run(python, SIDE_BY_SIDE, tmp_path)
    assert info["version"] == imageragturbo.__version__
    assert info["main"] == str(site / "imageragturbo" / "__init__.py")
    assert info["client"] == str(site / "imageragturbo" / "client" / "__init__.py")
    assert info["slim"] == str(site / "imageragturbo_client" / "__init__.py")
    main_files, slim_files = (set(info["files"][d]) for d in ("imageragturbo",
                                                               "imageragturbo-client"))
    assert not main_files & slim_files, main_files & slim_files
    sdk = ("__init__.py", "contract.py", "errors.py", "sdk.py")
    for gone, wheel, left in (("imageragturbo-client", slim_venv["wheel"], "imageragturbo/client"),
                              ("imageragturbo", main_wheel, "imageragturbo_client")):
        uninstall(gone)
        assert all((site / left / f).is_file() for f in sdk), (gone, left)
        install(wheel)


INSPECT = """
import importlib.metadata as md, importlib.util, json
import imageragturbo_client
print(json.dumps({
    "dists": {d.metadata["Name"]: d.version for d in md.distributions()},
    "file": imageragturbo_client.__file__,
    "main_package": importlib.util.find_spec("imageragturbo") is not None,
}))
"""


def _run(python: Path, code: str, cwd: Path, *args: str) -> dict:
    """Run ``code`` in the slim venv, isolated (-I: no PYTHONPATH, no user site, not the
    checkout's folder on sys.path) and outside the checkout."""
    r = subprocess.run([str(python), "-I", "-c", code, *args], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_slim_sdk_installs_locked_versions_without_the_model_stack(slim_venv):
    import zipfile

    names = zipfile.ZipFile(slim_venv["wheel"]).namelist()
    assert all(n.split("/")[0].startswith("imageragturbo_client") for n in names), names
    info = _run(slim_venv["python"], INSPECT, slim_venv["tmp"])
    assert Path(info["file"]).is_relative_to(slim_venv["site"]), info["file"]
    assert not info["main_package"]  # nothing of ours but imageragturbo_client
    dists = {_norm(n): v for n, v in info["dists"].items()}
    assert dists.pop("imageragturbo-client") == imageragturbo.__version__
    assert {"tritonclient", "grpcio", "numpy", "pillow"} <= set(dists), dists
    assert not MODEL_STACK & set(dists), MODEL_STACK & set(dists)
    locked = _locked()
    off_lock = {n: v for n, v in dists.items() if locked.get(n) != v}
    assert not off_lock, f"not at requirements.lock's versions: {off_lock}"
    assert not list(slim_venv["site"].rglob("*.safetensors"))
    du = subprocess.run(["du", "-sk", str(slim_venv["site"])], capture_output=True, text=True,
                        check=True)
    mib = int(du.stdout.split()[0]) / 1024
    assert mib < MAX_SITE_PACKAGES_MIB, f"site-packages: {mib:.1f} MiB"


GENERATE = """
import json, sys
import numpy as np
import imageragturbo_client as sdk
url, prompt, seed, k, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with sdk.ImageRAGTurboClient(url, timeout=60) as c:
    r = c.generate(prompt, seed=seed, k=k)
    np.save(out, r.array)
    try:
        c.generate("", seed=0)
        error = None
    except sdk.InvalidInputError as e:
        error = [type(e).__name__, e.status, e.message]
print(json.dumps({"seed": r.seed, "error": error,
                  "neighbours": [[n.id, n.caption, n.score] for n in r.neighbours]}))
"""


def test_slim_sdk_in_a_clean_venv_gets_the_in_repo_sdks_image_from_the_server(slim_venv,
                                                                              client, server):
    prompt, seed, k = PROMPTS[2], 41, 2
    out = slim_venv["tmp"] / "slim.npy"
    got = _run(slim_venv["python"], GENERATE, slim_venv["tmp"], server.url, prompt, str(seed),
               str(k), str(out))
    ref = client.generate(prompt, seed=seed, k=k)
    slim = np.load(out)
    assert slim.shape == ref.array.shape == (64, 64, 3) and slim.dtype == np.uint8
    assert np.array_equal(slim, ref.array)
    assert got["seed"] == ref.seed == seed
    assert got["neighbours"] == [[n.id, n.caption, n.score] for n in ref.neighbours]
    assert len(got["neighbours"]) == k
    assert got["error"][:2] == ["InvalidInputError", "INVALID_ARGUMENT"], got["error"]
    assert "PROMPT[0] is empty" in got["error"][2]
