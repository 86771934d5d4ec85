"""What every training recipe here shares: a run folder of resumable stages, a training loop
that checkpoints atomically and resumes exactly, and accelerate for several processes.

A recipe subclasses :class:`StagedRun`, lists its ``STAGES`` and defines ``stage_<name>()``
for each; a stage writes ``<stage>/done.json`` when it ends and is skipped on the next run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be read: refused, never silently restarted."""


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves a half-written file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint (tensors, numbers, lists and dicts only: ``weights_only``)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same fault to the user
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                              "remove it to restart that stage from scratch") from None


def mean_tail(history: list[dict], key: str, n: int = 50) -> float:
    vals = [h[key] for h in history[-n:] if key in h]
    return float(np.mean(vals)) if vals else float("nan")


def record_step(name: str, step: int, losses: dict, history: list[dict]) -> None:
    """Append one step's losses to ``history``, refusing a non-finite one (a diverged run
    must stop at the step it diverged, not checkpoint NaNs)."""
    for k, v in losses.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"{name}: loss {k} is {v} at step {step}")
    history.append({"step": step, **losses})


class FileCheckpoint:
    """One checkpoint file, ``ckpt``: the state's ``state_dict``s, the loss history and the
    step, written atomically by the main process (``save_atomic``)."""

    def __init__(self, ckpt: Path, is_main: bool = True):
        self.path, self.is_main = Path(ckpt), is_main

    def resume(self, state: dict) -> tuple[list[dict], int]:
        """(history, next step) from the file, loaded into ``state``; ([], 0) without one."""
        if not self.path.exists():
            return [], 0
        blob = load_checkpoint(self.path)
        for k, obj in state.items():
            obj.load_state_dict(blob["state"][k])
        return blob["history"], int(blob["step"])

    def save(self, state: dict, step: int, history: list[dict]) -> None:
        if self.is_main:
            save_atomic({"state": {k: o.state_dict() for k, o in state.items()},
                         "history": history, "step": step}, self.path)


class AcceleratorCheckpoints:
    """Checkpoints written by ``accelerator.save_state`` into ``root/checkpoint-NNNNNNN/``
    (the state's objects, registered for checkpointing, then ``meta.json``, written last: the
    step and the loss history), only the newest ``keep`` kept. ``resume`` reads the newest
    complete one back ``weights_only`` (``load_checkpoint``: accelerate's ``load_state`` would
    unpickle them whole), or ``legacy`` (a ``FileCheckpoint`` file of an older run folder)."""

    def __init__(self, acc, root: Path, keep: int, legacy: Path | None = None):
        self.acc, self.root, self.keep, self.legacy = acc, Path(root), keep, legacy
        self._registered = False

    def _complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("checkpoint-*") if (p / "meta.json").is_file())

    def resume(self, state: dict) -> tuple[list[dict], int]:
        objs = list(state.values())
        if not self._registered:
            self.acc.register_for_checkpointing(*objs)
            self._registered = True
        kept = self._complete()
        if kept:
            meta = json.loads((kept[-1] / "meta.json").read_text())
            for i, obj in enumerate(objs):
                obj.load_state_dict(load_checkpoint(kept[-1] / f"custom_checkpoint_{i}.pkl"))
            return meta["history"], int(meta["step"])
        if self.legacy is not None:
            return FileCheckpoint(self.legacy).resume(state)
        return [], 0

    def save(self, state: dict, step: int, history: list[dict]) -> None:
        import shutil

        path = self.root / f"checkpoint-{step:07d}"
        self.acc.save_state(str(path))       # every process (accelerate gathers what it needs)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (path / "meta.json").write_text(json.dumps({"step": step, "history": history})
                                            + "\n")
            done = self._complete()
            for p in done[:max(0, len(done) - self.keep)]:
                shutil.rmtree(p, ignore_errors=True)


def train_loop(name: str, checkpoints, state: dict[str, object],
               step_fn: Callable[[int], dict], steps: int, every: int, progress: bool = True,
               is_main: bool = True) -> list[dict]:
    """Run ``step_fn(step)`` for steps [start, steps), checkpointing ``state`` (modules,
    optimisers, EMA shadows: anything with state_dict) and the loss history every ``every``
    steps and at the end through ``checkpoints`` (``FileCheckpoint`` or
    ``AcceleratorCheckpoints``: ``resume(state) -> (history, start)`` and ``save(state, step,
    history)``), resuming from its newest. Batches come from per-step generators, so a
    resumed run continues exactly as an uninterrupted one would."""
    from tqdm import tqdm

    history, start = checkpoints.resume(state)
    bar = tqdm(range(start, steps), desc=name, disable=not (progress and is_main), initial=start,
               total=steps)
    t0 = time.perf_counter()
    for step in bar:
        losses = step_fn(step)
        record_step(name, step, losses, history)
        if step % 10 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
        if (step + 1) % every == 0 or step + 1 == steps:
            checkpoints.save(state, step + 1, history)
    bar.close()
    if history and start < steps:
        history[-1]["seconds"] = time.perf_counter() - t0
    return history


class StagedRun:
    """A run folder of stages. The configuration (a dataclass with ``threads`` and
    ``ckpt_every``) is recorded in ``<run>/<config_file>``; reusing the folder with another
    configuration is refused unless ``reconfigure`` (finished stages are then kept)."""

    STAGES: tuple[str, ...] = ()
    config_file = "recipe.json"

    def __init__(self, run_dir: str | Path, cfg, progress: bool = True,
                 reconfigure: bool = False):
        self.dir = Path(run_dir)
        self.cfg = cfg
        self.progress = progress
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / self.config_file
        mine = json.loads(json.dumps(asdict(self.cfg)))
        mine.pop("threads")  # speed only, not results
        before = json.loads(saved.read_text()) if saved.exists() else None
        if before is not None:
            # a field added to the configuration since the folder was started, at its
            # default, is the configuration the folder was run with
            defaults = json.loads(json.dumps({f.name: f.default for f in fields(self.cfg)
                                              if f.default is not MISSING}))
            before = {**{k: v for k, v in mine.items()
                         if k not in before and k in defaults and v == defaults[k]}, **before}
        if before is not None and before != mine and not reconfigure:
            raise ValueError(f"{saved} was written by a different recipe configuration; use a "
                             "new run folder, or --reconfigure to keep finished stages and "
                             "run the rest with the new one")
        saved.write_text(json.dumps(mine, indent=2) + "\n")
        torch.set_num_threads(self.cfg.threads)
        from accelerate import Accelerator

        # One process on a CPU here; `accelerate launch -m imageragturbo.commands train ...` on
        # several GPUs runs the same code data-parallel: each process draws its own batches and
        # gradients are averaged across processes after every backward (``_backward_fn``). The
        # models are not DDP-wrapped because the stages call their methods (vae.encode, the
        # split UNet) rather than their forward.
        self.acc = Accelerator(cpu=not torch.cuda.is_available())

    def _rng(self, stage: str, step: int) -> np.random.Generator:
        """The batch generator of one step (and one process, under multi-GPU launch)."""
        rank = self.acc.process_index
        key = [self.cfg.seed, self.STAGES.index(stage), step] + ([rank] if rank else [])
        return np.random.default_rng(key)

    def done(self, stage: str) -> dict | None:
        p = self.dir / stage / "done.json"
        return json.loads(p.read_text()) if p.exists() else None

    def _finish(self, stage: str, info: dict) -> dict:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (self.dir / stage).mkdir(parents=True, exist_ok=True)
            (self.dir / stage / "done.json").write_text(json.dumps(info, indent=2) + "\n")
        return info

    def _loop(self, name: str, state: dict, step_fn, steps: int, checkpoints=None) -> list[dict]:
        """``train_loop`` in stage ``name``, checkpointing to ``<name>/ckpt.pt`` unless
        ``checkpoints`` says otherwise."""
        if checkpoints is None:
            checkpoints = FileCheckpoint(self.dir / name / "ckpt.pt", self.acc.is_main_process)
        return train_loop(name, checkpoints, state, step_fn, steps, self.cfg.ckpt_every,
                          self.progress, self.acc.is_main_process)

    def _dev(self, *tensors: torch.Tensor):
        return tuple(t.to(self.acc.device) for t in tensors)

    def _sync_grads(self, params) -> None:
        if self.acc.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.acc.reduce(p.grad, reduction="mean")

    def _backward_fn(self, params):
        """loss.backward(), then the gradients averaged across processes."""
        params = [p for p in params if p.requires_grad]

        def backward(loss: torch.Tensor) -> None:
            loss.backward()
            self._sync_grads(params)

        return backward

    def run(self, stages=None) -> dict:
        out = {}
        for st in stages or self.STAGES:
            if st not in self.STAGES:
                raise ValueError(f"unknown stage {st!r}; stages: {', '.join(self.STAGES)}")
            out[st] = self.done(st) or getattr(self, f"stage_{st}")()
        return out
