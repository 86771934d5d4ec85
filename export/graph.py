"""ONNX graph surgery for the export (``onnx_export``): output shapes and shape inference
(through external data above 2 GB), the fp16 conversion that keeps what must stay fp32 in
fp32 (inputs the ONNX spec allows only in float32, such as Resize's scales; the sinusoidal
timestep projection; optionally the attention core), and saving with external data."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_OPSET = 17               # LayerNormalization is native from 17; ORT 1.32 and TRT 10 run it
TWO_GB = 2 * 1024**3             # protobuf's hard limit on one serialised message


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
    dedupe_nodes(model)
    OnnxModel.graph_topological_sort(model.graph)
    return model


def dedupe_nodes(model) -> int:
    """Drop nodes that repeat an earlier node exactly (op, inputs, outputs, attributes).
    onnxruntime's converter before 1.32 casts an fp16 tensor to fp32 once per blocked consumer,
    all with the same node and output name, so a tensor feeding two attention-core nodes gave
    "two nodes with same node name" (seen with onnxruntime-gpu 1.31.1); 1.32 shares one cast.
    Returns the number of nodes dropped."""
    seen, keep = set(), []
    for node in model.graph.node:
        key = (node.op_type, node.domain, tuple(node.input), tuple(node.output),
               tuple(a.SerializeToString() for a in node.attribute))
        if key in seen:
            continue
        seen.add(key)
        keep.append(node)
    dropped = len(model.graph.node) - len(keep)
    if dropped:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return dropped


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
