"""The initial noise z_T, from NumPy only (no torch), so the PyTorch pipeline, the in-process
ONNX Runtime pipeline and the Triton ensemble's preprocess draw the very same z_T for a seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """z_T for each seed: (B, C, H, W) float32 standard normal, from NumPy's PCG64."""
    return np.stack([np.random.default_rng(int(s)).standard_normal(shape, dtype=np.float32)
                     for s in seeds])
