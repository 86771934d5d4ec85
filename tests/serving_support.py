"""Helpers shared by the serving test modules (the fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from imageragturbo.runtime.request import retrieve_and_generate

PIXEL_BOUND = 2  # max abs difference served vs in-process, in uint8 steps (2/255)
PROMPTS = ["a red circle in the top left corner", "two blue squares",
           "a small green triangle left of a yellow circle"]



def in_process(pipes, name, prompts, seeds, k=0, strength=None):
    pipe, index = pipes[name]
    if k == 0:
        return pipe.generate(prompts, seeds), None
    images, nb, _, _ = retrieve_and_generate(  # re-ranked, as served
        pipe.generate, lambda p: pipe.encode_prompt(p)[1], index, prompts, seeds, k,
        has_adapter=pipe.has_adapter, start=pipe.neighbour_start, strength=strength)
    return images, nb


def _inp(name, array, dtype):
    x = grpcclient.InferInput(name, list(array.shape), dtype)
    x.set_data_from_numpy(array)
    return x


def _prompt(*texts):
    return _inp("PROMPT", np.array([t.encode() if isinstance(t, str) else t for t in texts],
                                   dtype=np.object_).reshape(-1, 1), "BYTES")


def _maxdiff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


