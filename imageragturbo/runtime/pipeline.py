"""The one-step pipeline in process on ONNX Runtime: the five exported stages (see
``imageragturbo.export.onnx_export``) chained by ``contract.one_step``, the chain the served
ensemble's wiring is made from (docs/design.md, "The request path")::

    ids -> text_encoder -> (ehs, pooled) ; pooled -> retriever -> (h_retr, lambda)
    z_T, t, ehs -> unet_encoder -> (h, temb, skips) ; h, h_retr, lambda -> h_adapter -> h
    h, temb, skips, ehs, z_T, t -> unet_decoder -> z0 -> vae_decoder -> uint8 image

One ``InferenceSession`` per stage, created when the pipeline is built and reused for every
call. Execution providers are chosen by availability: TensorRT, then CUDA, then CPU. This
module needs numpy, onnxruntime and the tokenizer only (no torch), so it can serve alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imageragturbo.client import contract as C

from . import device
from .manifest import MANIFEST, load_manifest, stage_names
from .request import initial_noise, slerp_inject, start_from, to_uint8

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(prefer: Sequence[str] | None = None, fp16: bool = False,
                     cache_dir: str | Path | None = None) -> list:
    """Execution providers by availability (TensorRT > CUDA > CPU), or exactly ``prefer``
    (short names accepted: ``tensorrt``, ``cuda``, ``cpu``). TensorRT gets fp16 when the graphs
    are fp16 and an engine cache in ``cache_dir``."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    short = {"tensorrt": PROVIDER_ORDER[0], "trt": PROVIDER_ORDER[0],
             "cuda": PROVIDER_ORDER[1], "cpu": PROVIDER_ORDER[2]}
    if prefer:
        names = [short.get(p.lower(), p) for p in prefer]
        missing = [p for p in names if p not in avail]
        if missing:
            raise ValueError(f"execution provider(s) {missing} not available here; this "
                             f"onnxruntime offers {avail} (GPU providers need onnxruntime-gpu)")
    else:
        names = [p for p in PROVIDER_ORDER if p in avail]
    out: list = []
    for p in names:
        if p == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": bool(fp16), "trt_engine_cache_enable": cache_dir is not None}
            if cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                opts["trt_engine_cache_path"] = str(cache_dir)
            out.append((p, opts))
        else:
            out.append(p)
    if "CPUExecutionProvider" not in names:
        out.append("CPUExecutionProvider")  # for any node the GPU provider does not take
    return out


class OnnxPipeline:
    """The exported stages of one model on ONNX Runtime (sessions built once, reused).

    ``path``: an export folder (``imageragturbo export``); ``providers``: as
    :func:`choose_providers` (default: by availability); ``threads``: intra-op threads per
    session (default: onnxruntime's choice).

    Device residency (``runtime.device``): ``io_binding`` chains the stages with OrtValues that
    stay on the device (default: on when a GPU provider runs the graphs; on CPU it gives the
    same bytes as the numpy path). ``static_batch`` (with ``static_k`` neighbours) builds the
    fixed-shape profile: the sessions fix the dynamic axes, so ORT folds the shape arithmetic
    it would otherwise run on the CPU, and with IO binding every value is preallocated once;
    such a pipeline runs only that batch. ``cuda_graph`` (needs the profile, default batch 1)
    adds CUDA graph capture on the CUDA provider. ``optimized_dir``: ORT writes each stage's
    optimized graph there (to count what it placed where: ``device.count_ops``).
    """

    def __init__(self, path: str | Path, providers: Sequence | None = None,
                 threads: int | None = None, verify: bool = False,
                 io_binding: bool | None = None, static_batch: int | None = None,
                 static_k: int = 1, cuda_graph: bool = False, device_id: int = 0,
                 optimized_dir: str | Path | None = None):
        import onnxruntime as ort
        from transformers import CLIPTokenizer

        self.path = Path(path)
        self.manifest = load_manifest(self.path, verify=verify)
        fp16 = self.manifest["dtype"] == "float16"
        self.providers = list(providers) if providers else choose_providers(
            fp16=fp16, cache_dir=self.path / "trt_cache")
        graph_providers = None
        if cuda_graph:
            static_batch = static_batch or 1
            graph_providers = device.with_cuda_graph(self.providers)
        static = (int(static_batch), int(static_k)) if static_batch else None
        self.sessions = {}
        self.graph_stages: list[str] = []  # stages captured as CUDA graphs
        for name in stage_names(self.manifest):
            f = self.path / self.manifest["stages"][name]["file"]
            opt = Path(optimized_dir) / f"{name}.onnx" if optimized_dir else None
            so = device.session_options(threads, static, opt)
            if graph_providers is not None:
                # ORT captures a graph only when every node runs on the GPU provider; a stage
                # with a CPU fallback left (the text encoder's argmax over token ids) runs
                # without one rather than failing the whole pipeline.
                try:
                    self.sessions[name] = ort.InferenceSession(str(f), so,
                                                               providers=graph_providers)
                    self.graph_stages.append(name)
                    continue
                except Exception as e:  # noqa: BLE001 - ORT raises its own Fail type
                    if "graph capture" not in str(e):
                        raise
                    so = device.session_options(threads, static, opt)
            self.sessions[name] = ort.InferenceSession(str(f), so, providers=self.providers)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.path / "tokenizer")
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.timestep = int(self.manifest["timestep"])
        # beyond the paper: a model trained with a neighbour start ({"timestep", "alpha_bar"})
        self.neighbour_start = self.manifest.get("neighbour_start")
        self.num_skips = int(self.manifest["num_skips"])
        h = self.manifest["stages"][C.UNET_ENCODER]["outputs"][0]["shape"]
        self.h_shape = tuple(h[1:])                                    # (C, h', w')
        self.timings: dict[str, float] = {}
        self.static = static
        self.device = device.device_of(self.active_providers)
        if io_binding is None:
            io_binding = self.device != "cpu" or cuda_graph
        if cuda_graph and not io_binding:
            raise ValueError("CUDA graphs need io_binding (fixed input and output addresses)")
        self.device_id = device_id
        self.chain = None
        self.io_binding = io_binding

    @property
    def io_binding(self) -> bool:
        return self.chain is not None

    @io_binding.setter
    def io_binding(self, on: bool) -> None:
        """Switch IO binding on or off on the same sessions (the bench compares both)."""
        if on and self.chain is None:
            self.chain = device.DeviceChain(self.sessions, self.manifest, self.device,
                                            self.device_id, self.static)
        elif not on:
            self.chain = None

    @property
    def has_adapter(self) -> bool:
        return C.H_ADAPTER in self.sessions

    @property
    def active_providers(self) -> list[str]:
        return self.sessions[C.UNET_ENCODER].get_providers()

    # ------------------------------------------------------------------ stages

    def run(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One stage, timed into ``self.timings[stage]`` (milliseconds)."""
        if stage not in self.sessions:
            raise ValueError(f"stage {stage!r} is not in the export at {self.path} "
                             f"(it has {list(self.sessions)})")
        t0 = time.perf_counter()
        out = self.sessions[stage].run(None, feeds)
        self.timings[stage] = (time.perf_counter() - t0) * 1e3
        return out

    def stage(self, stage: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """One stage on its inputs in the contract's order (``contract.stage_inputs``): the
        ``run`` of ``contract.one_step``. ``H_SLERP`` (no graph) runs on the host."""
        if stage == C.H_SLERP:
            h, h_retr, w = inputs
            return [slerp_inject(h, h_retr[:, 0], w)]
        return self.run(stage, C.named(stage, inputs, self.num_skips))

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        ids = C.tokenize(self.tokenizer, prompts, int(self.manifest["max_length"]))
        return ids.astype(np.int64)                                    # (B, L)

    def encode_prompt(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, L, D) text states and (B, D) L2-normalised pooled key."""
        ehs, pooled = self.stage(C.TEXT_ENCODER, self.tokenize(prompts))
        return ehs, pooled

    def h_adapter(self, h: np.ndarray, h_retr: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Paper Eq. 5: h + lam * g(h, h_retr); h_retr (B, k, C, h', w'), lam (B,)."""
        lam = self._check_retrieved(h.shape[0], h_retr, lam)
        return self.stage(C.H_ADAPTER, h, h_retr.astype(np.float32), lam)[0]

    def _check_retrieved(self, batch: int, h_retr: np.ndarray, lam) -> np.ndarray:
        """The adapter's inputs checked against the batch and h's shape; lam as float32 (B,)."""
        if h_retr.ndim != 5 or h_retr.shape[0] != batch or h_retr.shape[2:] != self.h_shape:
            raise ValueError(f"h_retr must be (B, k, {', '.join(map(str, self.h_shape))}) with "
                             f"B={batch}, got {h_retr.shape}")
        lam = np.asarray(lam, dtype=np.float32).reshape(-1)
        if lam.shape[0] != batch:
            raise ValueError(f"lam must have one value per sample ({batch}), got {lam.shape}")
        return lam

    # ------------------------------------------------------------------ whole pipeline

    def generate(self, prompts: Sequence[str], seeds: Sequence[int],
                 h_retr: np.ndarray | None = None, lam: np.ndarray | None = None,
                 slerp_w: float | None = None, return_latents: bool = False,
                 z_init: np.ndarray | None = None):
        """One step at t=999, as ``pipeline.student_generate``: uint8 (B, H, W, 3). With
        ``h_retr`` (B, k, C, h', w'): the H-adapter with ``lam`` (paper Eq. 5), or slerp of
        the top-1 neighbour with target weight ``slerp_w`` (paper Eq. 3). ``z_init`` (B, C, h,
        w): for a neighbour-start export (``neighbour_start``), the top-1 neighbours' latents
        (``index.latents(neighbours.ids[:, 0])``): the step starts from them noised with z_T, at
        the export's start timestep, as the served retriever does."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        t0 = time.perf_counter()
        self.timings = {}
        z = initial_noise(seeds, self.latent_shape)                    # (B, 4, h, w)
        t = np.full((len(prompts),), self.timestep, dtype=np.int64)    # (B,)
        if z_init is not None:
            if self.neighbour_start is None or h_retr is None or slerp_w is not None:
                raise ValueError("z_init is a neighbour-start model's, with its adapter's "
                                 "retrieval: this export has no neighbour start, or no "
                                 "neighbours were given")
            z = start_from(z_init, z, self.neighbour_start)
            t[:] = int(self.neighbour_start["timestep"])
        if h_retr is not None:
            h_retr = np.asarray(h_retr, dtype=np.float32)
            if slerp_w is None and not self.has_adapter:
                raise ValueError("retrieved features given, but the export has no H-adapter "
                                 "and no slerp strength was set")
            if slerp_w is None and lam is None:
                raise ValueError("the H-adapter needs lam (B,): the retrieval similarity")
            if slerp_w is None:
                lam = self._check_retrieved(z.shape[0], h_retr, lam)
        ids = self.tokenize(prompts)
        if self.chain is not None:
            image, z0 = self.chain.generate(ids, z, t, h_retr, lam, slerp_w, self.timings)
            images = to_uint8(image)
            # a copy: on the CPU, numpy() of the preallocated fixed-shape buffer is a view that
            # the next call overwrites
            z0 = np.array(z0.numpy(), copy=True) if return_latents else None
        else:
            image, z0 = C.one_step(self.stage, z, t, ids=ids, h_retr=h_retr, lam=lam,
                                   slerp_w=slerp_w)
            images = to_uint8(image)
        self.timings["end_to_end"] = (time.perf_counter() - t0) * 1e3
        return (images, z0) if return_latents else images


def describe(path: str | Path) -> str:
    """One line per stage of an export folder (for the CLI)."""
    m = json.loads((Path(path) / MANIFEST).read_text())
    lines = [f"{path}: opset {m['opset']}, {m['dtype']}, source {m['source']['name']}"]
    for name in stage_names(m):
        st = m["stages"][name]
        ins = ", ".join(f"{v['name']}{v['shape']}" for v in st["inputs"])
        outs = ", ".join(f"{v['name']}{v['shape']}" for v in st["outputs"])
        lines.append(f"  {name:13s} {ins} -> {outs}")
    return "\n".join(lines)
