"""The model core: split parity, slerp (Eq. 3), the H-adapter (Eqs. 4-5), decoder LoRA,
loading a diffusers folder, pipelines' determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imageragturbo.model import family
from imageragturbo.model.h_space import (
    HAdapter,
    HAdapterConfig,
    adapter_config_for,
    count_parameters,
    sd21_adapter_config,
    slerp_inject,
)
from imageragturbo.model.lora import add_decoder_lora, lora_parameters
from imageragturbo.model.pipeline import initial_noise, student_generate, teacher_generate
from imageragturbo.model.unet_split import one_step_z0, split_unet


@pytest.fixture(scope="module")
def sd21_folder(tmp_path_factory):
    """A tiny random model with SD 2.1's classes and block layout, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("sd21-layout")
    family.save_sd_folder(family.sd21_layout_tiny(), path)
    return path


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**family.tiny_unet_config()).eval()


def _parity(unet, side, text_dim, batch=3):
    torch.manual_seed(1)
    z = torch.randn(batch, 4, side, side)
    t = torch.tensor([999, 500, 3][:batch])
    e = torch.randn(batch, 77, text_dim)
    enc, dec = split_unet(unet)
    with torch.no_grad():
        whole = unet(z, t, e).sample
        h, temb, *skips = enc(z, t, e)
        split = dec(h, temb, skips, e)
    return (whole - split).abs().max().item(), h.shape


def test_split_matches_whole_unet_on_tiny_default(tiny_unet):
    diff, h_shape = _parity(tiny_unet, 16, 64)
    assert diff <= 1e-5
    assert tuple(h_shape) == (3, 96, 4, 4)


def test_split_matches_whole_unet_on_sd21_layout_loaded_from_folder(sd21_folder):
    c = family.load_components(sd21_folder)
    for side in (8, 12):  # 12 is not a multiple of 2^3: the decoder upsamples to skip sizes
        diff, _ = _parity(c.unet, side, c.text_encoder.config.hidden_size)
        assert diff <= 1e-5, side


def test_one_step_update_inverts_the_forward_process():
    from diffusers import EulerDiscreteScheduler

    ac = EulerDiscreteScheduler(**family.noise_schedule_config()).alphas_cumprod
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 400])
    abar = ac[t].view(-1, 1, 1, 1)
    zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
    assert torch.allclose(one_step_z0(zt, t, eps, ac), z0, atol=1e-4)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * z0
    assert torch.allclose(one_step_z0(zt, t, v, ac, "v_prediction"), z0, atol=1e-4)


def test_one_step_matches_euler_discrete_single_trailing_step():
    """Our folded update equals diffusers' EulerDiscreteScheduler doing SD-Turbo's one step."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(**family.noise_schedule_config())
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    noise, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    latents = noise * sched.init_noise_sigma
    model_in = sched.scale_model_input(latents, t)
    ref = sched.step(eps, t, latents).prev_sample
    ours = one_step_z0(model_in, torch.tensor([int(t)]), eps, sched.alphas_cumprod)
    assert int(t) == 999
    assert torch.allclose(ours, ref, atol=1e-3, rtol=1e-4)


def test_slerp_endpoints_and_known_vectors():
    a = torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1)
    b = torch.tensor([[0.0, 3.0]]).view(1, 2, 1, 1)  # norm 3: rescaled to a's norm first
    assert torch.allclose(slerp_inject(a, b, 1.0), a)
    assert torch.allclose(slerp_inject(a, b, 0.0), torch.tensor([0.0, 1.0]).view(1, 2, 1, 1),
                          atol=1e-6)
    mid = slerp_inject(a, b, 0.5).flatten()
    assert torch.allclose(mid, torch.tensor([2 ** -0.5, 2 ** -0.5]), atol=1e-6)
    assert torch.allclose(mid.norm(), torch.tensor(1.0))  # stays on the sphere


def test_slerp_falls_back_to_lerp_for_parallel_features_and_checks_shapes():
    a = torch.randn(2, 4, 3, 3)
    out = slerp_inject(a, 2 * a, torch.tensor([0.3, 0.9]))
    assert torch.isfinite(out).all() and torch.allclose(out, a, atol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        slerp_inject(a, torch.randn(2, 4, 2, 2), 0.5)
    assert slerp_inject(a.half(), a.half(), 0.5).dtype == torch.float16


def test_fresh_adapter_is_identity_and_learns():
    torch.manual_seed(0)
    ad = HAdapter(HAdapterConfig(channels=96, num_heads=4, head_dim=24))
    h, retr, lam = torch.randn(2, 96, 4, 4), torch.randn(2, 3, 96, 4, 4), torch.tensor([0.4, 0.9])
    assert torch.equal(ad(h, retr, lam), h)
    opt = torch.optim.Adam(ad.parameters(), 1e-2)
    target = torch.randn_like(h)
    losses = []
    for _ in range(5):
        loss = ((ad(h, retr, lam) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(ad(h, retr, lam), h)
    # lambda scales the correction: lambda = 0 keeps the target
    assert torch.allclose(ad(h, retr, torch.zeros(2)), h)
    with pytest.raises(ValueError, match="expected"):
        ad(h, torch.randn(2, 3, 32, 4, 4), lam)


def test_adapter_size_matches_the_paper_at_sd21_width(tiny_unet):
    n = count_parameters(HAdapter(sd21_adapter_config()))
    assert 35e6 < n < 37.5e6  # the paper: 36 M, 4 % of the model
    cfg = adapter_config_for(tiny_unet)
    assert (cfg.channels, cfg.num_heads, cfg.head_dim) == (96, 4, 24)
    assert count_parameters(HAdapter(cfg)) == 204768


def test_adapter_round_trips_through_safetensors(tmp_path):
    ad = HAdapter(HAdapterConfig(channels=32, num_heads=2, head_dim=16))
    torch.nn.init.normal_(ad.proj_out.weight)
    ad.save_pretrained(tmp_path / "a")
    back = HAdapter.from_pretrained(tmp_path / "a")
    h, r = torch.randn(1, 32, 2, 2), torch.randn(1, 2, 32, 2, 2)
    assert torch.allclose(ad(h, r, torch.ones(1)), back(h, r, torch.ones(1)))


def test_decoder_lora_leaves_the_encoder_and_its_cache_unchanged(tiny_unet):
    import copy

    unet = copy.deepcopy(tiny_unet)
    names = add_decoder_lora(unet, rank=4)
    assert names and all(n.startswith("up_blocks.") for n in names)
    for p in lora_parameters(unet):  # make the adapters non-trivial
        torch.nn.init.normal_(p, std=0.5)
    z, t, e = torch.randn(2, 4, 16, 16), torch.tensor([999, 999]), torch.randn(2, 77, 64)
    enc0, dec0 = split_unet(tiny_unet)
    enc1, dec1 = split_unet(unet)
    with torch.no_grad():
        out0, out1 = enc0(z, t, e), enc1(z, t, e)
        assert all(torch.equal(a, b) for a, b in zip(out0, out1))
        assert not torch.allclose(dec0(out0[0], out0[1], out0[2:], e),
                                  dec1(out1[0], out1[1], out1[2:], e))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_loader_errors_are_clear(tmp_path, sd21_folder):
    with pytest.raises(FileNotFoundError, match="not found"):
        family.load_components(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="missing subfolder"):
        family.load_components(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="teacher_unet"):
        family.load_components(sd21_folder, with_teacher=True)


def test_initial_noise_is_numpy_and_seeded():
    a = initial_noise([1, 2], (4, 8, 8))
    assert a.dtype == np.float32 and a.shape == (2, 4, 8, 8)
    assert np.array_equal(a[0], initial_noise([1], (4, 8, 8))[0])
    assert not np.array_equal(a[0], a[1])


def test_student_and_teacher_pipelines_are_deterministic_per_seed(sd21_folder):
    from diffusers import UNet2DConditionModel

    c = family.load_components(sd21_folder)
    c.teacher_unet = UNet2DConditionModel.from_pretrained(sd21_folder / "unet").eval()
    p = ["a red star", "two blue circles"]
    a = student_generate(c, p, [7, 8])
    b = student_generate(c, p, [7, 8])
    assert a.dtype == np.uint8 and a.shape == (2, 128, 128, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, student_generate(c, p, [9, 8]))
    t1 = teacher_generate(c, p, [7, 8], steps=3, guidance=3.0)
    assert np.array_equal(t1, teacher_generate(c, p, [7, 8], steps=3, guidance=3.0))
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        student_generate(c, p, [1])


def test_a_model_folder_with_pickled_weights_is_refused_with_the_path(sd21_folder, tmp_path):
    """Weights load from safetensors only: a planted pickle (.bin) is refused, path named."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(sd21_folder, folder)
    planted = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save({"x": torch.zeros(1)}, planted)
    with pytest.raises(ValueError, match=str(planted)):
        family.load_components(folder)
    planted.unlink()
    assert family.load_components(folder).unet is not None


def test_weight_identity_is_hashed_once_yet_follows_every_rewrite(tmp_path):
    """``files_identity`` keeps a digest per process (start-up asks it for export, index and
    training alike) but never a stale one: a same-size rewrite changes the identity, and files
    written in the last 2 s are read again every time."""
    import os
    import time

    from imageragturbo import defaults

    unet = tmp_path / "m" / "unet"
    unet.mkdir(parents=True)
    w = unet / "diffusion_pytorch_model.safetensors"
    w.write_bytes(b"a" * 64)
    fresh = defaults.files_identity(tmp_path / "m", ("unet",))
    hits = defaults._files_digest.cache_info().hits
    assert defaults.files_identity(tmp_path / "m", ("unet",)) == fresh
    assert defaults._files_digest.cache_info().hits == hits          # fresh: read again
    old = time.time() - 3600
    os.utime(w, (old, old))
    first = defaults.files_identity(tmp_path / "m", ("unet",))
    assert defaults.files_identity(tmp_path / "m", ("unet",)) == first == fresh
    assert defaults._files_digest.cache_info().hits == hits + 1      # settled: cached
    w.write_bytes(b"b" * 64)                                         # same size, in place
    os.utime(w, (old + 1, old + 1))
    assert defaults.files_identity(tmp_path / "m", ("unet",)) != first


def test_tiny_unet_layouts_reverse_is_the_shipped_one_and_sd21_has_no_attention_at_the_bottom():
    import json

    shipped = json.loads((family.resolve("tiny-shapes") / "unet" / "config.json").read_text())
    rev = family.tiny_unet_config()
    assert list(rev["down_block_types"]) == shipped["down_block_types"]
    assert list(rev["up_block_types"]) == shipped["up_block_types"]
    sd = family.tiny_unet_config(layout="sd21")
    # SD 2.1's rule: the lowest level (last down block, first up block) has no attention
    assert "CrossAttn" not in sd["down_block_types"][-1] and "CrossAttn" not in sd["up_block_types"][0]
    assert any("CrossAttn" in b for b in sd["up_block_types"])   # the text re-enters above H
    with pytest.raises(ValueError, match="unknown UNet layout"):
        family.tiny_unet_config(layout="sideways")
