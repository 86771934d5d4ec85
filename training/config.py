"""The two training recipes' configurations, in the standard library only, so that the CLI's
``--help`` shows their defaults without importing torch: ``RecipeConfig`` (the tiny family,
``base.Recipe``) and ``AdapterConfig`` (ImageRAGTurbo fine-tuning, ``adapter.AdapterRun``).
A run folder records the configuration it was started with (``stages.StagedRun``)."""

from __future__ import annotations

from dataclasses import dataclass

from imageragturbo.defaults import DEFAULT_MODEL, RERANK_CANDIDATES


@dataclass
class RecipeConfig:
    seed: int = 0                 # data and initialisation seed
    context_length: int = 24      # tokens the UNet attends to (captions need <= 20; SD uses 77)
    n_train: int = 20000          # ShapesWorld training items
    threads: int = 2              # torch CPU threads
    clip_steps: int = 1500
    clip_batch: int = 128
    clip_lr: float = 1e-3
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    teacher_steps: int = 8000     # batch 32 x 8,000 beat 64 x 4,000 at the same compute
    teacher_batch: int = 32
    teacher_lr: float = 1e-3
    teacher_min_snr: float = 5.0  # Min-SNR-gamma loss weighting; 0 = plain epsilon MSE
    teacher_text_lr: float = 2.5e-4  # > 0: fine-tune the text encoder with the teacher
    text_anchor: float = 1.0      # weight of MSE(pooled, the clip stage's pooled) when it does
    teacher_channels: tuple = (48, 96, 96)
    unet_layout: str = "reverse"  # block order (family.UNET_LAYOUTS): "reverse" (shipped) or "sd21"
    cfg_drop: float = 0.1         # caption dropout for classifier-free guidance
    ema: float = 0.999
    synth_prompts: int = 4000
    synth_steps: int = 25
    guidance: float = 4.0         # teacher CFG scale for synthetic data and evaluation
    student_steps: int = 2000
    student_batch: int = 32
    student_lr: float = 2e-4
    disc_lr: float = 2e-4
    distill_weight: float = 5.0   # alpha of paper Eq. 10 (2.5: student 0.338 / FD 54.0; 5: 0.366 / 50.2)
    disc_s_max: int = 750         # discriminator noise level s ~ U{0..s_max-1}
    ckpt_every: int = 250

    @classmethod
    def quick(cls) -> RecipeConfig:
        """A few steps of everything on a small data set: checks the recipe end to end."""
        return cls(n_train=256, clip_steps=6, clip_batch=32, vae_steps=6, vae_batch=8,
                   teacher_steps=6, teacher_batch=16, synth_prompts=16, synth_steps=2,
                   student_steps=4, student_batch=8, ckpt_every=3)


@dataclass
class AdapterConfig:
    model: str = DEFAULT_MODEL    # the one-step student to fine-tune (a variant or a folder)
    seed: int = 0
    teacher: str | None = None    # a diffusers folder whose unet/ is the teacher (SD 2.1-base
    #                               beside SD-Turbo); None: the student folder's teacher_unet/
    pairs: tuple = ()             # real pairs: JSONL / Parquet / WebDataset .tar files, or
    #                               ("shapesworld",); () means ShapesWorld unless prompts are given
    prompts: str | None = None    # prompts for the teacher's synthetic pairs (.txt or .jsonl);
    #                               None: the real pairs' captions
    min_image_side: int = 0       # pairs: an image whose shorter side is below this is skipped
    #                               as too small; 0: half the student's resolution
    max_bad_share: float = 0.05   # pairs: more than this share of bad images stops the run
    n_train: int = 10000          # ShapesWorld training items: real pairs and target prompts
    threads: int = 2
    synth_prompts: int = 1500     # teacher samples (synthetic pairs) for training prompts
    synth_steps: int = 25
    guidance: float = 4.0
    real_fraction: float = 0.0    # of each batch: real renders (0.5 measured worse); the
    #                               rest the teacher's synthetic pairs
    retrieval: str = "index"      # "index": k neighbours from the index; "none": the control
    k_max: int = 4                # neighbours cached per target; each step draws k in 1..k_max
    rerank: int = RERANK_CANDIDATES  # neighbours: the dense top N re-ranked by the caption's
    #                               words, as served (0: dense only)
    lam: str = "similarity"       # lambda of Eq. 5: "similarity" (top-1 cosine) or "one"
    lora: bool = True             # LoRA on the decoder (see lora_targets)
    lora_rank: int = 8
    lora_targets: str = "decoder"  # "attention" projections, or the whole "decoder" (+convs)
    real_input: str = "noised"    # real pairs' z_T: q(z_999 | z_0) ("noised") or pure "noise"
    text_drop: float = 0.5        # the student sees the empty prompt for this share of a batch
    positional: bool = False      # the adapter's tokens carry their 2-D position (h_space)
    scene_neighbour: float = 0.0  # augmentation: share of the teacher targets whose neighbours
    #                               are a jittered re-render of the target prompt's own scene
    #                               (never an index item); > 0 also gives every real target its
    #                               scene's re-render, so its layout is in the neighbour
    steps: int = 1500             # ~13 min on this CPU (700 steps at batch 24 took 263 s on
    #                               one thread, 2026-12-04), ~2 min on a GPU
    batch: int = 32
    adapter_lr: float = 1e-3
    lora_lr: float = 2e-4
    disc_lr: float = 2e-4
    distill_weight: float = 5.0   # alpha of Eq. 10 (the paper: 2.5; the student stage: 5)
    perceptual_weight: float = 1.0  # beta of Eq. 10 (the paper's); 0 drops Eq. 9
    adv_weight: float = 0.0       # weight of L_adv in Eq. 10 (the paper: 1; measured worse here)
    disc_s_max: int = 750         # discriminator noise level s ~ U{0..s_max-1}
    ckpt_every: int = 100
    shard_mb: float = 256.0       # data / synth caches: shards of about this many MiB each,
    #                               streamed in training (training/shards.py)
    shuffle_buffer: int = 2048    # training: items held in the streams' shuffle buffers
    mixed_precision: str = "no"   # training's forward passes: "no", "bf16" or "fp16" autocast
    gradient_checkpointing: bool = False  # the student UNet recomputes activations in backward
    validation_every: int = 0     # > 0: a PNG grid (with / without retrieval) every N steps
    checkpoints_total_limit: int = 2  # train: accelerate checkpoints kept (the newest)
    decoder_attention: bool = False  # beyond the paper: the decoder's cross-attention layers
    #                               also attend to the neighbours' tokens (IP-Adapter style,
    #                               model/neighbour_attention.py)
    decoder_attention_lr: float = 1e-3
    neighbour_sdedit: float = 0.0  # beyond the paper: > 0 starts the teacher's synthetic
    #                               targets from their top-1 neighbour's latent (SDEdit at this
    #                               strength) instead of from z_T, so the target shares the
    #                               neighbour's layout; 0 = the paper's pairs
    neighbour_init: bool = False  # beyond the paper (needs neighbour_sdedit): the student's
    #                               input for those targets is the one the teacher started
    #                               from (the top-1 neighbour's latent noised to the SDEdit
    #                               timestep), so it learns SDEdit in one step; served with
    #                               the neighbour's latent as the start (retrieval on) or pure
    #                               noise at t = 999 (retrieval off)
    plain_fraction: float = 0.0   # beyond the paper (needs neighbour_init): this share of each
    #                               batch's teacher targets are the teacher's plain samples
    #                               from z_T, given to the student at t = 999 with retrieval
    #                               off (no adapter), so that the served K = 0 path stays the
    #                               student's instead of decaying while it learns the SDEdit
    start_pool: int = 1           # beyond the paper (with neighbour_sdedit): each target's
    #                               SDEdit start is drawn (by the run's seed) from its top
    #                               start_pool neighbours, not always the top-1; served with
    #                               --neighbour-pool, the neighbour drawn by the request's seed

    def __post_init__(self) -> None:
        if self.decoder_attention and self.retrieval == "none":
            raise ValueError("decoder_attention needs retrieval: the control has no neighbours")
        if self.retrieval not in ("index", "none"):
            raise ValueError(f"retrieval must be 'index' or 'none', got {self.retrieval!r}")
        if self.lam not in ("similarity", "one"):
            raise ValueError(f"lam must be 'similarity' or 'one', got {self.lam!r}")
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        if self.neighbour_sdedit > 0 and self.retrieval == "none":
            raise ValueError("neighbour_sdedit needs retrieval: the control has no neighbours")
        if self.neighbour_init and not self.neighbour_sdedit > 0:
            raise ValueError("neighbour_init needs neighbour_sdedit > 0: the student starts "
                             "where the teacher's SDEdit started")
        if self.plain_fraction > 0 and not self.neighbour_init:
            raise ValueError("plain_fraction needs neighbour_init: without it every target "
                             "already starts from z_T at t = 999")
        if self.start_pool != 1 and not self.neighbour_sdedit > 0:
            raise ValueError("start_pool needs neighbour_sdedit > 0: it chooses the neighbour "
                             "the teacher's SDEdit starts from")
        if not 1 <= self.start_pool <= self.k_max:
            raise ValueError(f"start_pool must be in [1, k_max = {self.k_max}] (the neighbours "
                             f"cached per target), got {self.start_pool}")
        for name in ("real_fraction", "scene_neighbour", "text_drop", "max_bad_share",
                     "neighbour_sdedit", "plain_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.pairs = tuple(str(p) for p in self.pairs)
        if "shapesworld" in self.pairs and len(self.pairs) > 1:
            raise ValueError("pairs: 'shapesworld' cannot be mixed with pairs files")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got "
                             f"{self.mixed_precision!r}")
        if self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be >= 1")
        if self.validation_every < 0:
            raise ValueError(f"validation_every must be >= 0, got {self.validation_every}")
        if self.shard_mb <= 0 or self.shuffle_buffer < 1:
            raise ValueError("shard_mb must be > 0 and shuffle_buffer >= 1")
        if self.min_image_side < 0:
            raise ValueError(f"min_image_side must be >= 0, got {self.min_image_side}")
        if self.scene_neighbour > 0 and (not self.shapesworld or self.prompts):
            raise ValueError("scene_neighbour re-renders the training items' ShapesWorld "
                             "scenes: it needs ShapesWorld's pairs, without pairs files or "
                             "prompts")
        if not self.pairs and self.prompts and self.real_fraction > 0:
            raise ValueError("real_fraction > 0 needs real pairs (pairs), not prompts alone")

    @property
    def shapesworld(self) -> bool:
        """Whether the real pairs are ShapesWorld's training split (the shipped recipe)."""
        return self.pairs == ("shapesworld",) or (not self.pairs and not self.prompts)

    @classmethod
    def quick(cls, **kw) -> AdapterConfig:
        """A few steps of everything on a small data set: checks the recipe end to end."""
        base = dict(n_train=64, synth_prompts=16, synth_steps=2, steps=4, batch=8,
                    ckpt_every=2)
        base.update(kw)
        return cls(**base)
