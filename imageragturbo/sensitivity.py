"""``imageragturbo bench sensitivity``: which route through the one-step student's UNet carries
a prompt's content to z_0, measured with forward passes.

The paper edits the mid-block feature h (H-space). That lever exists only if the decoder
reads h: if the text re-enters right after the mid-block, or the skips carry the content, an
edit of h changes little. For each of ``n`` evaluation prompts (seed as ``bench quality``'s
first seed), the relative change ||z0' - z0|| / ||z0|| when one input of the UNet decoder is
replaced, the rest kept:

- ``h := 0``: the mid-block feature removed;
- ``h := neighbour``: h replaced by the top-1 retrieved item's cached h, rescaled to the
  target's norm (slerp at w = 0, paper Eq. 3);
- ``h := other prompt``: h from the same z_T encoded with another prompt's text;
- ``skips := other prompt``: the encoder's skip tensors from the same z_T with another
  prompt's text;
- ``decoder text := other prompt``: another prompt's text states in the decoder's
  cross-attention.

"Another prompt" is the next one in the list (a cyclic shift), the same for every route.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imageragturbo.defaults import DEFAULT_MODEL


def relative_change(z: np.ndarray, z_ref: np.ndarray) -> np.ndarray:
    """Per sample ||z - z_ref|| / ||z_ref|| over all but the first axis."""
    d = (z - z_ref).reshape(len(z), -1)
    r = z_ref.reshape(len(z_ref), -1)
    return np.linalg.norm(d, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-12)


def run(model: str = DEFAULT_MODEL, n: int = 64, seed: int = 0,
        index: str | Path | None = None, progress: bool = True) -> dict:
    """The student as distilled (no adapter, no LoRA): mean and median relative change of z_0
    per route, and the UNet's block layout they were measured on."""
    import torch

    from . import shapesworld as sw
    from .evaluate import neighbours, noise_seeds
    from .model.family import load_components
    from .model.h_space import slerp_inject
    from .model.pipeline import encode_prompt, latent_shape
    from .model.stages import OneStepStudent
    from .runtime.request import initial_noise

    if n < 2:
        raise ValueError(f"n must be >= 2 (another prompt is needed), got {n}")
    c = load_components(model, retrieval_tuned=False)
    items = sw.make_split("eval", n, seed)
    prompts = [it.caption for it in items]
    seeds = noise_seeds(seed, n)[0].tolist()
    _, _, h_nb, _ = neighbours(model, c, prompts, 1, index, progress)
    student = OneStepStudent(c.unet, c.alphas_cumprod, c.scheduler.config.prediction_type)
    with torch.no_grad():
        ehs, _ = encode_prompt(c, prompts)
        other = torch.roll(ehs, 1, 0)
        z = torch.from_numpy(initial_noise(seeds, latent_shape(c)))
        t = torch.full((n,), 999, dtype=torch.long)
        h, temb, *skips = student.unet_encoder(z, t, ehs)
        h_o, _, *skips_o = student.unet_encoder(z, t, other)

        def dec(h_=h, skips_=skips, ehs_=ehs):
            return student.unet_decoder(h_, temb, skips_, ehs_, z, t).numpy()

        z0 = dec()
        h_retr = torch.from_numpy(h_nb[:, 0]).to(h.dtype)
        routes = {
            "h := 0": dec(h_=torch.zeros_like(h)),
            "h := neighbour": dec(h_=slerp_inject(h, h_retr, 0.0)),
            "h := other prompt": dec(h_=h_o),
            "skips := other prompt": dec(skips_=skips_o),
            "decoder text := other prompt": dec(ehs_=other),
        }
    cfg = c.unet.config
    out = {"model": str(model), "n": n,
           "layout": {"down": list(cfg.down_block_types), "mid": cfg.mid_block_type,
                      "up": list(cfg.up_block_types), "h": list(h.shape[1:])}}
    for name, z_new in routes.items():
        r = relative_change(z_new, z0)
        out[name] = {"mean": round(float(r.mean()), 4), "median": round(float(np.median(r)), 4)}
    return out


def markdown(results: dict[str, dict]) -> str:
    """One row per measured model: the mean relative change of z_0 per route."""
    routes = [k for k in next(iter(results.values())) if isinstance(
        next(iter(results.values()))[k], dict) and "mean" in next(iter(results.values()))[k]]
    lines = ["| model | layout (down / up) | " + " | ".join(routes) + " |",
             "|---|---|" + "---|" * len(routes)]
    for name, r in results.items():
        lay = r["layout"]
        short = " ".join(b.replace("CrossAttn", "X").replace("Block2D", "")
                         for b in lay["down"]) + " / " + " ".join(
            b.replace("CrossAttn", "X").replace("Block2D", "") for b in lay["up"])
        lines.append(f"| {name} | {short} | " + " | ".join(
            f"{100 * r[k]['mean']:.0f}%" for k in routes) + " |")
    return "\n".join(lines) + "\n"
