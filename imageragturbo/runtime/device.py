"""The five stages chained on the device with ONNX Runtime's IO binding: ``OnnxPipeline``'s
device-resident mode (``io_binding=True``, the default on CUDA).

Why: with ``session.run(None, feeds)`` every stage copies its inputs from host numpy arrays to
the GPU and its outputs back, and the skips alone are megabytes per sample at 512x512. Here the
stages exchange ``OrtValue`` s that stay where the provider computed them: only the token ids,
z_T, t, the retrieved features and lambda go in, and only the image (and z0 when asked) comes
out. On CPU the very same code runs with device ``"cpu"`` (OrtValues in host memory), and it
runs the same kernels on the same inputs as the numpy path, so its images are bit-identical
(tested).

Two ways to bind:

- dynamic (any batch): each call binds the inputs and asks ORT to allocate each output on the
  device (``bind_output(name, device)``), then hands those OrtValues to the next stage;
- fixed-shape (``static=(batch, k)``, with the sessions built with free-dimension overrides, see
  ``session_options``): every input and output is preallocated once, the bindings are built
  once, and a call only copies the new inputs into place (``update_inplace``) and runs the
  bindings. Fixed addresses are what CUDA graphs need (``enable_cuda_graph``): ORT captures
  each session's kernels on the first runs and replays them afterwards. The UNet decoder reads
  h from the encoder without retrieval and from the adapter with it, so it has one binding for
  each, captured as two graphs of the session (run option ``gpu_graph_id`` 1 and 2).

The free-dimension overrides ("batch", "k": the dynamic axes' names in the export) let ORT
constant-fold the shape arithmetic (Shape/Gather/Concat on int64) that it otherwise places on
the CPU inside the CUDA graphs, with Memcpy nodes around it (``count_ops`` counts them in the
optimized graph ORT writes to ``optimized_dir``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imageragturbo.client import contract as C

from .request import slerp_inject

DYNAMIC_DIMS = (C.BATCH_AXIS, C.K_AXIS)  # the export's dynamic axis names, in static's order
GRAPH_ID = {False: "1", True: "2"}      # CUDA graph of the decoder per source of h (adapter?)


def session_options(threads: int | None = None, static: tuple[int, int] | None = None,
                    optimized_path: str | Path | None = None):
    """Session options for one stage: all graph optimizations; ``static`` = (batch, k) fixes
    the dynamic axes so ORT folds the shape chains; ``optimized_path``: where ORT writes the
    optimized graph (weights to a ``.data`` file beside it), for inspection."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if static is not None:
        for name, value in zip(DYNAMIC_DIMS, static):
            so.add_free_dimension_override_by_name(name, int(value))
    if optimized_path is not None:
        p = Path(optimized_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        so.optimized_model_filepath = str(p)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    p.name + ".data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return so


def with_cuda_graph(providers: Sequence) -> list:
    """``providers`` with ``enable_cuda_graph`` set on the CUDA provider (TensorRT has its own
    ``trt_cuda_graph_enable``, set too). Raises when neither is in the list."""
    out, found = [], False
    for p in providers:
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if name == "CUDAExecutionProvider":
            opts["enable_cuda_graph"] = "1"
            found = True
        elif name == "TensorrtExecutionProvider":
            opts["trt_cuda_graph_enable"] = True
            found = True
        out.append((name, opts) if opts else name)
    if not found:
        raise ValueError(f"CUDA graphs need the CUDA or TensorRT provider, got {providers}")
    return out


def count_ops(optimized_graph: str | Path, ops: Sequence[str] = ()) -> dict[str, int]:
    """Node counts by op type of a graph ORT wrote (``optimized_model_filepath``), without
    loading its weights; ``ops`` lists types to report even when absent. ``Memcpy`` counts
    MemcpyToHost and MemcpyFromHost together: the copies ORT inserted between providers."""
    import onnx

    m = onnx.load(str(optimized_graph), load_external_data=False)
    c = Counter(n.op_type for n in m.graph.node)
    c["Memcpy"] = c.get("MemcpyToHost", 0) + c.get("MemcpyFromHost", 0)
    return {**{o: 0 for o in ops}, **dict(c)}


def device_of(providers: Sequence[str]) -> str:
    """Where a session's outputs live: "cuda" when a GPU provider comes first, else "cpu"."""
    first = providers[0] if providers else "CPUExecutionProvider"
    return "cuda" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"


class DeviceChain:
    """The stages of one ``OnnxPipeline`` run with IO binding on ``device`` (see the module
    docstring). ``static`` = (batch, k) preallocates every value and binds once (what sessions
    built with CUDA graphs need: ``OnnxPipeline`` checks that)."""

    def __init__(self, sessions: dict, manifest: dict, device: str = "cpu", device_id: int = 0,
                 static: tuple[int, int] | None = None):
        import onnxruntime as ort

        self.ort = ort
        self.sessions, self.manifest = sessions, manifest
        self.device, self.device_id = device, int(device_id)
        self.static = static
        self.outputs = {s: [o.name for o in sess.get_outputs()] for s, sess in sessions.items()}
        self.num_skips = C.num_skips_of(self.outputs[C.UNET_ENCODER])
        self.run_options = {}
        for adapter, gid in GRAPH_ID.items():
            ro = ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", gid)
            self.run_options[adapter] = ro
        if static is not None:
            self._preallocate(*static)

    # ------------------------------------------------------------------ values

    def value(self, x: np.ndarray):
        """A numpy array as an OrtValue on the device (a copy on CUDA, a wrapper on CPU)."""
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.device,
                                                     self.device_id)

    def _empty(self, info: dict, batch: int, k: int):
        fixed = dict(zip(DYNAMIC_DIMS, (batch, k)))
        shape = [fixed[d] if isinstance(d, str) else int(d) for d in info["shape"]]
        return self.ort.OrtValue.ortvalue_from_shape_and_type(
            shape, np.dtype(info["dtype"]), self.device, self.device_id)

    def _preallocate(self, batch: int, k: int) -> None:
        """Every stage output, and every input that no other stage produces, at (batch, k),
        and the bindings between them, once."""
        st = self.manifest["stages"]
        v = {(stage, o["name"]): self._empty(o, batch, k)
             for stage in self.sessions for o in st[stage]["outputs"]}
        enc = st[C.UNET_ENCODER]
        skips = self.num_skips

        def buffer(stage: str, name: str):
            return self._empty(next(i for i in st[stage]["inputs"] if i["name"] == name),
                               batch, k)

        # The inputs a call copies in (z_T and t: one buffer, two readers); every other input
        # reads the output that ``contract.one_step`` routes to it, found by tracing the chain
        # with the preallocated values. The decoder's h is bound twice (encoder's h, or the
        # injected h: see ``bindings``).
        self.buffers = {C.INPUT_IDS: buffer(C.TEXT_ENCODER, C.INPUT_IDS),
                        C.SAMPLE: buffer(C.UNET_ENCODER, C.SAMPLE),
                        C.TIMESTEP: buffer(C.UNET_ENCODER, C.TIMESTEP)}
        if C.H_ADAPTER in self.sessions:
            self.buffers.update({n: buffer(C.H_ADAPTER, n) for n in (C.H_RETR, C.LAM)})
        self.outputs_static = {stage: [v[(stage, o)] for o in C.stage_outputs(stage, skips)]
                               for stage in self.sessions}
        links: dict = {}

        def trace(stage, *args):
            links.update({(stage, n): val for n, val in C.named(stage, args, skips).items()})
            return self.outputs_static[stage]

        self.enc_h = v[(C.UNET_ENCODER, C.H)]
        # h after injection: the adapter's output, or a buffer the host slerp writes into
        self.h_injected = (v[(C.H_ADAPTER, C.H)] if C.H_ADAPTER in self.sessions
                           else self._empty(enc["outputs"][0], batch, k))
        b = self.buffers
        self.image, self.z0 = C.one_step(trace, b[C.SAMPLE], b[C.TIMESTEP], ids=b[C.INPUT_IDS])
        if C.H_ADAPTER in self.sessions:
            C.one_step(trace, b[C.SAMPLE], b[C.TIMESTEP], ids=b[C.INPUT_IDS],
                       h_retr=b[C.H_RETR], lam=b[C.LAM])
        self.bindings = {}
        for stage, sess in self.sessions.items():
            for var in ([False, True] if stage == C.UNET_DECODER else [None]):
                bind = sess.io_binding()
                for info in st[stage]["inputs"]:
                    if stage == C.UNET_DECODER and info["name"] == C.H:
                        bind.bind_ortvalue_input(C.H, self.h_injected if var else self.enc_h)
                    else:
                        bind.bind_ortvalue_input(info["name"], links[(stage, info["name"])])
                for info in st[stage]["outputs"]:
                    bind.bind_ortvalue_output(info["name"], v[(stage, info["name"])])
                self.bindings[(stage, var)] = bind

    # ------------------------------------------------------------------ running

    def _run_dynamic(self, stage: str, inputs: Sequence, timings: dict) -> list:
        """``contract.one_step``'s run with IO binding: inputs bound where they are, outputs
        allocated by ORT on the device; ``H_SLERP`` on the host (the one round trip)."""
        if stage == C.H_SLERP:
            h, h_retr, w = inputs
            return [self.value(slerp_inject(h.numpy(), h_retr[:, 0], w))]
        t0 = time.perf_counter()
        b = self.sessions[stage].io_binding()
        for name, val in C.named(stage, inputs, self.num_skips).items():
            b.bind_ortvalue_input(name, val)
        for name in self.outputs[stage]:
            b.bind_output(name, self.device, self.device_id)
        self.sessions[stage].run_with_iobinding(b)
        out = b.get_outputs()
        timings[stage] = (time.perf_counter() - t0) * 1e3
        return out

    def _run_static(self, stage: str, inputs: Sequence, timings: dict) -> list:
        """``contract.one_step``'s run on the fixed-shape profile: the bindings are made, so
        the inputs are the preallocated values themselves (the decoder's binding chosen by the
        h it is given); ``H_SLERP`` writes the host slerp into the injected-h buffer."""
        if stage == C.H_SLERP:
            h, h_retr, w = inputs
            self.h_injected.update_inplace(
                np.ascontiguousarray(slerp_inject(h.numpy(), h_retr[:, 0], w)))
            return [self.h_injected]
        t0 = time.perf_counter()
        adapter = (inputs[0] is self.h_injected) if stage == C.UNET_DECODER else None
        ro = self.run_options[bool(adapter)] if stage == C.UNET_DECODER else None
        self.sessions[stage].run_with_iobinding(self.bindings[(stage, adapter)], ro)
        timings[stage] = (time.perf_counter() - t0) * 1e3
        return self.outputs_static[stage]

    def fits(self, batch: int, k: int | None) -> bool:
        """Whether a call of this batch (and k neighbours) runs on the preallocated profile."""
        return self.static is not None and batch == self.static[0] and (
            k is None or k == self.static[1])

    def generate(self, ids: np.ndarray, z: np.ndarray, t: np.ndarray,
                 h_retr: np.ndarray | None = None, lam: np.ndarray | None = None,
                 slerp_w: float | None = None, timings: dict | None = None):
        """(image (B, 3, H, W) float32 on the host, z0 as an OrtValue on the device: in the
        fixed-shape profile both are the preallocated buffers, which the next call overwrites,
        so copy what must outlive it). ``h_retr``/``lam``: the
        H-adapter (paper Eq. 5); ``h_retr`` with ``slerp_w``: slerp (paper Eq. 3) on the host,
        the one round trip, as the training-free mode has no graph."""
        timings = {} if timings is None else timings
        k = None if h_retr is None or slerp_w is not None else h_retr.shape[1]
        if self.fits(len(ids), k):
            return self._generate_static(ids, z, t, h_retr, lam, slerp_w, timings)
        if self.static is not None:
            raise ValueError(f"this pipeline's fixed-shape profile runs batch {self.static[0]} "
                             f"with k = {self.static[1]}, got batch {len(ids)}"
                             + (f", k = {k}" if k is not None else ""))
        adapter = h_retr is not None and slerp_w is None
        image, z0 = C.one_step(
            lambda stage, *inputs: self._run_dynamic(stage, inputs, timings),
            self.value(z), self.value(t), ids=self.value(ids),
            h_retr=None if h_retr is None else self.value(h_retr) if adapter else h_retr,
            lam=self.value(lam) if adapter else None, slerp_w=slerp_w)
        return image.numpy(), z0

    def _generate_static(self, ids, z, t, h_retr, lam, slerp_w, timings):
        buf = self.buffers
        buf[C.INPUT_IDS].update_inplace(np.ascontiguousarray(ids))
        buf[C.SAMPLE].update_inplace(np.ascontiguousarray(z))
        buf[C.TIMESTEP].update_inplace(np.ascontiguousarray(t))
        adapter = h_retr is not None and slerp_w is None
        if adapter:
            buf[C.H_RETR].update_inplace(np.ascontiguousarray(h_retr))
            buf[C.LAM].update_inplace(np.ascontiguousarray(lam))
        image, z0 = C.one_step(
            lambda stage, *inputs: self._run_static(stage, inputs, timings),
            buf[C.SAMPLE], buf[C.TIMESTEP], ids=buf[C.INPUT_IDS],
            h_retr=buf[C.H_RETR] if adapter else h_retr, lam=buf[C.LAM] if adapter else None,
            slerp_w=slerp_w)
        return image.numpy(), z0
