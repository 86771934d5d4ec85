"""Export the five served stages of the one-step pipeline to ONNX (docs/design.md, "The
request path"; paper Fig. 2):

=============  ==============================================  =================================
stage          inputs                                          outputs
=============  ==============================================  =================================
text_encoder   input_ids [B, L] int64                          last_hidden_state [B, L, D],
                                                               pooled [B, D] (EOS, L2-normalised:
                                                               the retrieval key, paper Sec. 4.1)
unet_encoder   sample [B, 4, h, w], timestep [B] int64,        h [B, C, h', w'], temb [B, E],
               encoder_hidden_states [B, L, D]                 skip_0 .. skip_n
h_adapter      h_tgt [B, C, h', w'], h_retr [B, k, C, h', w'],  h [B, C, h', w'] (paper Eq. 5)
               lam [B]
unet_decoder   h, temb, skip_0 .. skip_n,                      z0 [B, 4, h, w] (the one-step
               encoder_hidden_states, sample, timestep         update folded in, paper Eq. 1)
vae_decoder    latents [B, 4, h, w] (scaled, as the UNet       image [B, 3, H, W] in [-1, 1]
               sees them; 1/scaling_factor is in the graph)
=============  ==============================================  =================================

L is the tokenizer's context length (24 for tiny-shapes, 77 for SD 2.1 / SD-Turbo).
The batch axis is dynamic everywhere and the neighbour axis ``k`` of ``h_retr`` too. Graphs are
exported with ``torch.onnx.export(..., dynamo=False)`` (TorchScript tracing; seen to work with
torch 2.14 and diffusers 0.42, see docs/design.md). optimum's exporters are not used:
optimum-onnx 0.1.0 pins transformers<4.58 and fails to import under transformers 5.x (see
``OPTIMUM_NOTE``).

``fp16=True`` converts each graph with onnxruntime's ``convert_float_to_float16`` (inputs and
outputs stay float32, so every profile is fed the same arrays), keeping the attention scores,
softmax and attention-weighted sum in fp32 when the UNet config has ``upcast_attention`` (SD 2.x
768-px models overflow in fp16 there) or when ``fp32_attention=True``. Inputs the ONNX spec
allows only in float32 (Resize's scales) and the sinusoidal timestep projection always stay
fp32 (see ``to_fp16``).

A graph whose weights exceed ``external_data_threshold`` bytes (default 2 GB, protobuf's limit;
the SD 2.1 UNet decoder in fp32) is written with its tensors in one ``<stage>.onnx.data`` file
beside it. ``manifest.json`` lists stages, inputs and outputs with their shapes, the opset, the
dtype, the source model's identity and the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imageragturbo.checksums import sha256_file
from imageragturbo.client import contract as C
from imageragturbo.defaults import STUDENT_TIMESTEP, model_files_id
from imageragturbo.model import family
from imageragturbo.model.h_space import HAdapter, adapter_config_for
from imageragturbo.model.stages import (
    FlatUNetDecoder,
    TextEncoder,
    UNetDecoder,
    UNetEncoder,
    VAEDecoder,
)
from imageragturbo.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST

from .graph import (  # noqa: F401 - DEFAULT_OPSET and TWO_GB are part of this module's API
    DEFAULT_OPSET,
    TWO_GB,
    _save,
    _set_output_shapes,
    _value_info,
    to_fp16,
)

OPTIMUM_NOTE = (
    "optimum 2.1.0 + optimum-onnx 0.1.0 (the current releases) require transformers<4.58; pip "
    "would downgrade transformers 5.24 -> 4.57.6 and huggingface_hub. Installed without their "
    "dependencies, `optimum.exporters.onnx.main_export` fails at import: ImportError: cannot "
    "import name 'get_parameter_dtype' from 'transformers.modeling_utils'. The text encoder and "
    "VAE decoder are therefore exported with torch.onnx like the other stages.")


# ----------------------------------------------------------------------------- stage modules


def random_tiny_components(seed: int = 0) -> family.Components:
    """The shipped default's architecture (``family.tiny_*_config``) with random weights: for
    tests and benchmarks while the trained ``tiny-shapes`` is not there (latency and parity do
    not depend on the weights' values)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextModel(family.tiny_text_config())
    unet = UNet2DConditionModel(**family.tiny_unet_config(text.config.hidden_size))
    vae = AutoencoderKL(**family.tiny_vae_config())
    sched = EulerDiscreteScheduler(**family.noise_schedule_config())
    return family.Components(tokenizer=family.clip_tokenizer(), text_encoder=text, vae=vae,
                             unet=unet, scheduler=sched, name="tiny-random").eval()


# ----------------------------------------------------------------------------- helpers


def model_identity(c: family.Components, source: str | Path | None = None) -> dict:
    """Which model the graphs came from: its name or folder, and digests of every
    component's config and weights (so an export can be checked against a model)."""
    configs, weights = hashlib.sha256(), hashlib.sha256()
    parts = {"text_encoder": c.text_encoder, "unet": c.unet, "vae": c.vae,
             "h_adapter": c.h_adapter}
    for name, m in parts.items():
        if m is None:
            continue
        cfg = m.config
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        configs.update(name.encode() + json.dumps(cfg, sort_keys=True, default=str).encode())
        for k, v in m.state_dict().items():
            weights.update(f"{name}.{k}".encode())
            weights.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    ident = {"name": str(c.name), "configs_sha256": configs.hexdigest(),
             "weights_sha256": weights.hexdigest()}
    if source is not None:
        p = Path(str(source))
        ident["source"] = str(p.resolve()) if p.is_dir() else str(source)
    return ident


# Graph surgery (shapes, fp16 conversion, saving with external data) lives in graph.py.


# ----------------------------------------------------------------------------- export


@dataclass
class StageSpec:
    """One stage to export: the module, example inputs, names and dynamic axes."""

    name: str
    module: nn.Module
    args: tuple
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def stage_specs(c: family.Components, adapter: HAdapter | None = None, batch: int = 2,
                k: int = 2, image_size: int | None = None) -> list[StageSpec]:
    """The five stages of ``c`` with example inputs at ``batch`` (the h_adapter only when
    ``adapter`` is given)."""
    from imageragturbo.model.pipeline import latent_shape

    d = c.text_encoder.config.hidden_size
    seq = int(c.tokenizer.model_max_length)
    lat = latent_shape(c, image_size)                                  # (4, h, w)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.text_encoder.config.vocab_size - 2, (batch, seq), generator=g)
    ids[:, 0] = c.text_encoder.config.bos_token_id
    ids[:, seq // 2] = c.text_encoder.config.eos_token_id              # EOS mid-sequence
    z = torch.randn(batch, *lat, generator=g)                          # (B, 4, h, w)
    t = torch.full((batch,), STUDENT_TIMESTEP, dtype=torch.long)       # (B,)
    ehs = torch.randn(batch, seq, d, generator=g)                      # (B, L, D)
    enc = UNetEncoder(c.unet).eval()
    with torch.no_grad():
        h, temb, *skips = enc(z, t, ehs)
    n = len(skips)

    def spec(stage: str, module: nn.Module, args: tuple) -> StageSpec:
        return StageSpec(stage, module.eval(), args, C.stage_inputs(stage, n),
                         C.stage_outputs(stage, n), C.dynamic_axes(stage, n))

    specs = [spec(C.TEXT_ENCODER, TextEncoder(c.text_encoder), (ids,)),
             spec(C.UNET_ENCODER, enc, (z, t, ehs))]
    if adapter is not None:
        h_retr = torch.randn(batch, k, *h.shape[1:], generator=g)      # (B, k, C, h', w')
        lam = torch.rand(batch, generator=g)                           # (B,)
        specs.append(spec(C.H_ADAPTER, adapter, (h, h_retr, lam)))
    dec = FlatUNetDecoder(UNetDecoder(c.unet, c.alphas_cumprod,
                                      c.scheduler.config.prediction_type))
    specs += [spec(C.UNET_DECODER, dec, (h, temb, *skips, ehs, z, t)),
              spec(C.VAE_DECODER, VAEDecoder(c.vae), (z,))]
    return specs


def export_stage(spec: StageSpec, path: Path, opset: int = DEFAULT_OPSET, fp16: bool = False,
                 fp32_attention: bool = False, external_data_threshold: int = TWO_GB) -> dict:
    """Export one stage to ``path``; returns its manifest entry."""
    import onnx

    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        example = spec.module(*spec.args)
    example = example if isinstance(example, tuple) else (example,)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
        # Shape asserts and Python branches in diffusers/transformers are constant for one
        # trace; the dynamic axes are declared explicitly, so the tracer's notes are noise.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(spec.module, spec.args, str(raw), input_names=spec.inputs,
                              output_names=spec.outputs, dynamic_axes=spec.dynamic_axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))  # pulls in any external tensors torch wrote beside it
    _set_output_shapes(model, example, spec.dynamic_axes)
    if fp16:
        model = to_fp16(model, fp32_attention)
    files = _save(model, path, external_data_threshold)
    entry = {
        "file": path.name,
        "files": {f: {"bytes": (path.parent / f).stat().st_size,
                      "sha256": sha256_file(path.parent / f)} for f in files},
        "external_data": len(files) > 1,
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "dtype": "float16" if fp16 else "float32",
        "fp32_attention": bool(fp16 and fp32_attention),
        "parameters": int(sum(p.numel() for p in spec.module.parameters())),
        "export_seconds": round(time.perf_counter() - t0, 2),
    }
    return entry


def export_model(c: family.Components, out: str | Path, *, source: str | Path | None = None,
                 opset: int = DEFAULT_OPSET, fp16: bool = False,
                 fp32_attention: bool | None = None, fresh_adapter: bool = False,
                 external_data_threshold: int = TWO_GB, image_size: int | None = None,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Export every stage of ``c`` to the folder ``out`` (graphs, tokenizer/, manifest.json).

    The H-adapter stage is written when the model has one, or a zero-initialised one sized for
    the mid-block when ``fresh_adapter`` (it is then the identity: paper Eq. 5 with g = 0 at
    initialisation). ``fp32_attention`` defaults to the UNet config's ``upcast_attention``
    (only used with ``fp16``). Returns the folder.
    """
    from tqdm import tqdm

    out = Path(out)
    if opset < 14:
        raise ValueError(f"opset {opset} is too old: scaled_dot_product_attention needs >= 14")
    if external_data_threshold <= 0:
        raise ValueError("external_data_threshold must be a positive number of bytes")
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an export; pass overwrite=True "
                              "(--overwrite) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if fp32_attention is None:
        fp32_attention = bool(getattr(c.unet.config, "upcast_attention", False))
    adapter = c.h_adapter
    if adapter is None and fresh_adapter:
        adapter = HAdapter(adapter_config_for(c.unet))
    adapter = adapter.float().eval() if adapter is not None else None
    (out / MANIFEST).unlink(missing_ok=True)  # written last: its presence means complete
    specs = stage_specs(c, adapter, image_size=image_size)
    stages = {}
    bar = tqdm(specs, desc="onnx export", unit="stage", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        stages[spec.name] = export_stage(spec, out / f"{spec.name}.onnx", opset, fp16,
                                         fp32_attention, external_data_threshold)
    for stale in set(C.STAGES) - set(stages):
        for f in out.glob(f"{stale}.onnx*"):
            f.unlink()
    tok_dir = out / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    c.tokenizer.save_pretrained(tok_dir)
    from imageragturbo.model.pipeline import latent_shape

    lat = latent_shape(c, image_size)
    factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "opset": opset,
        "dtype": "float16" if fp16 else "float32",
        "io_dtype": "float32",
        "fp32_attention": bool(fp16 and fp32_attention),
        "source": model_identity(c, source),
        # the weight files' identity, as a retrieval index records it: `serve` compares it
        # with the weights on disk to tell a stale export from a current one
        "model_files_id": model_files_id(source),
        "exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
        "optimum": OPTIMUM_NOTE,
        "latent_shape": list(lat),
        "image_size": lat[1] * factor,
        "timestep": STUDENT_TIMESTEP,
        "prediction_type": c.scheduler.config.prediction_type,
        "scaling_factor": float(c.vae.config.scaling_factor),
        "max_length": int(c.tokenizer.model_max_length),
        "text_dim": int(c.text_encoder.config.hidden_size),
        "num_skips": n_skips(stages),
        "h_adapter": ({"config": {k: v for k, v in adapter.config.items()
                                  if not k.startswith("_")},
                       "fresh": c.h_adapter is None} if adapter is not None else None),
        # beyond the paper: a model trained with a neighbour start begins its step, with
        # retrieval on, from the top-1 neighbour's latent noised to this timestep
        "neighbour_start": c.neighbour_start if adapter is not None else None,
        "external_data_threshold": external_data_threshold,
        "stages": stages,
        "tokenizer": {str(p.relative_to(out)): sha256_file(p)
                      for p in sorted(tok_dir.rglob("*")) if p.is_file()},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)
    return out


def n_skips(stages: dict) -> int:
    return C.num_skips_of(o["name"] for o in stages[C.UNET_ENCODER]["outputs"])


def export_from_model(model: str | Path, out: str | Path, **kw) -> Path:
    """Load a variant name or a diffusers folder (``family.load_components``) and export it."""
    c = family.load_components(model)
    return export_model(c, out, source=model, **kw)
