"""Render the Triton model repository for one ONNX export and one retrieval index.

One source (``model_repository/`` at the project root: config templates and ``model.py``
files), two profiles:

- ``gpu``: the five ONNX stages on Triton's onnxruntime backend with the TensorRT execution
  accelerator in FP16, an engine cache, KIND_GPU and model_warmup (NVIDIA's Triton container);
- ``cpu``: the same graphs run by a small Python-backend ONNX Runtime runner, since the CPU
  server here (nvidia-pytriton's tritonserver) has no onnxruntime backend.

Everything else (the ensemble, preprocess, retriever, postprocess, every tensor name, dtype
and shape, dynamic batching and queue policy) is the same text in both. The rendered folder
is self-contained: each model's ``1/`` holds what it loads (``model.onnx``, ``tokenizer/``,
``index/``), as links into the export and index (``link="symlink"``) or copies (``"copy"``,
to ship it into a container; the index is copied by ``retriever.copy_index``, which checks
every file's sha256 as it copies, so the retriever's load can check only the structure).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

from imageragturbo.client import contract as C
from imageragturbo.defaults import RERANK_CANDIDATES
from imageragturbo.runtime.manifest import load_manifest
from imageragturbo.runtime.request import served_pool

# Installed: imageragturbo/model_repository (package data); in a checkout: the top-level folder.
SOURCE = next((p for p in (Path(__file__).resolve().parents[1] / "model_repository",
                           Path(__file__).resolve().parents[2] / "model_repository")
               if (p / "dynamic_batching.pbtxt.in").exists()),
              Path(__file__).resolve().parents[2] / "model_repository")
PROFILES = ("cpu", "gpu")
# The stages where most of a request's compute is, and so where batching pays: their dynamic
# batcher waits ``queue_delay_us`` for a batch, the light steps ``light_queue_delay_us``.
HEAVY_STAGES = (C.UNET_ENCODER, C.UNET_DECODER, C.VAE_DECODER)
MARKER = ".imageragturbo-repository"  # a rendered folder; safe to replace on the next render
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
          "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


@dataclass
class RenderOptions:
    """Knobs of the rendered configs (the CLI exposes each)."""

    max_batch_size: int = 8            # per request and per dynamic batch
    # How long the dynamic batcher waits to fill a batch: of the UNet encoder, UNet decoder and
    # VAE decoder (``queue_delay_us``) and of the light steps (pre/postprocess, text encoder,
    # retriever, adapter; None: the same). 0: a batch is whatever is queued when an instance
    # frees up, which under load is a full one anyway. Measured on 2 CPU cores (README,
    # "Serving overhead"): 2000 us cost 2.6x the in-process latency at concurrency 1 (eight
    # waits); with two instances per model, 0 gives 1.4x and the in-process batch-8 throughput.
    queue_delay_us: int = 0
    light_queue_delay_us: int | None = None
    queue_timeout_us: int = 30_000_000  # a request queued longer is rejected (UNAVAILABLE)
    max_queue_size: int = 64           # queued requests per model before UNAVAILABLE
    default_k: int = 1                 # neighbours when a request sends no K
    max_k: int = 16                    # largest K a request may ask for
    max_prompt_chars: int = 2000       # longer prompts are rejected (the tokenizer keeps its
    #                                    context length anyway: 24 tokens here, SD's 77)
    threads: int = 1                   # cpu: ONNX Runtime intra-op threads per stage
    # Instances of every composing model. Two, because with one this Triton (2.51) often
    # leaves a batch queued for ~500 ms when its only instance frees up (its batcher's
    # default wait; seen on every round of 12 concurrent requests, README "Serving overhead").
    instances: int = 2
    ef: int | None = None              # hnswlib query beam (default: the index's)
    rerank: int = RERANK_CANDIDATES    # dense candidates re-ranked by the prompt's words; 0: off
    neighbour_pool: int | None = None  # > 1: the k neighbours drawn from the top k * pool by
    #                                    seed; None: the model's (its export's neighbour_start
    #                                    "pool", trained with start_pool), else 1
    # The retriever's load checks the index's structure (sizes, shapes, counts, dtypes) and maps
    # its arrays; True adds the sha256 of every file, which reads the whole index (124 GB at the
    # paper's size) in every instance before the server is ready. Digests are checked where an
    # index is published or copied, and by `imageragturbo index verify`.
    verify_index: bool = False
    trt_cache: str = "/tmp/imageragturbo-trt-cache"  # gpu: TensorRT engine cache root
    trt_workspace_bytes: int = 4 << 30  # gpu: TensorRT builder workspace
    injection: str = "adapter"         # "adapter" (the export's trained H-adapter, when it has
    #                                    one) or "slerp" (training-free, paper Eq. 3)

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError(f"max batch size must be in [1, 1024], got {self.max_batch_size}")
        if self.injection not in ("adapter", "slerp"):
            raise ValueError(f"injection must be 'adapter' or 'slerp', got {self.injection!r}")
        if not 0 <= self.default_k <= self.max_k:
            raise ValueError(f"default k must be in [0, max k={self.max_k}], got "
                             f"{self.default_k}")
        if self.light_queue_delay_us is None:
            self.light_queue_delay_us = self.queue_delay_us
        for name in ("queue_delay_us", "light_queue_delay_us", "queue_timeout_us",
                     "max_queue_size", "threads",
                     "instances", "max_prompt_chars", "rerank", "neighbour_pool"):
            if getattr(self, name) is None and name == "neighbour_pool":
                continue
            if getattr(self, name) < (0 if name in ("queue_delay_us", "light_queue_delay_us",
                                                    "threads", "rerank") else 1):
                raise ValueError(f"{name.replace('_', ' ')} must be positive, got "
                                 f"{getattr(self, name)}")


def _template(rel: str) -> Template:
    path = SOURCE / rel
    if not path.exists():
        raise FileNotFoundError(f"model repository source {path} is missing (it ships with the "
                                "project checkout: install with `pip install -e .`)")
    return Template(path.read_text())


def _dims(shape: list, reshape_scalar: bool = True) -> tuple[list[int], bool]:
    """Manifest shape (batch first, symbolic names for dynamic axes) -> Triton dims without
    the batch axis, and whether a (B,) tensor needs ``dims: [1]`` + ``reshape: []``."""
    rest = [d if isinstance(d, int) else -1 for d in shape[1:]]
    if not rest and reshape_scalar:
        return [1], True
    return rest, False


def _tensor_block(values: list[dict], indent: str = "  ") -> str:
    lines = []
    for v in values:
        dims, reshape = _dims(v["shape"])
        extra = " reshape: { shape: [ ] }" if reshape else ""
        lines.append(f'{indent}{{ name: "{v["name"]}" data_type: {DTYPES[v["dtype"]]} '
                     f'dims: [ {", ".join(map(str, dims))} ]{extra} }}')
    return ",\n".join(lines)


def _warmup_block(values: list[dict], batch_sizes: list[int]) -> str:
    entries = []
    for b in batch_sizes:
        inputs = []
        for v in values:
            dims, _ = _dims(v["shape"])
            dims = [1 if d < 0 else d for d in dims]  # one neighbour for h_retr's k axis
            inputs.append(f'    inputs {{ key: "{v["name"]}" value: {{ data_type: '
                          f'{DTYPES[v["dtype"]]} dims: [ {", ".join(map(str, dims))} ] '
                          'zero_data: true } }')
        entries.append(f'  {{\n    name: "zeros_batch_{b}"\n    batch_size: {b}\n'
                       + "\n".join(inputs) + "\n  }")
    return ",\n".join(entries)


def _place(src: Path, dst: Path, link: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = Path(os.path.abspath(src))  # not resolved: an index path is a link that is republished
    if link == "symlink":
        dst.symlink_to(src, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def render_repository(export_dir: str | Path, index_dir: str | Path, out: str | Path,
                      profile: str = "cpu", options: RenderOptions | None = None,
                      link: str = "symlink") -> Path:
    """Write the model repository for ``export_dir`` (``imageragturbo export``) and
    ``index_dir`` (``imageragturbo index build``) to ``out`` in ``profile`` (cpu or gpu).

    ``out`` is replaced if it is a previous rendering; any other non-empty folder is refused.
    Returns ``out``.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if link not in ("symlink", "copy"):
        raise ValueError(f"link must be 'symlink' or 'copy', got {link!r}")
    opt = options or RenderOptions()
    export_dir, index_dir, out = Path(export_dir), Path(index_dir), Path(out)
    m = load_manifest(export_dir)
    if not (index_dir / "manifest.json").exists():
        raise FileNotFoundError(f"no retrieval index at {index_dir} (build one with "
                                "`imageragturbo index build`)")
    if out.exists():
        if (out / MARKER).exists():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty and not a rendered model repository; "
                                  "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if link == "copy":
        # First, into the still empty folder: a copy that fails its digests leaves it empty.
        from imageragturbo.retriever import copy_index

        try:
            copy_index(index_dir, out / C.RETRIEVER / "1" / "index")
        except BaseException:
            shutil.rmtree(out / C.RETRIEVER, ignore_errors=True)
            raise

    stages = m["stages"]
    h_shape = stages[C.UNET_ENCODER]["outputs"][0]["shape"][1:]              # (C, h', w')
    img = stages[C.VAE_DECODER]["outputs"][0]["shape"]                       # (B, 3, H, W)
    skips = C.skip_names(int(m["num_skips"]))
    has_adapter = C.H_ADAPTER in stages and opt.injection == "adapter"
    start = m.get("neighbour_start") if has_adapter else None
    def batching(delay_us: int) -> str:
        return _template("dynamic_batching.pbtxt.in").substitute(
            queue_delay_us=delay_us, queue_timeout_us=opt.queue_timeout_us,
            max_queue_size=opt.max_queue_size)

    common = {
        "profile": profile, "max_batch_size": opt.max_batch_size, "instances": opt.instances,
        "dynamic_batching": batching(opt.light_queue_delay_us),
        "image_height": img[2], "image_width": img[3],
        "max_length": m["max_length"], "latent_dims": ", ".join(map(str, m["latent_shape"])),
        "latent_shape": ",".join(map(str, m["latent_shape"])), "timestep": m["timestep"],
        "default_k": opt.default_k, "max_k": opt.max_k,
        "has_adapter": "true" if has_adapter else "false",
        "max_prompt_chars": opt.max_prompt_chars, "text_dim": m["text_dim"],
        "h_dims": ", ".join(map(str, h_shape)), "h_shape": ",".join(map(str, h_shape)),
        "ef": "" if opt.ef is None else opt.ef, "rerank": opt.rerank,
        "neighbour_pool": served_pool(opt.neighbour_pool, start),
        # a neighbour-start model's start (its trained adapter only; slerp starts from z_T)
        "start_timestep": start["timestep"] if start else "",
        "start_alpha_bar": repr(float(start["alpha_bar"])) if start else "",
        "verify_index": "true" if opt.verify_index else "false",
        "injection": C.LAM if has_adapter else C.SLERP_W,
        "encoder_skip_outputs": "\n".join(
            f'      output_map {{ key: "{s}" value: "{s}" }}' for s in skips),
        "decoder_skip_inputs": "\n".join(
            f'      input_map {{ key: "{s}" value: "{s}" }}' for s in skips),
    }

    def write(model: str, text: str) -> Path:
        d = out / model
        (d / "1").mkdir(parents=True, exist_ok=True)
        (d / "config.pbtxt").write_text(text)
        return d

    write(C.ENSEMBLE_NAME, _template(f"{C.ENSEMBLE_NAME}/config.pbtxt.in").substitute(common))
    for name in C.PYTHON_MODELS:
        d = write(name, _template(f"{name}/config.pbtxt.in").substitute(common))
        shutil.copy2(SOURCE / name / "1" / "model.py", d / "1" / "model.py")
    _place(export_dir / "tokenizer", out / C.PREPROCESS / "1" / "tokenizer", link)
    if link != "copy":
        _place(index_dir, out / C.RETRIEVER / "1" / "index", link)

    stage_tpl = _template(f"onnx_stage/config.{profile}.pbtxt.in")
    # Warm-up at batch 1 and at the largest batch, in both profiles: each runner's memory
    # arena then starts at the size it will keep (in the cpu profile, warming at batch 1 only
    # let the VAE decoder's stubs grow 28% during a 2,000-request soak).
    warm_batches = [1, opt.max_batch_size] if opt.max_batch_size > 1 else [1]
    for name in C.STAGES:
        if name == C.H_ADAPTER and not has_adapter:
            d = write(name, _template(f"{C.H_SLERP}/config.pbtxt.in").substitute(common))
            shutil.copy2(SOURCE / C.H_SLERP / "1" / "model.py", d / "1" / "model.py")
            continue
        st = stages[name]
        heavy = name in HEAVY_STAGES
        d = write(name, stage_tpl.substitute(
            common, name=name, inputs=_tensor_block(st["inputs"]),
            dynamic_batching=batching(opt.queue_delay_us if heavy else opt.light_queue_delay_us),
            outputs=_tensor_block(st["outputs"]),
            threads=opt.threads, trt_cache=opt.trt_cache,
            trt_workspace_bytes=opt.trt_workspace_bytes,
            warmup=_warmup_block(st["inputs"], warm_batches)))
        for f in st["files"]:  # the graph, then any external-data file under its own name
            target = "model.onnx" if f == st["file"] else f
            _place(export_dir / f, d / "1" / target, link)
        if profile == "cpu":
            shutil.copy2(SOURCE / "onnx_stage" / "1" / "model.py", d / "1" / "model.py")
    check_ensemble(out / C.ENSEMBLE_NAME / "config.pbtxt", int(m["num_skips"]), has_adapter)
    (out / MARKER).write_text(f"profile {profile}\nexport {export_dir.resolve()}\n"
                              f"index {index_dir.resolve()}\n")
    return out


# ----------------------------------------------------------------------------- inspection


def ensemble_wiring(text: str) -> list[C.Step]:
    """The steps of an ensemble config's text, read with the standard library (no protobuf):
    each step's model and its input and output maps, in order."""
    steps: list[C.Step] = []
    for block in re.split(r"\bmodel_name:", text)[1:]:
        model = re.match(r'\s*"([^"]+)"', block).group(1)
        maps = {kind: dict(re.findall(kind + r'\s*\{\s*key:\s*"([^"]+)"\s*value:\s*"([^"]+)"',
                                      block)) for kind in ("input_map", "output_map")}
        steps.append(C.Step(model, maps["input_map"], maps["output_map"]))
    return steps


def check_ensemble(config: Path, num_skips: int, adapter: bool) -> None:
    """The rendered ensemble's steps must be ``contract.ensemble_steps`` (the template is
    written out for reading; this keeps it the contract's)."""
    got, want = ensemble_wiring(config.read_text()), C.ensemble_steps(num_skips, adapter)
    if got != want:
        diff = [f"{w.model}: {g} != {w}" for g, w in zip(got, want) if g != w]
        raise ValueError(f"{config}: the ensemble template differs from the stage contract "
                         f"(client/contract.py): {diff or [s.model for s in got]}")



def load_configs(repo: str | Path) -> dict:
    """Every ``config.pbtxt`` of a rendered repository parsed with Triton's own schema
    (``tritonclient.grpc.model_config_pb2``): {model name: ModelConfig}."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = {}
    for f in sorted(Path(repo).glob("*/config.pbtxt")):
        configs[f.parent.name] = text_format.Parse(f.read_text(), model_config_pb2.ModelConfig())
    return configs


def wiring(repo: str | Path) -> dict:
    """What must not differ between profiles: the ensemble's steps (model, input and output
    maps) and every model's tensors (name, dtype, dims, reshape), batch size and batching."""
    out = {}
    for name, c in load_configs(repo).items():
        tensors = {
            "inputs": [(t.name, t.data_type, list(t.dims), list(t.reshape.shape),
                        t.optional) for t in c.input],
            "outputs": [(t.name, t.data_type, list(t.dims)) for t in c.output],
            "max_batch_size": c.max_batch_size,
            "dynamic_batching": str(c.dynamic_batching) if c.HasField("dynamic_batching")
            else None,
        }
        if c.platform == "ensemble":
            tensors["steps"] = [(s.model_name, dict(s.input_map), dict(s.output_map))
                                for s in c.ensemble_scheduling.step]
        out[name] = tensors
    return out
