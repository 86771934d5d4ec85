"""Export the five served stages of the one-step pipeline to ONNX (shared/DESIGN.md, "The
request path"; paper Fig. 2):

=============  ==============================================  =================================
stage          inputs                                          outputs
=============  ==============================================  =================================
text_encoder   input_ids [B, 77] int64                         last_hidden_state [B, 77, D],
                                                               pooled [B, D] (EOS, L2-normalised:
                                                               the retrieval key, paper Sec. 4.1)
unet_encoder   sample [B, 4, h, w], timestep [B] int64,        h [B, C, h', w'], temb [B, E],
               encoder_hidden_states [B, 77, D]                skip_0 .. skip_n
h_adapter      h_tgt [B, C, h', w'], h_retr [B, k, C, h', w'],  h [B, C, h', w'] (paper Eq. 5)
               lam [B]
unet_decoder   h, temb, skip_0 .. skip_n,                      z0 [B, 4, h, w] (the one-step
               encoder_hidden_states, sample, timestep         update folded in, paper Eq. 1)
vae_decoder    latents [B, 4, h, w] (scaled, as the UNet       image [B, 3, H, W] in [-1, 1]
               sees them; 1/scaling_factor is in the graph)
=============  ==============================================  =================================

The batch axis is dynamic everywhere and the neighbour axis ``k`` of ``h_retr`` too. Graphs are
exported with ``torch.onnx.export(..., dynamo=False)`` (TorchScript tracing; seen to work with
torch 2.14 and diffusers 0.42, see shared/ENVIRONMENT.md). optimum's exporters are not used:
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
from torch import nn

from imageragturbo.model import family
from imageragturbo.model.h_space import HAdapter, HAdapterConfig
from imageragturbo.model.unet_split import UNetDecoder, UNetEncoder, one_step_z0

from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, STAGES, sha256_file

DEFAULT_OPSET = 17               # LayerNormalization is native from 17; ORT 1.32 and TRT 10 run it
TWO_GB = 2 * 1024**3             # protobuf's hard limit on one serialised message
STUDENT_TIMESTEP = 999           # SD-Turbo's single step (imageragturbo.model.pipeline)
OPTIMUM_NOTE = (
    "optimum 2.1.0 + optimum-onnx 0.1.0 (the current releases) require transformers<4.58; pip "
    "would downgrade transformers 5.24 -> 4.57.6 and huggingface_hub. Installed without their "
    "dependencies, `optimum.exporters.onnx.main_export` fails at import: ImportError: cannot "
    "import name 'get_parameter_dtype' from 'transformers.modeling_utils'. The text encoder and "
    "VAE decoder are therefore exported with torch.onnx like the other stages.")


# ----------------------------------------------------------------------------- stage modules


class TextEncoderStage(nn.Module):
    """input_ids [B, 77] -> (last_hidden_state [B, 77, D], pooled [B, D]); pooled is the EOS
    token's final state, L2-normalised: the retrieval key (paper Sec. 4.1)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids)
        pooled = nn.functional.normalize(out.pooler_output.float(), dim=-1)  # (B, D)
        return out.last_hidden_state, pooled


class UNetEncoderStage(nn.Module):
    """(sample, timestep, encoder_hidden_states) -> (h, temb, skip_0, ..., skip_n): f_enc of
    paper Sec. 3.2, the UNet up to and including its mid-block."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.enc = UNetEncoder(unet)

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.enc(sample, timestep, encoder_hidden_states)


class UNetDecoderStage(nn.Module):
    """(h, temb, skip_0..skip_n, encoder_hidden_states, sample, timestep) -> z0: the up blocks,
    then the one-step update z0 = (z_t - sigma_t eps) / alpha_t (paper Eq. 1 solved for z0)
    inside the graph."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str,
                 num_skips: int):
        super().__init__()
        self.dec = UNetDecoder(unet)
        self.prediction_type = prediction_type
        self.num_skips = num_skips
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)

    def forward(self, h, temb, *rest):
        skips = rest[: self.num_skips]
        encoder_hidden_states, sample, timestep = rest[self.num_skips:]
        out = self.dec(h, temb, skips, encoder_hidden_states)             # (B, 4, h, w)
        return one_step_z0(sample, timestep, out, self.alphas_cumprod, self.prediction_type)


class VAEDecoderStage(nn.Module):
    """latents [B, 4, h, w] (as the UNet sees them) -> image [B, 3, H, W] in about [-1, 1]
    (clamped in post-processing, as ``pipeline.decode_latents`` does)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latents):
        return self.vae.decode(latents * self.inv_scale).sample


def fresh_adapter_config(channels: int) -> HAdapterConfig:
    """An H-adapter sized for a mid-block of ``channels``: heads of 64 at SD width (1280 ->
    20 x 64, the paper's 36 M parameters), otherwise 4 heads."""
    if channels >= 640 and channels % 64 == 0:
        return HAdapterConfig(channels=channels, num_heads=channels // 64, head_dim=64)
    if channels % 4:
        raise ValueError(f"cannot size an adapter for {channels} channels (not a multiple of 4)")
    return HAdapterConfig(channels=channels, num_heads=4, head_dim=channels // 4)


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
        cfg = (cfg.to_dict() if hasattr(cfg, "to_dict")
               else asdict(cfg) if is_dataclass(cfg) else dict(cfg))
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


def _initializer_bytes(model) -> int:
    """Size of a graph's weights (initializers and Constant tensors), in bytes."""
    from onnx import numpy_helper

    total = sum(len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
                for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.t is not None and a.t.raw_data:
                    total += len(a.t.raw_data)
    return total


def _value_info(v) -> dict:
    from onnx import helper

    t = v.type.tensor_type
    shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
    return {"name": v.name, "shape": shape,
            "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name}


_ATTENTION_OPS = {"MatMul", "Softmax", "Mul", "Div", "Add", "Sqrt"}  # float compute only


def attention_core_nodes(model) -> list[str]:
    """Names of the nodes inside attention modules that form the scores, softmax and the
    weighted sum (not the q/k/v/out projections): the part SD 2.x runs in fp32
    (``upcast_attention``) because fp16 overflows there."""
    names = []
    for node in model.graph.node:
        n = node.name
        if node.op_type in _ATTENTION_OPS and ("/attn1/" in n or "/attn2/" in n) and not any(
                f"/{p}" in n for p in ("to_q", "to_k", "to_v", "to_out")):
            names.append(n)
    return names


_TIME_PROJ_OPS = {"Cast", "Mul", "Sin", "Cos"}


def time_projection_nodes(model) -> list[str]:
    """Names of the nodes of the sinusoidal timestep projection (``time_proj``: timestep x
    frequencies, sin, cos). At t = 999 the product's fp16 spacing is 0.5 rad, so fp16 would
    scramble the high frequencies; diffusers computes this part in fp32 in fp16 models too."""
    return [n.name for n in model.graph.node
            if n.op_type in _TIME_PROJ_OPS and "/time_proj/" in n.name]


def _set_output_shapes(model, example: Sequence[torch.Tensor],
                       dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Replace the exporter's generated dim names on the outputs (``Addh_dim_1``) by the
    traced static sizes, keeping the declared dynamic axes symbolic."""
    for out, t in zip(model.graph.output, example):
        dims = out.type.tensor_type.shape.dim
        dyn = dynamic_axes.get(out.name, {})
        if len(dims) != t.ndim:
            continue
        for i, d in enumerate(dims):
            if i in dyn:
                d.dim_param = dyn[i]
            else:
                d.dim_value = int(t.shape[i])


def _infer_shapes(model):
    """ONNX shape inference, through a file with external data for graphs over 2 GB."""
    import onnx

    if _initializer_bytes(model) < TWO_GB - (64 << 20):
        return onnx.shape_inference.infer_shapes(model)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="in.onnx.data")
        onnx.shape_inference.infer_shapes_path(str(src), str(dst))
        return _load_with_data(dst, src)


def _load_with_data(graph: Path, data_dir_graph: Path):
    """Load ``graph`` (written by shape inference, tensors referring to ``data_dir_graph``'s
    external data file in the same folder) with its tensors."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    m = onnx.load(str(graph), load_external_data=False)
    load_external_data_for_model(m, str(data_dir_graph.parent))
    return m


def _is_float_constant(node) -> bool:
    from onnx import TensorProto

    return any(a.name == "value" and a.t.data_type == TensorProto.FLOAT for a in node.attribute)


def fp32_only_inputs(model) -> dict[str, list[int]]:
    """{op type: input indices} of the ops in ``model`` whose schema (at the model's opset)
    accepts float32 but not float16 there, e.g. Resize's ``scales`` (tensor(float) only) or
    all three inputs of Range: the inputs an fp16 conversion must leave in float32."""
    from onnx import defs

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=DEFAULT_OPSET)
    out = {}
    for op in sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}):
        schema = defs.get_schema(op, opset, "")
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        idx = [i for i, inp in enumerate(schema.inputs)
               if "tensor(float)" in allowed.get(inp.type_str, {inp.type_str})
               and "tensor(float16)" not in allowed.get(inp.type_str, {inp.type_str})]
        if idx:
            out[op] = idx
    return out


def to_fp16(model, fp32_attention: bool):
    """fp32 graph -> fp16 weights and compute, float32 inputs and outputs (casts inserted at
    the edges); the timestep projection (``time_projection_nodes``) always, and the attention
    core when ``fp32_attention``, kept in fp32 (blocked nodes pass fp32 values to each other
    directly: ``_drop_fp16_round_trips``).

    onnxruntime's converter turns every float tensor it meets into fp16, Constant nodes
    included, and only keeps an input in float32 when it is an initializer or has an inferred
    type. torch writes Resize's ``scales`` as a Constant node, so without types the converted
    Resize got fp16 scales, which the ONNX spec forbids (ORT: INVALID_GRAPH, "Type
    'tensor(float16)' of input parameter ... of operator (Resize)"). Here every input whose
    schema forbids fp16 (``fp32_only_inputs``) stays float32: a Constant that feeds only such
    inputs is put on the converter's ``node_block_list`` (so its value is never rounded), an op
    with such inputs that the converter does not handle itself goes on ``op_block_list``, and
    types are inferred first so the converter casts whatever else feeds them. The converter
    appends its casts at the end of the node list; the result is sorted topologically, as the
    ONNX spec (and ``onnx.checker``) requires."""
    from onnxruntime.transformers.float16 import (
        ALWAYS_FLOAT_INPUTS,
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    # The converter places its fp16<->fp32 casts (around blocked nodes, before Resize's scales)
    # from value_info: without inferred types it inserts none.
    model = _infer_shapes(model)
    fixed = fp32_only_inputs(model)
    op_block = set(DEFAULT_OP_BLOCK_LIST) | {
        op for op, idx in fixed.items() if not set(idx) <= set(ALWAYS_FLOAT_INPUTS.get(op, []))}
    block = set(time_projection_nodes(model))
    if fp32_attention:
        block |= set(attention_core_nodes(model))
    fp32_uses = {(op, i) for op, idx in fixed.items() for i in idx}
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        blocked = node.op_type in op_block or node.name in block
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, -1 if blocked else i))
    keep = {n.name: n.output[0] for n in model.graph.node
            if n.name and n.op_type == "Constant" and _is_float_constant(n)
            and consumers.get(n.output[0])
            and all(i < 0 or (op, i) in fp32_uses for op, i in consumers[n.output[0]])}
    # A blocked node's typed output would get a cast back to fp16 after it: drop the inferred
    # types of the kept constants (they carry their own).
    kept = set(keep.values())
    vi = [v for v in model.graph.value_info if v.name not in kept]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi)
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=sorted(op_block),
                                     node_block_list=sorted(block | set(keep)),
                                     disable_shape_infer=True)
    _drop_fp16_round_trips(model)
    OnnxModel.graph_topological_sort(model.graph)
    return model


def _drop_fp16_round_trips(model) -> int:
    """The converter casts every blocked node's output to fp16 and back to fp32 before the
    next blocked node, so a chain of fp32 nodes (the attention core: scores -> softmax) still
    rounds, and overflows, in fp16 between them. Rewire each Cast(to=float32) whose input is a
    Cast(to=float16) of a float32 value to read that value, then drop the casts left unused.
    Only precision is gained. Returns the number of round trips removed."""
    from onnx import TensorProto

    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    producer = {o: n for n in g.node for o in n.output}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None)

    rename = {}
    for n in g.node:
        if n.op_type != "Cast" or cast_to(n) != TensorProto.FLOAT:
            continue
        p = producer.get(n.input[0])
        if (p is not None and p.op_type == "Cast" and cast_to(p) == TensorProto.FLOAT16
                and types.get(p.input[0]) == TensorProto.FLOAT):
            rename[n.output[0]] = p.input[0]
    outputs = {o.name for o in g.output}
    rename = {k: v for k, v in rename.items() if k not in outputs}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    # drop casts whose outputs nobody reads any more (the round trips' both halves)
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    produced = {o for n in g.node for o in n.output}
    vi = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vi)
    return len(rename)


def _save(model, path: Path, threshold: int) -> list[str]:
    """Write ``model`` to ``path``; tensors to ``<path>.data`` when the weights exceed
    ``threshold`` bytes. Returns the file names written."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if _initializer_bytes(model) > threshold:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
        data.chmod(0o644)  # onnx creates it private; servers read it as another user
        return [path.name, data.name]
    onnx.save_model(model, str(path))
    return [path.name]


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
    ehs = torch.randn(batch, seq, d, generator=g)                      # (B, 77, D)
    enc = UNetEncoderStage(c.unet).eval()
    with torch.no_grad():
        h, temb, *skips = enc(z, t, ehs)
    n = len(skips)
    skip_names = [f"skip_{i}" for i in range(n)]
    b = {0: "batch"}
    specs = [
        StageSpec("text_encoder", TextEncoderStage(c.text_encoder), (ids,), ["input_ids"],
                  ["last_hidden_state", "pooled"],
                  {"input_ids": b, "last_hidden_state": b, "pooled": b}),
        StageSpec("unet_encoder", enc, (z, t, ehs),
                  ["sample", "timestep", "encoder_hidden_states"], ["h", "temb", *skip_names],
                  {x: b for x in ["sample", "timestep", "encoder_hidden_states", "h", "temb",
                                  *skip_names]}),
    ]
    if adapter is not None:
        h_retr = torch.randn(batch, k, *h.shape[1:], generator=g)      # (B, k, C, h', w')
        lam = torch.rand(batch, generator=g)                           # (B,)
        specs.append(StageSpec("h_adapter", adapter.eval(), (h, h_retr, lam),
                               ["h_tgt", "h_retr", "lam"], ["h"],
                               {"h_tgt": b, "h_retr": {0: "batch", 1: "k"}, "lam": b, "h": b}))
    dec = UNetDecoderStage(c.unet, c.alphas_cumprod, c.scheduler.config.prediction_type, n)
    specs += [
        StageSpec("unet_decoder", dec.eval(), (h, temb, *skips, ehs, z, t),
                  ["h", "temb", *skip_names, "encoder_hidden_states", "sample", "timestep"],
                  ["z0"], {x: b for x in ["h", "temb", *skip_names, "encoder_hidden_states",
                                          "sample", "timestep", "z0"]}),
        StageSpec("vae_decoder", VAEDecoderStage(c.vae).eval(), (z,), ["latents"], ["image"],
                  {"latents": b, "image": b}),
    ]
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
        adapter = HAdapter(fresh_adapter_config(int(c.unet.config.block_out_channels[-1])))
    adapter = adapter.float().eval() if adapter is not None else None
    (out / MANIFEST).unlink(missing_ok=True)  # written last: its presence means complete
    specs = stage_specs(c, adapter, image_size=image_size)
    stages = {}
    bar = tqdm(specs, desc="onnx export", unit="stage", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        stages[spec.name] = export_stage(spec, out / f"{spec.name}.onnx", opset, fp16,
                                         fp32_attention, external_data_threshold)
    for stale in set(STAGES) - set(stages):
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
        "num_skips": len(stages["unet_encoder"]["outputs"]) - 2,
        "h_adapter": ({"config": asdict(adapter.config),
                       "fresh": c.h_adapter is None} if adapter is not None else None),
        "external_data_threshold": external_data_threshold,
        "stages": stages,
        "tokenizer": {str(p.relative_to(out)): sha256_file(p)
                      for p in sorted(tok_dir.rglob("*")) if p.is_file()},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)
    return out


def model_files_id(source, index: bool = False) -> str | None:
    """The weight files' identity (``defaults.model_files_id``, kept here for callers)."""
    from imageragturbo.defaults import model_files_id as files_id

    return files_id(source, index)


def export_from_model(model: str | Path, out: str | Path, **kw) -> Path:
    """Load a variant name or a diffusers folder (``family.load_components``) and export it."""
    c = family.load_components(model)
    return export_model(c, out, source=model, **kw)
