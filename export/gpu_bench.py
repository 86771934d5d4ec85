"""``imageragturbo bench sdturbo-gpu``: one-step latency of an SD-Turbo-sized model on a GPU,
exported in fp16 and run with the CUDA and TensorRT execution providers (the paper's Fig. 6
measures 512x512 images on one L40S: 113.8 ms SD-Turbo, 116.7 ms with retrieval).

The weights are random (latency does not depend on their values), built from SD 2.1's
configs: UNet block_out_channels (320, 640, 1280, 1280), attention_head_dim (5, 10, 20, 20),
cross_attention_dim 1024, layers_per_block 2, linear projections, sample_size 64; the
OpenCLIP-H text encoder (hidden 1024, 23 layers, 16 heads, intermediate 4096); the VAE
(128, 256, 512, 512); and the H-adapter at SD width (1280 channels, 20 heads of 64: ~36 M
parameters, the paper's "36M, 4%").

``--dry-run`` builds the same models on PyTorch's meta device (no memory, no weights), counts
their parameters and traces the stages' shapes at 512x512: a check that the script
constructs, runnable on any CPU. The real run needs a GPU with onnxruntime-gpu.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
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
    from imageragturbo.model.unet_split import split_unet

    c = sdturbo_components("meta", upcast_attention)
    lat = IMAGE_SIZE // 8
    with torch.device("meta"), torch.no_grad():
        ids = torch.zeros(batch, 77, dtype=torch.long)
        out = c.text_encoder(ids)
        z = torch.empty(batch, 4, lat, lat)
        t = torch.full((batch,), 999, dtype=torch.long)
        enc, dec = split_unet(c.unet)
        h, temb, *skips = enc(z, t, out.last_hidden_state)
        h2 = c.h_adapter(h, torch.empty(batch, 1, *h.shape[1:]), torch.empty(batch))
        eps = dec(h2, temb, skips, out.last_hidden_state)
        img = c.vae.decode(eps).sample
    unet_p = count_parameters(c.unet)
    ad_p = count_parameters(c.h_adapter)
    return {
        "dry_run": True,
        "parameters": {"text_encoder": count_parameters(c.text_encoder), "unet": unet_p,
                       "vae_decoder": count_parameters(c.vae.decoder)
                       + count_parameters(c.vae.post_quant_conv),
                       "h_adapter": ad_p},
        "adapter_share_of_unet": round(ad_p / unet_p, 4),
        "shapes": {"last_hidden_state": list(out.last_hidden_state.shape),
                   "pooled": list(out.pooler_output.shape), "h": list(h.shape),
                   "temb": list(temb.shape), "skips": [list(s.shape) for s in skips],
                   "z0": list(eps.shape), "image": list(img.shape)},
        "fp16_unet_bytes_estimate": unet_p * 2,
        "fp32_unet_over_2GB": unet_p * 4 > 2 * 1024**3,
    }


def _gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_gpu_bench(out: str | Path | None = None, providers=("cuda", "tensorrt"),
                  repeats: int = 20, warmup: int = 3, batch: int = 1, k: int = 1,
                  upcast_attention: bool = False, progress: bool = True) -> dict:
    """Export the SD-Turbo-sized model in fp16 to ``out`` (a temporary folder when None), then
    for each execution provider: per-stage and end-to-end median ms at 512x512."""
    import onnxruntime as ort

    from imageragturbo.runtime.pipeline import OnnxPipeline, choose_providers

    from .onnx_export import export_model

    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" not in avail:
        raise ValueError(f"no CUDA execution provider (onnxruntime offers {avail}): this "
                         "benchmark needs a GPU and onnxruntime-gpu; use --dry-run on a CPU")
    res: dict = {"device": _gpu_name(), "onnxruntime": ort.__version__, "image_size": IMAGE_SIZE,
                 "batch": batch, "k": k, "repeats": repeats, "providers": {}}
    tmp = tempfile.TemporaryDirectory() if out is None else None
    folder = Path(tmp.name if tmp else out)
    try:
        t0 = time.perf_counter()
        c = sdturbo_components("cpu", upcast_attention)
        res["build_seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        export_model(c, folder, source="sd-turbo-sized-random", fp16=True,
                     fp32_attention=upcast_attention, image_size=IMAGE_SIZE, overwrite=True,
                     progress=progress)
        res["export_seconds"] = round(time.perf_counter() - t0, 1)
        del c
        prompts = ["a photo of a red fox in the snow"] * batch
        seeds = list(range(batch))
        for name in providers:
            try:
                t0 = time.perf_counter()
                pipe = OnnxPipeline(folder, providers=choose_providers(
                    [name], fp16=True, cache_dir=folder / "trt_cache"))
                h_retr = np.random.default_rng(0).standard_normal(
                    (batch, k, *pipe.h_shape), dtype=np.float32)
                lam = np.full((batch,), 0.8, dtype=np.float32)
                pipe.generate(prompts, seeds, h_retr=h_retr, lam=lam)  # engine build / warm-up
                setup = time.perf_counter() - t0
                for _ in range(warmup):
                    pipe.generate(prompts, seeds, h_retr=h_retr, lam=lam)
                runs = []
                for _ in range(repeats):
                    pipe.generate(prompts, seeds, h_retr=h_retr, lam=lam)
                    runs.append(dict(pipe.timings))
                med = {s: round(statistics.median(r[s] for r in runs), 2) for s in runs[0]}
                res["providers"][name] = {"active": pipe.active_providers,
                                          "setup_seconds": round(setup, 1), "median_ms": med}
                del pipe
            except Exception as e:  # one provider failing must not lose the other's figures
                res["providers"][name] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        if tmp:
            tmp.cleanup()
    return res
