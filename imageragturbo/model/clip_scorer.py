"""The CLIP-score analogue for ShapesWorld: a small image tower trained contrastively
(open_clip's ClipLoss) against the family's CLIP text encoder plus a text projection.

``ClipScorer.score`` is the mean cosine similarity of an image's and its prompt's embeddings,
the quantity the paper's Table 1 reports as "CLIP" (0.319 for SD-Turbo with ViT-bigG-14).
``ClipScorer.image_features`` (the tower's penultimate activations) are the fixed feature
network of the Frechet distance (FID's analogue).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from .pretrained import PretrainedModule, takes_config
from .stages import images_to_unit


@dataclass
class ClipScorerConfig:
    embed_dim: int = 64       # joint embedding width
    text_dim: int = 64        # the text encoder's hidden size
    width: int = 32           # first conv width of the image tower (doubles per stage)
    image_size: int = 64


class ImageTower(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> (B, embed_dim). Four stride-2 conv stages, then a linear
    layer over the whole 4x4 map (not a global pool: positions and relations matter)."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.width
        chans = [3, w, 2 * w, 4 * w, 4 * w]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        side = cfg.image_size // 16
        self.fc = nn.Linear(chans[-1] * side * side, 4 * w)
        self.proj = nn.Linear(4 * w, cfg.embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.fc(self.convs(x).flatten(1)))   # (B, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))                            # (B, E)


class ClipScorer(PretrainedModule):
    """The image tower and the text projection; built from a ``ClipScorerConfig`` or its fields
    as keyword arguments, saved and loaded as diffusers' models are
    (``pretrained.PretrainedModule``)."""

    @takes_config
    @register_to_config
    def __init__(self, embed_dim: int = ClipScorerConfig.embed_dim,
                 text_dim: int = ClipScorerConfig.text_dim, width: int = ClipScorerConfig.width,
                 image_size: int = ClipScorerConfig.image_size):
        super().__init__()
        self.image = ImageTower(self.config)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_proj(pooled.float()), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image(x), dim=-1)

    @staticmethod
    def to_input(images_uint8: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (``stages.images_to_unit``)."""
        return images_to_unit(images_uint8)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> ClipScorer:
        """A measuring stick: loaded for inference, without gradients."""
        return super().from_pretrained(path, **kwargs).eval().requires_grad_(False)
