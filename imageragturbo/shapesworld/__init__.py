"""ShapesWorld: a deterministic procedural world of coloured shapes with captions, rendered
at any size, in splits that make retrieval matter (``world``), and written to disk as data sets
(``dataset``). ``from imageragturbo import shapesworld as sw`` gives both."""

from ..checksums import sha256_file  # noqa: F401
from .dataset import build_dataset, load_manifest, sample_grid, split_stats  # noqa: F401
from .edits import jitter, perturb  # noqa: F401
from .world import *  # noqa: F403
