"""Saving and loading the modules we define (the H-adapter, the decoder neighbour attention, the
CLIP-score analogue) as diffusers saves its own models: ``ModelMixin`` + ``ConfigMixin``, the
constructor's arguments recorded by ``@register_to_config``, a folder with ``config.json``
(``_class_name``, ``_diffusers_version`` and those arguments) beside
``diffusion_pytorch_model.safetensors``.

Folders written before these modules used the mixins (a ``config.json`` of the arguments alone
beside ``model.safetensors``, as the shipped tiny-shapes' ``h_adapter/`` and ``clip_scorer/``
are) still load: ``from_pretrained`` reads them as they are, and ``save_pretrained`` writes the
current layout.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

LEGACY_WEIGHTS = "model.safetensors"   # the weights file of folders saved before the mixins


def takes_config(init):
    """Put outside ``@register_to_config``: ``Module(config)`` with one config dataclass
    (``HAdapterConfig``, ``ClipScorerConfig``) stands for ``Module(**asdict(config))``, so the
    sizing rules that return dataclasses keep building modules, and the config records the
    fields as keyword arguments."""

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and is_dataclass(args[0]):
            return init(self, **asdict(args[0]))
        return init(self, *args, **kwargs)

    return inner


class PretrainedModule(ModelMixin, ConfigMixin):
    """``ModelMixin`` + ``ConfigMixin`` with our defaults: loading gives float32 weights unless
    ``torch_dtype`` says otherwise (they may be fp16 on disk), from safetensors only; saving can
    write the weights in another dtype; a folder in the layout from before the mixins loads."""

    def save_pretrained(self, save_directory: str | Path, dtype: torch.dtype | None = None,
                        **kwargs) -> None:
        """diffusers' ``save_pretrained``; with ``dtype`` the weights are written in that dtype
        (fp16 for shipped weights), the module itself left as it is. A weights file of the old
        layout in the folder is removed, so the folder holds one set of weights."""
        if dtype is not None and dtype != self.dtype:
            _cast(copy.deepcopy(self), dtype).save_pretrained(save_directory, **kwargs)
            return
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / LEGACY_WEIGHTS).unlink(missing_ok=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs):
        """diffusers' ``from_pretrained`` from a local folder (float32 and safetensors by
        default), or the old layout: ``config.json`` without ``_class_name`` beside
        ``model.safetensors``."""
        kwargs.setdefault("torch_dtype", torch.float32)
        kwargs.setdefault("use_safetensors", True)
        path = Path(path)
        if (path / LEGACY_WEIGHTS).is_file() and not (path / SAFETENSORS_WEIGHTS_NAME).is_file():
            from safetensors.torch import load_file

            model = cls.from_config(cls.load_config(path))
            model.load_state_dict(load_file(str(path / LEGACY_WEIGHTS)))   # cast on copy
            return _cast(model, kwargs["torch_dtype"]).eval()
        return super().from_pretrained(path, **kwargs)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` without ``ModelMixin.to``'s warning about modules kept in float32,
    which diffusers 0.42 gives for every model that has none."""
    return torch.nn.Module.to(module, dtype)
