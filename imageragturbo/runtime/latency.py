"""Timing one whole request in process (text encoder, retrieval, one step, uint8) on the
ONNX Runtime pipeline: the yardstick ``bench serve`` compares the served ensemble with, and
the latency columns of ``bench quality``."""

from __future__ import annotations

import time

PROMPTS = ("a red circle in the top left corner", "two blue squares",
           "a small green triangle left of a yellow circle", "a purple square in the middle")


def in_process_request(pipe, index, k: int):
    """``one(prompts, seeds)``: a whole request in process on ``pipe`` (text encoder, retrieval
    of ``k`` neighbours from ``index`` when k > 0, one step, uint8)."""
    from .request import retrieve_and_generate

    def one(prompts, seeds):
        if k > 0:
            retrieve_and_generate(pipe.generate, lambda p: pipe.encode_prompt(p)[1], index,
                                  prompts, seeds, k, has_adapter=pipe.has_adapter,
                                  start=pipe.neighbour_start)
        else:
            pipe.generate(prompts, seeds)
    return one


def batch1_ms(one, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of ``repeats`` single-prompt requests ``one`` after ``warmup`` untimed."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        one([PROMPTS[i % len(PROMPTS)]], [i])
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times
