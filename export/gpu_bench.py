"""``imageragturbo bench sdturbo-gpu``: one-step latency of an SD-Turbo-sized model on a GPU,
exported in fp16 and run with the CUDA and TensorRT execution providers (the paper's Fig. 6
measures 512x512 images on one L40S: 113.8 ms SD-Turbo, 116.7 ms with retrieval).

The weights are random (latency does not depend on their values), built from SD 2.1's
configs: UNet block_out_channels (320, 640, 1280, 1280), attention_head_dim (5, 10, 20, 20),
cross_attention_dim 1024, layers_per_block 2, linear projections, sample_size 64; the
OpenCLIP-H text encoder (hidden 1024, 23 layers, 16 heads, intermediate 4096); the VAE
(128, 256, 512, 512); and the H-adapter at SD width (1280 channels, 20 heads of 64: ~36 M
parameters, the paper's "36M, 4%").

The real run is the GPU yardstick (issue 14), all figures from one process on one GPU, the
model exported once: PyTorch eager fp16 (the export's own stage modules on CUDA), ONNX Runtime
CUDA plain (numpy in and out of every stage), the same sessions with IO binding (values stay on
the GPU between stages), the fixed-shape profile with CUDA graphs per batch size
(``OnnxPipeline(static_batch=B, cuda_graph=True)``; without graphs when ORT refuses them, the
refusal recorded), and TensorRT when asked for and its provider library is there. Each at every
batch size, without retrieval and with the adapter on k random neighbours, per stage and end to
end (median ms). Peak GPU memory: ``torch.cuda.max_memory_allocated`` for PyTorch; for ONNX
Runtime, nvidia-smi's GPU-wide ``memory.used`` after the timed runs minus before the sessions
were built (ORT's CUDA arena keeps what it grew to, so that is its peak plus arena rounding).
Memcpy nodes per graph: counted in the optimized graph each session writes (``count_ops``).
``gpu_report`` writes the JSON, the Fig. 6-style PNG and the summary.

``--dry-run`` builds the same models on PyTorch's meta device (no memory, no weights), counts
their parameters and traces the stages' shapes at 512x512: a check that the script
constructs, runnable on any CPU. The real run needs a GPU with onnxruntime-gpu.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from imageragturbo.model import family
from imageragturbo.model.h_space import HAdapter, count_parameters, sd21_adapter_config

IMAGE_SIZE = 512


def sdturbo_text_config():
    """OpenCLIP ViT-H/14's text tower as SD 2.1 uses it (the penultimate layer: 23 layers)."""
    return family.tiny_text_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                   num_attention_heads=16, projection_dim=1024)


def sdturbo_unet_config(upcast_attention: bool = False) -> dict:
    """SD 2.1-base / SD-Turbo's UNet2DConditionModel config."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=upcast_attention)


def sdturbo_vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                scaling_factor=0.18215)


def sdturbo_components(device: str = "cpu", upcast_attention: bool = False,
                       seed: int = 0) -> family.Components:
    """An SD-Turbo-sized model with random weights (on ``device``; "meta" allocates nothing),
    with a fresh SD-width H-adapter."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        text = CLIPTextModel(sdturbo_text_config())
        unet = UNet2DConditionModel(**sdturbo_unet_config(upcast_attention))
        vae = AutoencoderKL(**sdturbo_vae_config())
        adapter = HAdapter(sd21_adapter_config())
    sched = EulerDiscreteScheduler(**family.noise_schedule_config())
    return family.Components(tokenizer=family.clip_tokenizer(), text_encoder=text, vae=vae,
                             unet=unet, scheduler=sched, h_adapter=adapter,
                             name="sd-turbo-sized-random").eval()


def dry_run(upcast_attention: bool = False, batch: int = 1) -> dict:
    """Construct the models on the meta device and trace each stage's output shapes at 512x512."""
    from imageragturbo.client import contract as C
    from imageragturbo.defaults import STUDENT_TIMESTEP
    from imageragturbo.model.stages import (
        FlatUNetDecoder,
        TextEncoder,
        UNetDecoder,
        UNetEncoder,
        VAEDecoder,
        runner,
    )

    c = sdturbo_components("meta", upcast_attention)
    lat = IMAGE_SIZE // 8
    seen: dict = {}
    modules = {C.TEXT_ENCODER: TextEncoder(c.text_encoder), C.UNET_ENCODER: UNetEncoder(c.unet),
               C.H_ADAPTER: c.h_adapter,
               C.UNET_DECODER: FlatUNetDecoder(UNetDecoder(c.unet, c.alphas_cumprod)),
               C.VAE_DECODER: VAEDecoder(c.vae)}

    run = runner(modules)

    def record(stage, *inputs):  # run, keeping each stage's outputs for the report
        seen[stage] = run(stage, *inputs)
        return seen[stage]

    with torch.device("meta"), torch.no_grad():
        ids = torch.zeros(batch, 77, dtype=torch.long)
        z = torch.empty(batch, 4, lat, lat)
        t = torch.full((batch,), STUDENT_TIMESTEP, dtype=torch.long)
        down = 2 ** (len(c.unet.config.block_out_channels) - 1)
        h_shape = (c.unet.config.block_out_channels[-1], lat // down, lat // down)
        img, z0 = C.one_step(record, z, t, ids=ids, h_retr=torch.empty(batch, 1, *h_shape),
                             lam=torch.empty(batch))
    ehs, pooled = seen[C.TEXT_ENCODER]
    h, temb, *skips = seen[C.UNET_ENCODER]
    unet_p = count_parameters(c.unet)
    ad_p = count_parameters(c.h_adapter)
    return {
        "dry_run": True,
        "parameters": {C.TEXT_ENCODER: count_parameters(c.text_encoder), "unet": unet_p,
                       C.VAE_DECODER: count_parameters(c.vae.decoder)
                       + count_parameters(c.vae.post_quant_conv),
                       C.H_ADAPTER: ad_p},
        "adapter_share_of_unet": round(ad_p / unet_p, 4),
        "shapes": {C.LAST_HIDDEN_STATE: list(ehs.shape),
                   C.POOLED: list(pooled.shape), C.H: list(h.shape),
                   C.TEMB: list(temb.shape), "skips": [list(s.shape) for s in skips],
                   C.Z0: list(z0.shape), C.IMAGE: list(img.shape)},
        "fp16_unet_bytes_estimate": unet_p * 2,
        "fp32_unet_over_2GB": unet_p * 4 > 2 * 1024**3,
    }


def _smi(query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                               "--id=0"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _gpu_name() -> str:
    return _smi("name") or "unknown"


def _gpu_used_mib() -> float | None:
    """nvidia-smi's memory.used of GPU 0 (MiB), GPU-wide; None without nvidia-smi."""
    try:
        return float(_smi("memory.used"))
    except ValueError:
        return None


def _free(gpu: bool) -> None:
    """Drop what the last configuration left (sessions, torch's cached blocks), so the next one's
    memory figure starts from the same floor."""
    import gc

    gc.collect()
    if gpu:
        torch.cuda.empty_cache()


def _medians(call: Callable[[], dict], warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per key of the timings dicts ``call`` returns, after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    runs = [call() for _ in range(repeats)]
    return {s: round(statistics.median(r[s] for r in runs), 3) for s in runs[0]}


def _inputs(batch: int, k: int, h_shape: Sequence[int]):
    import numpy as np

    rng = np.random.default_rng(0)
    h_retr = rng.standard_normal((batch, k, *h_shape), dtype=np.float32)
    lam = np.full((batch,), 0.8, dtype=np.float32)
    return ["a photo of a red fox in the snow"] * batch, list(range(batch)), h_retr, lam


def bench_torch_eager(c: family.Components, res: dict, batches: Sequence[int], k: int,
                      warmup: int, repeats: int, device: str = "cuda",
                      image_size: int | None = IMAGE_SIZE) -> None:
    """PyTorch eager fp16 on CUDA: the export's stage modules (``stage_specs``: the very
    computation each graph holds), chained as ``OnnxPipeline.generate`` chains the graphs, a
    synchronize after each stage so the per-stage times add up. ``device="cpu"`` (fp32) is
    the smoke test's way through the same code."""
    from imageragturbo.client import contract as C
    from imageragturbo.defaults import STUDENT_TIMESTEP
    from imageragturbo.model.pipeline import to_uint8_images, tokenize
    from imageragturbo.model.stages import runner
    from imageragturbo.runtime.request import initial_noise

    from .onnx_export import stage_specs

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    specs = {s.name: s for s in stage_specs(c, c.h_adapter, batch=1, k=1,
                                            image_size=image_size)}
    h_shape = tuple(specs[C.H_ADAPTER].args[0].shape[1:])             # (C, h', w')
    lat = tuple(specs[C.UNET_ENCODER].args[0].shape[1:])              # (4, h, w)
    mods = {name: s.module.to(dev, dtype).eval() for name, s in specs.items()}
    cfg = res["configs"].setdefault("torch_eager", {"memory_mib": {},
                                                    "memory_source": "max_memory_allocated"})
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    @torch.inference_mode()
    def call(prompts, seeds, h_retr, lam, retrieval: bool) -> dict:
        tm: dict = {}
        t0 = time.perf_counter()
        marks: list[float] = []

        def after(stage):
            sync()
            marks.append(time.perf_counter())
            tm[stage] = (marks[-1] - marks[-2]) * 1e3

        ids = tokenize(c.tokenizer, prompts).to(dev)
        z = torch.from_numpy(initial_noise(seeds, lat)).to(dev, dtype)
        t = torch.full((len(seeds),), STUDENT_TIMESTEP, dtype=torch.long, device=dev)
        marks.append(time.perf_counter())  # each stage's time: from the previous mark
        img, _ = C.one_step(runner(mods, after), z, t, ids=ids,
                            h_retr=h_retr if retrieval else None, lam=lam)
        to_uint8_images(img)
        tm["end_to_end"] = (time.perf_counter() - t0) * 1e3
        return tm

    for b in batches:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        prompts, seeds, h_retr, lam = _inputs(b, k, h_shape)
        h_retr = torch.from_numpy(h_retr).to(dev, dtype)
        lam = torch.from_numpy(lam).to(dev, dtype)
        for retrieval in (False, True):
            args = (prompts, seeds, h_retr, lam, retrieval)
            med = _medians(lambda a=args: call(*a), warmup, repeats)
            res["runs"].append({"config": "torch_eager", "batch": b, "retrieval": retrieval,
                                "median_ms": med})
        if cuda:
            cfg["memory_mib"][str(b)] = round(torch.cuda.max_memory_allocated() / 2**20, 1)



def bench_ort(res: dict, name: str, make: Callable, batches: Sequence[int], k: int,
              warmup: int, repeats: int,
              variants: Sequence[tuple[str, bool | None]] = (("", None),),
              opt_dir: Path | None = None) -> None:
    """One ONNX Runtime session set (``make()`` -> OnnxPipeline), timed at each batch without
    and with retrieval; ``variants`` (suffix, io_binding) rerun the same sessions with the
    device chain (None: as built). Records setup time, memory (nvidia-smi delta) and Memcpy counts; an error is
    recorded under ``name`` and the run goes on (one configuration failing must not lose the
    others' figures)."""
    from imageragturbo.runtime import device

    before = _gpu_used_mib()
    try:
        t0 = time.perf_counter()
        pipe = make()
        tag = f" b{pipe.static[0]}" if pipe.static else ""           # one profile per batch
        info = {"active": pipe.active_providers,
                "graph_stages": {tag.strip() or "all": list(getattr(pipe, "graph_stages", []))},
                "setup_seconds": {tag.strip() or "all": round(time.perf_counter() - t0, 1)},
                "memory_source": "nvidia-smi memory.used delta (GPU-wide)"}
        if opt_dir is not None:
            ops = {s: device.count_ops(opt_dir / f"{s}.onnx") for s in pipe.sessions}
            info["memcpy"] = {s + tag: o.get("Memcpy", 0) for s, o in ops.items()}
            info["shape_nodes"] = {s + tag: o.get("Shape", 0) for s, o in ops.items()}
        for suffix, bound in variants:
            cfg = res["configs"].setdefault(name + suffix, {"memory_mib": {}})
            for key, val in info.items():
                cfg[key] = {**cfg.get(key, {}), **val} if isinstance(val, dict) else val
            if bound is not None:    # the same sessions, values kept on the GPU or not
                pipe.io_binding = bound
            for b in batches:
                prompts, seeds, h_retr, lam = _inputs(b, k, pipe.h_shape)
                for retrieval in (False, True):
                    kw = {"h_retr": h_retr, "lam": lam} if retrieval else {}

                    def call(kw=kw, p=prompts, s=seeds):
                        pipe.generate(p, s, **kw)
                        return dict(pipe.timings)

                    res["runs"].append({"config": name + suffix, "batch": b,
                                        "retrieval": retrieval,
                                        "median_ms": _medians(call, warmup, repeats)})
                after = _gpu_used_mib()
                if before is not None and after is not None:
                    cfg["memory_mib"][str(b)] = after - before
    except Exception as e:  # noqa: BLE001 - recorded in the report, the run goes on
        res["configs"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"


def run_gpu_bench(out: str | Path | None = None, providers=("cuda",), repeats: int = 20,
                  warmup: int = 3, batches: Sequence[int] = (1,), k: int = 1,
                  upcast_attention: bool = False, progress: bool = True,
                  reuse_export: bool = False, cuda_graph: bool = True,
                  torch_eager: bool = True, device: str = "cuda",
                  checkpoint: Callable[[dict], object] | None = None) -> dict:
    """Export the SD-Turbo-sized model in fp16 to ``out`` (a temporary folder when None; kept
    and reused with ``reuse_export`` when it holds one), then time every configuration (module
    docstring) at each of ``batches``. Returns the result dict ``gpu_report`` writes.

    ``device="cpu"``: the same orchestration on the SD 2.1-layout toy with the CPU provider
    (torch in fp32, the fixed-shape profile without CUDA graphs): the CPU smoke test of this
    code, so that a GPU run does not find its bugs. ``checkpoint(res)`` is called after each
    configuration (the CLI writes the report there, so a run cut short keeps its figures)."""
    import onnxruntime as ort

    from imageragturbo.runtime.manifest import MANIFEST
    from imageragturbo.runtime.pipeline import OnnxPipeline, choose_providers

    from .onnx_export import export_model

    avail = ort.get_available_providers()
    gpu = device == "cuda"
    if gpu and "CUDAExecutionProvider" not in avail:
        raise ValueError(f"no CUDA execution provider (onnxruntime offers {avail}): this "
                         "benchmark needs a GPU and onnxruntime-gpu; use --dry-run on a CPU")
    batches = [int(b) for b in batches]
    providers = list(providers) if gpu else ["cpu"]
    size = IMAGE_SIZE if gpu else None
    res: dict = {"device": _gpu_name() if gpu else "cpu (smoke test)",
                 "onnxruntime": ort.__version__, "torch": torch.__version__,
                 "image_size": size or "model default", "batches": batches,
                 "k": k, "repeats": repeats, "warmup": warmup, "runs": [], "configs": {}}
    tmp = tempfile.TemporaryDirectory() if out is None else None
    folder = Path(tmp.name if tmp else out)
    opt_root = Path(tempfile.mkdtemp(prefix="irt-optimized-"))
    save = checkpoint or (lambda r: None)
    try:
        t0 = time.perf_counter()
        if gpu:
            c = sdturbo_components("cpu", upcast_attention)
        else:
            from imageragturbo.model.h_space import adapter_config_for

            c = family.sd21_layout_tiny(seed=0)
            c.h_adapter = HAdapter(adapter_config_for(c.unet))
        res["build_seconds"] = round(time.perf_counter() - t0, 1)
        if reuse_export and (folder / MANIFEST).exists():
            res["export_seconds"] = "reused"
        else:
            t0 = time.perf_counter()
            export_model(c, folder, source="sd-turbo-sized-random", fp16=True,
                         fp32_attention=upcast_attention, image_size=size,
                         overwrite=True, progress=progress)
            res["export_seconds"] = round(time.perf_counter() - t0, 1)
        if torch_eager:
            t0 = time.perf_counter()
            try:
                bench_torch_eager(c, res, batches, k, warmup, repeats, device, size)
            except Exception as e:  # noqa: BLE001 - recorded, the ORT figures still come
                res["configs"].setdefault("torch_eager", {})["error"] = f"{type(e).__name__}: {e}"
            res["torch_seconds"] = round(time.perf_counter() - t0, 1)
            save(res)
        del c
        _free(gpu)
        for prov in providers:
            if prov == "tensorrt" and "TensorrtExecutionProvider" not in avail:
                res["configs"]["ort_tensorrt"] = {"error": "TensorRT provider not available"}
                continue
            name = f"ort_{prov}"
            opt = opt_root / name
            bench_ort(res, name, lambda p=prov, o=opt: OnnxPipeline(
                folder, providers=choose_providers([p], fp16=True, cache_dir=folder / "trt"),
                io_binding=False, optimized_dir=o), batches, k, warmup, repeats,
                variants=(("", False), ("_iobinding", True)), opt_dir=opt)
            _free(gpu)
            save(res)
        for b in batches if providers else []:   # the fixed-shape profile, one per batch
            prov, t0 = providers[0], time.perf_counter()
            name, graph = f"ort_{prov}_static", gpu and cuda_graph and providers[0] == "cuda"
            opt = opt_root / f"static-b{b}"

            def make(b=b, o=opt, graph=graph, prov=prov):
                return OnnxPipeline(folder, providers=choose_providers([prov]), static_batch=b,
                                    static_k=k, io_binding=True, cuda_graph=graph,
                                    optimized_dir=o)

            if graph:
                bench_ort(res, "ort_cuda_graph", make, [b], k, warmup, repeats, opt_dir=opt)
            # the same profile without CUDA graphs, for the comparison
            bench_ort(res, name, lambda m=make: m(graph=False), [b], k, warmup, repeats,
                      opt_dir=opt)
            res.setdefault("static_seconds", {})[str(b)] = round(time.perf_counter() - t0, 1)
            _free(gpu)
            save(res)
    finally:
        import shutil

        shutil.rmtree(opt_root, ignore_errors=True)
        if tmp:
            tmp.cleanup()
    return res
