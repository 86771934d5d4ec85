"""The Node.js client (client-node/) on the session's real tritonserver: ``npm ci`` (again only
when package-lock.json changed), ``npm run build`` (Triton's gRPC descriptors from this
environment's tritonclient), then its node:test suites: without a server (wire format, typed
errors, backoff; retries, message caps and TLS against scripted gRPC servers), and against the
served ensemble, where its images must equal the Python SDK's for the same prompts and seeds
(within 2/255, the same neighbours) and the contract's errors and deadline must come back
typed. Skipped only where node or npm is missing."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import PIXEL_BOUND, PROMPTS, _maxdiff

NODE_DIR = Path(__file__).resolve().parents[1] / "client-node"


@pytest.fixture(scope="module")
def node():
    """The node executable, with client-node's packages installed and its descriptors built."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the Node.js client's tests (client-node/)")
    lock = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    stamp = NODE_DIR / "node_modules" / ".imageragturbo-lock-sha256"
    if not stamp.exists() or stamp.read_text() != lock:
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        stamp.write_text(lock)
    out = subprocess.run([node, "scripts/build.js"], cwd=NODE_DIR, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    return node


def _node_test(node: str, files: list[str], env: dict[str, str] | None = None,
               skips: int = 0) -> str:
    """Run node:test on ``files`` (TAP report); fail with its report unless every test passed
    and no more than ``skips`` were skipped."""
    out = subprocess.run([node, "--test", "--test-concurrency=1", "--test-reporter=tap",
                          *files], cwd=NODE_DIR, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-12000:]
    counts = dict(re.findall(r"^# (pass|fail|skipped) (\d+)$", report, re.M))
    assert int(counts.get("pass", 0)) > 0, report[-4000:]
    assert counts.get("fail") == "0" and int(counts.get("skipped", -1)) in range(skips + 1), \
        report[-4000:]
    return report


def test_node_client_without_a_server(node):
    """Unit tests; retries, message caps and TLS against scripted gRPC servers (the TLS test
    needs the openssl command for its certificates)."""
    _node_test(node, ["test/unit.test.js", "test/retry.test.js", "test/tls.test.js"],
               skips=0 if shutil.which("openssl") else 1)


# The Python SDK's requests that the Node client repeats: a retrieval with the H-adapter, a
# batch with one STRENGTH per prompt, no retrieval, and a seed beyond 2^53 (int64 on the wire).
CASES = [
    dict(prompts=PROMPTS[1:2], seeds=[11], k=3, strength=None),
    dict(prompts=PROMPTS, seeds=[1, 2, 3], k=2, strength=[0.5, 1.0, 2.0]),
    dict(prompts=PROMPTS[:1], seeds=[7], k=0, strength=None),
    dict(prompts=PROMPTS[2:], seeds=[2**62 + 12345], k=1, strength=None),
]


def test_node_client_on_the_served_ensemble_matches_the_python_sdk(node, server, client,
                                                                   tmp_path):
    cases, arrays = [], []
    for c in CASES:
        rs = client.generate_batch(c["prompts"], seeds=c["seeds"], k=c["k"],
                                   strength=c["strength"])
        arrays.append([r.array for r in rs])
        cases.append({**c, "seeds": [str(s) for s in c["seeds"]], "results": [
            {"width": r.array.shape[1], "height": r.array.shape[0], "seed": str(r.seed),
             "rgb": base64.b64encode(r.array.tobytes()).decode(),
             "neighbours": [{"id": n.id, "caption": n.caption, "score": n.score}
                            for n in r.neighbours]} for r in rs]})
    assert len(cases[0]["results"][0]["neighbours"]) == 3
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"cases": cases}))
    out = tmp_path / "node-out"
    out.mkdir()
    _node_test(node, ["test/server.test.js"],
               {"IRT_GRPC_URL": server.url, "IRT_REFERENCE": str(ref), "IRT_OUT": str(out)})
    # the PNGs the Node client wrote decode (PIL) to the Python SDK's pixels
    for i, images in enumerate(arrays):
        for j, want in enumerate(images):
            got = np.asarray(Image.open(out / f"case{i}-{j}.png").convert("RGB"))
            assert got.shape == want.shape and _maxdiff(got, want) <= PIXEL_BOUND, (i, j)
