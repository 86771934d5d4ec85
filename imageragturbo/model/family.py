"""Model components: the tiny ShapesWorld family's configs, an SD 2.1-layout tiny random model
for tests, and one loader for any local diffusers folder (stabilityai/sd-turbo,
stable-diffusion-2-1-base, or the shipped ``tiny-shapes``).

Named variants (``VARIANTS``): ``tiny-shapes`` is the shipped default, a folder inside the
package; anything else is a path to a diffusers folder with the subfolders ``tokenizer``,
``text_encoder``, ``vae``, ``unet`` and ``scheduler`` (SD-Turbo / SD 2.1 layout). Optional
subfolders our training adds: ``teacher_unet`` (the multi-step teacher), ``h_adapter``,
``clip_scorer`` (the CLIP-score analogue's towers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from imageragturbo.defaults import (  # noqa: F401 - re-exported for callers of family
    DEFAULT_MODEL,
    LORA_DIR,
    VARIANTS,
    WEIGHTS_DIR,
    resolve,
)

# ----------------------------------------------------------------------------- tokenizer


@lru_cache(maxsize=4)
def clip_tokenizer(max_length: int = 77):
    """CLIP's BPE tokenizer as a transformers ``CLIPTokenizer``, built offline from the
    vocabulary that ships inside open_clip (the same BPE as OpenAI CLIP / OpenCLIP, which SD 2.1
    uses). Padding with "!" (id 0), as SD 2.1's tokenizer does."""
    import gzip
    import tempfile

    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer(open_clip.tokenizer.default_bpe())
    vocab = dict(st.encoder)
    # open_clip names the specials <start_of_text>/<end_of_text>; CLIP's HF files use these:
    for oc, hf in (("<start_of_text>", "<|startoftext|>"), ("<end_of_text>", "<|endoftext|>")):
        vocab[hf] = vocab.pop(oc)
    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1: 49152 - 256 - 2 + 1]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"),
                            pad_token="!", model_max_length=max_length)
    return tok


# ----------------------------------------------------------------------------- configs


def tiny_text_config(**kw):
    from transformers import CLIPTextConfig

    cfg = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
               num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
               projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    cfg.update(kw)
    return CLIPTextConfig(**cfg)


def tiny_vae_config() -> dict:
    """64x64 RGB <-> 16x16x4 latents (factor 4): 0.9 M parameters, trains in minutes here."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                mid_block_add_attention=False)


# The tiny UNet's block orders (``tiny_unet_config(layout=...)``), one level per entry.
UNET_LAYOUTS = {
    # The shipped tiny-shapes: attention at 8x8 and at the lowest level (4x4), none at 16x16.
    "reverse": (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # SD 2.1's rule: no attention at the lowest level on either side of the mid-block (SD 2.1:
    # down_blocks[3] DownBlock2D, up_blocks[0] UpBlock2D); the text re-enters the decoder one
    # level above H (8x8 here, as 16x16 of SD's 64x64 latents). SD 2.1 also attends at its
    # top level; here 16x16 has none (0.41 s instead of 0.24 s a teacher step on this CPU).
    "sd21": (("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


def tiny_unet_config(cross_attention_dim: int = 64, layout: str = "reverse") -> dict:
    """16x16x4 latents; H-space at 4x4 with 96 channels; one resnet per block, linear
    attention projections, the mid-block with cross-attention; ``layout`` names the block
    order (``UNET_LAYOUTS``): "reverse" (the shipped tiny-shapes, 3.7 M parameters) or "sd21"
    (SD 2.1's rule, no attention at the lowest level, 3.1 M).

    Measured with ``imageragturbo bench sensitivity`` (64 prompts, the students as distilled;
    docs/training.md, "H-space sensitivity"): replacing h by 0 moved z0 by 5% with "reverse"
    and by 3% with "sd21", while another prompt's skips moved it by 43% in both: in this tiny
    UNet the skips carry the content either way, so "sd21" did not make h the bottleneck and
    the shipped model keeps "reverse". Folders load with whatever order their config.json
    names."""
    if layout not in UNET_LAYOUTS:
        raise ValueError(f"unknown UNet layout {layout!r}; known: {', '.join(UNET_LAYOUTS)}")
    down, up = UNET_LAYOUTS[layout]
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(48, 96, 96), down_block_types=down, up_block_types=up,
                cross_attention_dim=cross_attention_dim, attention_head_dim=4,
                use_linear_projection=True, norm_num_groups=16)


def noise_schedule_config() -> dict:
    """SD 2.1 / SD-Turbo's noise schedule (scaled_linear betas, 1000 steps, epsilon)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                timestep_spacing="trailing")


def sd21_layout_tiny(seed: int = 0):
    """A tiny, randomly initialised model built with SD 2.1's exact classes and block layout
    (CLIPTextModel, UNet2DConditionModel with CrossAttnDownBlock2D x3 + DownBlock2D,
    linear projections, per-level head counts; AutoencoderKL with four levels;
    EulerDiscreteScheduler with SD-Turbo's trailing spacing) at toy widths: the stand-in for
    stabilityai/sd-turbo and stable-diffusion-2-1-base in tests, as diffusers' own tests do.

    128x128 images (16x16 latents) keep the mid-block at 2x2, as SD's 512x512 keeps it at
    8x8: at 1x1 its GroupNorm(32) normalised two values per group, an ill-conditioned toy
    whose fp32 rounding (2e-3 in either runtime) hid what an export parity test measures."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextModel(tiny_text_config(hidden_size=32, intermediate_size=37,
                                          num_hidden_layers=2, num_attention_heads=4))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=8,
    )
    sched = EulerDiscreteScheduler(**noise_schedule_config())
    return Components(tokenizer=clip_tokenizer(), text_encoder=text, vae=vae, unet=unet,
                      scheduler=sched)


def save_sd_folder(c: Components, path: str | Path) -> Path:
    """Write components as a diffusers folder (save_pretrained per subfolder)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c.tokenizer.save_pretrained(path / "tokenizer")
    c.text_encoder.save_pretrained(path / "text_encoder")
    c.vae.save_pretrained(path / "vae")
    c.unet.save_pretrained(path / "unet")
    c.scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", type(c.scheduler).__name__],
    }, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- loading


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(path: Path) -> None:
    """Weights load from safetensors only: a pickled file (which can run code when loaded)
    anywhere in a model folder is refused with its path named, not merely warned about."""
    pickled = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"refusing to load {path}: pickled weights {pickled[0]}"
                         f"{f' (and {len(pickled) - 1} more)' if len(pickled) > 1 else ''}; "
                         "models load from safetensors only: convert or remove the file")


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module                          # the one-step student (SD-Turbo's role)
    scheduler: object
    teacher_unet: torch.nn.Module | None = None    # the multi-step teacher (SD 2.1's role)
    h_adapter: torch.nn.Module | None = None
    neighbour_attention: torch.nn.Module | None = None  # beyond the paper (neighbour_attention)
    name: str = "model"
    # beyond the paper: a model trained with neighbour_init starts its step, with retrieval on,
    # from the top-1 neighbour's latent noised to {"timestep", "alpha_bar"} (pipeline.py)
    neighbour_start: dict | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    def eval(self) -> Components:
        for m in (self.text_encoder, self.vae, self.unet, self.teacher_unet, self.h_adapter,
                  self.neighbour_attention):
            if m is not None:
                m.eval().requires_grad_(False)
        return self


def load_components(model: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                    with_teacher: bool = False, retrieval_tuned: bool = True) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and scheduler from a variant name or a local
    diffusers folder (SD-Turbo / SD 2.1 layout), plus our optional subfolders.

    ImageRAGTurbo's fine-tuning (``imageragturbo train adapter``) adds ``h_adapter/`` and
    ``unet_lora/`` (the decoder LoRA, merged into the UNet here). ``retrieval_tuned=False``
    loads the one-step student as it was before that fine-tuning: no adapter, no LoRA."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve(model)
    missing = [s for s in ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
               if not (path / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} is not a diffusers text-to-image folder: missing "
                                f"subfolder(s) {', '.join(missing)}")
    refuse_pickled_weights(path)
    sched_cfg = EulerDiscreteScheduler.load_config(path / "scheduler")
    scheduler = EulerDiscreteScheduler.from_config(sched_cfg)
    c = Components(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype,
                                                   use_safetensors=True),
        vae=AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, use_safetensors=True),
        unet=UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype,
                                                  use_safetensors=True),
        scheduler=scheduler,
        name=str(model),
    )
    if with_teacher:
        if not (path / "teacher_unet").is_dir():
            raise FileNotFoundError(f"{path} has no teacher_unet subfolder")
        c.teacher_unet = UNet2DConditionModel.from_pretrained(path / "teacher_unet",
                                                              torch_dtype=dtype,
                                                              use_safetensors=True)
    if retrieval_tuned and (path / "h_adapter").is_dir():
        from .h_space import HAdapter

        c.h_adapter = HAdapter.from_pretrained(path / "h_adapter", torch_dtype=dtype)
    if retrieval_tuned and (path / LORA_DIR).is_dir():
        from .lora import merge_decoder_lora

        merge_decoder_lora(c.unet, path / LORA_DIR)
    if retrieval_tuned:
        attach_neighbour_attention(c, path)
        if c.h_adapter is not None:
            c.neighbour_start = neighbour_start_of(c, path / "adapter_training.json")
    return c.eval()


def attach_neighbour_attention(c: Components, path: str | Path) -> None:
    """Load ``path``'s ``neighbour_attention/`` (when there is one) into ``c`` and install it on
    the UNet decoder; after any LoRA merge, so that peft never wraps its projections."""
    from .neighbour_attention import FOLDER, NeighbourAttention

    if (Path(path) / FOLDER).is_dir():
        c.neighbour_attention = NeighbourAttention.from_pretrained(
            Path(path) / FOLDER, torch_dtype=next(c.unet.parameters()).dtype)
        c.neighbour_attention.attach(c.unet)


# The noise schedule's fields that a teacher must share with its student: the synthetic pairs
# are sampled, and the discriminator's inputs noised, with the student's scheduler.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                 "prediction_type")


def load_teacher_unet(folder: str | Path, student: Components,
                      dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The teacher UNet of ``student`` from a separate diffusers folder (SD 2.1-base beside
    SD-Turbo): its ``unet/``. The teacher reads the student's latents and text states, so it
    is refused, with what differs named, unless its latent channels and cross-attention width
    are the student's, its noise schedule (where the folder has ``scheduler/``) is the
    student's, and its ``text_encoder/`` and ``vae/`` (where the folder has them) hold the
    student's weights (SD 2.1-base and SD-Turbo share both)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = resolve(folder)
    if not (path / "unet").is_dir():
        raise FileNotFoundError(f"teacher {path} has no unet/ subfolder: give a diffusers "
                                "folder (e.g. stable-diffusion-2-1-base)")
    refuse_pickled_weights(path)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype,
                                                use_safetensors=True)
    mine, theirs = student.unet.config, unet.config
    text_dim = int(student.text_encoder.config.hidden_size)
    for what, want, got in (("latent channels in", mine.in_channels, theirs.in_channels),
                            ("latent channels out", mine.out_channels, theirs.out_channels),
                            ("cross-attention width (the student's text states)", text_dim,
                             theirs.cross_attention_dim)):
        if want != got:
            raise ValueError(f"teacher {path}: {what} {got}, the student's {want}: the teacher "
                             "must read the student's latents and text states")
    if (path / "scheduler").is_dir():
        sched = EulerDiscreteScheduler.load_config(path / "scheduler")
        for key in SCHEDULE_KEYS:
            want, got = student.scheduler.config.get(key), sched.get(key)
            if got is not None and got != want:
                raise ValueError(f"teacher {path}: scheduler {key} {got!r}, the student's "
                                 f"{want!r}: the teacher must share the student's noise "
                                 "schedule (SD 2.1-base does SD-Turbo's; SD 2.1-768 predicts v)")
    for sub, cls, module in (("text_encoder", CLIPTextModel, student.text_encoder),
                             ("vae", AutoencoderKL, student.vae)):
        if not (path / sub).is_dir():
            continue
        other = cls.from_pretrained(path / sub, torch_dtype=torch.float32,
                                    use_safetensors=True).state_dict()
        ours = module.state_dict()
        diff = sorted(set(ours) ^ set(other)) or [
            k for k in ours if ours[k].shape != other[k].shape
            or not torch.allclose(ours[k].float(), other[k], rtol=2e-3, atol=1e-4)]
        if diff:
            raise ValueError(f"teacher {path}: its {sub}/ is not the student's (first "
                             f"difference: {diff[0]}); the teacher reads the student's text "
                             "states and latents, so both models must share the text encoder "
                             "and the VAE (SD 2.1-base and SD-Turbo do)")
        del other
    return unet.eval()


# ----------------------------------------------------------------------------- schedules


def ddim_scheduler(c: Components):
    from diffusers import DDIMScheduler

    cfg = dict(c.scheduler.config)
    return DDIMScheduler.from_config(cfg, clip_sample=False, set_alpha_to_one=False,
                                     timestep_spacing="trailing")


def sdedit_keep(steps: int, strength: float) -> int:
    """How many of ``steps`` DDIM steps an SDEdit at ``strength`` runs (the last ones)."""
    return max(1, round(strength * steps))


def sdedit_timestep(c: Components, steps: int, strength: float) -> int:
    """The timestep an SDEdit of ``steps`` DDIM steps (trailing spacing) at ``strength``
    starts from: where ``teacher_sample_latents`` noises ``z_init`` to, and where a
    ``neighbour_init`` student starts from its noised neighbour."""
    sched = ddim_scheduler(c)
    sched.set_timesteps(steps)
    return int(sched.timesteps[steps - sdedit_keep(steps, strength)])


def neighbour_start_of(c: Components, record: str | Path) -> dict | None:
    """A retrieval fine-tuning run's start (``adapter_training.json`` of a run's export or of
    the model folder it was installed into): for a run trained with ``neighbour_init`` (beyond
    the paper), {"timestep": t, "alpha_bar": alphas_cumprod[t]}: with retrieval on, its one
    step starts at t from the top-1 neighbour's latent noised with z_T; with "pool": P when
    its starts were drawn from the top P neighbours in training (``start_pool``), the pool it
    is served with by default (``serve --neighbour-pool``). None otherwise."""
    import json

    record = Path(record)
    cfg = json.loads(record.read_text()).get("config", {}) if record.is_file() else {}
    if not cfg.get("neighbour_init"):
        return None
    t = sdedit_timestep(c, int(cfg["synth_steps"]), float(cfg["neighbour_sdedit"]))
    pool = int(cfg.get("start_pool", 1))
    return {"timestep": t, "alpha_bar": float(c.alphas_cumprod[t]),
            **({"pool": pool} if pool > 1 else {})}
