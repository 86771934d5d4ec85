"""Our modules save and load as diffusers' models do (imageragturbo/model/pretrained.py): the
shipped tiny-shapes folders, written before the mixins (config.json without ``_class_name``,
model.safetensors), load unchanged; saved again they are in the current layout with every
tensor byte for byte as shipped (fp16 where shipped so) and give the same outputs; the decoder
neighbour attention keeps its ``layers`` map and loads from the old layout too."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file

from imageragturbo.model import family
from imageragturbo.model.clip_scorer import ClipScorer
from imageragturbo.model.h_space import HAdapter, adapter_config_for_channels
from imageragturbo.model.neighbour_attention import NeighbourAttention
from imageragturbo.model.pretrained import LEGACY_WEIGHTS

# shipped folder (relative to the package's weights/) written in the old layout -> (class, the
# dtype its weights are shipped in). The paper's H-adapter, shipped as tiny-shapes' adapter
# until the neighbour-start model replaced it, is kept in adapters/paper as it was written.
SHIPPED = {"adapters/paper/h_adapter": (HAdapter, torch.float16),
           "tiny-shapes/clip_scorer": (ClipScorer, torch.float32)}


def _outputs(m) -> list[torch.Tensor]:
    """The module's outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if isinstance(m, HAdapter):
            h = torch.randn(3, 96, 4, 4, generator=g)
            return [m(h, torch.randn(3, 2, 96, 4, 4, generator=g), torch.tensor([0.3, 0.7, 1.0]))]
        x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
        return [m.encode_image(x), m.image.features(x),
                m.encode_text(torch.randn(3, 64, generator=g))]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("sub", SHIPPED)
def test_shipped_folders_load_and_save_again_byte_identical_with_the_same_outputs(sub, tmp_path):
    cls, dtype = SHIPPED[sub]
    folder = family.resolve("tiny-shapes").parent / sub
    old_cfg = json.loads((folder / "config.json").read_text())
    assert "_class_name" not in old_cfg and (folder / LEGACY_WEIGHTS).is_file()  # the old layout
    shipped = load_file(folder / LEGACY_WEIGHTS)
    assert {v.dtype for v in shipped.values()} == {dtype}
    m = cls.from_pretrained(folder)
    assert m.dtype == torch.float32 and not m.training
    sd = m.state_dict()
    assert set(sd) == set(shipped)
    assert all(torch.equal(sd[k], v.float()) for k, v in shipped.items())
    before = _outputs(m)

    m.save_pretrained(tmp_path / sub.replace('/', '_'), dtype=dtype)
    cfg = json.loads((tmp_path / sub.replace('/', '_') / "config.json").read_text())
    assert cfg["_class_name"] == cls.__name__ and "_diffusers_version" in cfg
    assert {k: cfg[k] for k in old_cfg} == old_cfg
    assert not (tmp_path / sub.replace('/', '_') / LEGACY_WEIGHTS).exists()
    saved = load_file(tmp_path / sub.replace('/', '_') / SAFETENSORS_WEIGHTS_NAME)
    assert set(saved) == set(shipped)
    assert all(_same_bytes(saved[k], v) for k, v in shipped.items()), sub
    assert m.dtype == torch.float32                      # saving in fp16 left the module as it was
    after = _outputs(cls.from_pretrained(tmp_path / sub.replace('/', '_')))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_config_dataclass_builds_the_module_and_is_its_config():
    cfg = adapter_config_for_channels(96)
    cfg.positional = True
    m = HAdapter(cfg)
    assert {k: v for k, v in m.config.items() if not k.startswith("_")} == asdict(cfg)
    assert m.pos_proj is not None
    assert HAdapter(**asdict(cfg)).config.num_heads == cfg.num_heads == 4


def test_neighbour_attention_keeps_its_layers_and_loads_the_old_layout(tmp_path):
    layers = {"up_blocks.0.attentions.0.transformer_blocks.0.attn2": 32,
              "up_blocks.1.attentions.1.transformer_blocks.0.attn2": 16}
    torch.manual_seed(0)
    m = NeighbourAttention(channels=32, context_dim=24, text_len=5, layers=layers)
    for p in m.parameters():                                 # gates and positions non-zero
        torch.nn.init.normal_(p)
    ehs, h = torch.randn(2, 5, 24), torch.randn(2, 3, 32, 2, 2)
    want = m.decoder_context(ehs, h)
    m.save_pretrained(tmp_path / "new")
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert cfg["_class_name"] == "NeighbourAttention" and cfg["layers"] == layers
    back = NeighbourAttention.from_pretrained(tmp_path / "new")
    assert dict(back.config.layers) == layers and list(back.gate) == list(m.gate)
    assert torch.equal(back.decoder_context(ehs, h), want)
    m.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert {v.dtype for v in load_file(tmp_path / "fp16" / SAFETENSORS_WEIGHTS_NAME).values()
            } == {torch.float16}
    # the layout written before the mixins: the fields alone, model.safetensors
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(
        {k: v for k, v in m.config.items() if not k.startswith("_")}))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(old / LEGACY_WEIGHTS))
    assert torch.equal(NeighbourAttention.from_pretrained(old).decoder_context(ehs, h), want)
