"""Decoder neighbour attention (imageragturbo/model/neighbour_attention.py; beyond the paper,
IP-Adapter-style decoupled cross-attention to the retrieved H tokens): a fresh module leaves
the student exact, with or without neighbours; trained gates change the image only when
neighbours are given (retrieval off is exactly the student); it builds on SD 2.1's block layout
(77 text tokens, every decoder cross-attention layer); a saved module loads into a model
folder after its LoRA and serves the same images; `bench quality --runs-only` compares runs
alone."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from imageragturbo.model import family
from imageragturbo.model.neighbour_attention import (
    FOLDER,
    NeighbourAttention,
    decoder_cross_attentions,
)
from imageragturbo.model.pipeline import student_generate
from imageragturbo.model.stages import OneStepStudent

PROMPTS, SEEDS = ["a red circle", "two blue squares on the left"], [3, 4]


@pytest.fixture(scope="module")
def student():
    torch.set_num_threads(1)
    return family.load_components("tiny-shapes", retrieval_tuned=False)


def _h_retr(c, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(PROMPTS), k, int(c.unet.config.block_out_channels[-1]), 4, 4,
                       generator=g)


def _randomise_gates(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.gate.values():
            p.copy_(torch.randn(p.shape, generator=g))


def _z0(c, h_retr):
    """The one-step z_0 with the module's decoder context (no H-adapter edit)."""
    from imageragturbo.model.pipeline import encode_prompt, latent_shape
    from imageragturbo.runtime.request import initial_noise

    ehs, _ = encode_prompt(c, PROMPTS)
    z = torch.from_numpy(initial_noise(SEEDS, latent_shape(c)))
    dec = None if c.neighbour_attention is None else c.neighbour_attention.decoder_context(
        ehs, h_retr)
    with torch.no_grad():
        return OneStepStudent(c.unet, c.alphas_cumprod)(z, ehs, None, dec)


def test_a_fresh_module_leaves_the_student_exact_with_and_without_neighbours(student):
    h = _h_retr(student)
    before = _z0(student, None)
    m = NeighbourAttention.for_unet(student.unet, text_len=24)
    m.attach(student.unet)
    student.neighbour_attention = m
    try:
        # gates at zero: the decoupled branch adds nothing; the text branch is the layer's own
        torch.testing.assert_close(_z0(student, h), before, rtol=0, atol=1e-5)
        torch.testing.assert_close(_z0(student, None), before, rtol=0, atol=0)
    finally:
        student.neighbour_attention = None
        NeighbourAttention.detach(student.unet)


def test_trained_gates_change_the_image_only_when_neighbours_are_given(student):
    h = _h_retr(student)
    plain = student_generate(student, PROMPTS, SEEDS)
    m = NeighbourAttention.for_unet(student.unet, text_len=24)
    _randomise_gates(m)
    m.attach(student.unet)
    student.neighbour_attention = m
    try:
        with_nb = student_generate(student, PROMPTS, SEEDS, h_retr=h,
                                   lam=torch.zeros(len(PROMPTS)))
        other_nb = student_generate(student, PROMPTS, SEEDS, h_retr=_h_retr(student, seed=5),
                                    lam=torch.zeros(len(PROMPTS)))
        off = student_generate(student, PROMPTS, SEEDS)
    finally:
        student.neighbour_attention = None
        NeighbourAttention.detach(student.unet)
    assert np.array_equal(off, plain)                       # K = 0: exactly the student
    assert np.abs(with_nb.astype(int) - plain).max() > 8    # neighbours reach the image...
    assert np.abs(with_nb.astype(int) - other_nb).max() > 8  # ...and which ones matters
    # detached, the UNet is the student again
    assert np.array_equal(student_generate(student, PROMPTS, SEEDS), plain)


def test_it_builds_on_sd21_layout_with_77_text_tokens_and_every_decoder_cross_attention():
    torch.manual_seed(0)
    c = family.sd21_layout_tiny(seed=0)
    layers = decoder_cross_attentions(c.unet)
    # SD 2.1's up blocks: Up, then CrossAttn x3 with layers_per_block + 1 attentions each
    n_cross_up = sum(len(b.attentions) for b in c.unet.up_blocks
                     if getattr(b, "has_cross_attention", False))
    assert len(layers) == n_cross_up > 0
    m = NeighbourAttention.for_unet(c.unet, text_len=77)
    assert m.config.channels == c.unet.config.block_out_channels[-1]
    assert m.config.context_dim == c.unet.config.cross_attention_dim
    ehs = torch.randn(2, 77, m.config.context_dim)
    h = torch.randn(2, 2, m.config.channels, 2, 2)
    ctx = m.decoder_context(ehs, h)
    assert ctx.shape == (2, 77 + 2 * 4, m.config.context_dim)
    with pytest.raises(ValueError, match="splits at 77"):
        m.decoder_context(ehs[:, :24], h)
    with pytest.raises(ValueError, match="channels"):
        m.tokens(torch.randn(2, 1, 7, 2, 2))


def test_a_saved_module_loads_after_the_lora_and_serves_the_same_images(student, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(family.resolve("tiny-shapes"), folder)
    tuned = family.load_components(folder)
    m = NeighbourAttention.for_unet(tuned.unet, text_len=24)
    _randomise_gates(m)
    m.attach(tuned.unet)
    tuned.neighbour_attention = m
    h = _h_retr(tuned)
    lam = torch.full((len(PROMPTS),), 0.9)
    want = student_generate(tuned, PROMPTS, SEEDS, h_retr=h, lam=lam)
    m.save_pretrained(folder / FOLDER)
    loaded = family.load_components(folder)
    assert loaded.neighbour_attention is not None
    got = student_generate(loaded, PROMPTS, SEEDS, h_retr=h, lam=lam)
    assert np.array_equal(got, want)
    # the student without fine-tuning ignores the folder (no LoRA, no adapter, no module)
    assert family.load_components(folder, retrieval_tuned=False).neighbour_attention is None
