"""Training smoke tests: every stage's step lowers its loss on a fixed batch, and the quick
recipe runs end to end into a folder the loader and pipelines accept, resuming after a stop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imageragturbo import shapesworld as sw
from imageragturbo.model import family
from imageragturbo.model.clip_scorer import ClipScorer, ClipScorerConfig
from imageragturbo.model.pipeline import tokenize
from imageragturbo.training import base, ladd


@pytest.fixture(scope="module")
def batch():
    items = sw.make_split("train", 16, seed=5)
    imgs = np.stack([np.asarray(sw.render(it.scene)) for it in items])
    return imgs, [it.caption for it in items]


@pytest.fixture(scope="module")
def tokenizer():
    return family.clip_tokenizer()


def _small_unet():
    from diffusers import UNet2DConditionModel

    cfg = family.tiny_unet_config(cross_attention_dim=32)
    cfg["block_out_channels"] = (16, 32, 32)
    cfg["norm_num_groups"] = 8
    return UNet2DConditionModel(**cfg)


def _decreases(losses, key="loss"):
    first = np.mean([x[key] for x in losses[:2]])
    last = np.mean([x[key] for x in losses[-2:]])
    assert all(np.isfinite(x[key]) for x in losses)
    return last < first


def test_clip_step_lowers_contrastive_loss(batch, tokenizer):
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    imgs, caps = batch
    text = CLIPTextModel(family.tiny_text_config(hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1))
    scorer = ClipScorer(ClipScorerConfig(text_dim=32, width=8))
    opt = torch.optim.AdamW(list(text.parameters()) + list(scorer.parameters()), 3e-3)
    ids, x = tokenize(tokenizer, caps), base.to_unit(imgs)
    losses = [base.clip_step(text, scorer, opt, ids, x) for _ in range(12)]
    assert _decreases(losses)


def test_vae_step_lowers_reconstruction_loss(batch):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**family.tiny_vae_config())
    opt = torch.optim.AdamW(vae.parameters(), 2e-3)
    x = base.to_unit(batch[0][:8, :32, :32])
    losses = [base.vae_step(vae, opt, x) for _ in range(12)]
    assert _decreases(losses)


def test_teacher_step_lowers_denoising_loss():
    torch.manual_seed(0)
    unet = _small_unet()
    opt = torch.optim.AdamW(unet.parameters(), 2e-3)
    ac = base.Recipe._scheduler().alphas_cumprod
    z0, ehs = torch.randn(8, 4, 16, 16), torch.randn(8, 77, 32)
    t, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 4, 16, 16)
    losses = [base.teacher_step(unet, opt, z0, ehs, t, noise, ac) for _ in range(12)]
    assert _decreases(losses)



def test_min_snr_weighting_is_min_snr_over_snr_per_sample():
    """teacher_step's Min-SNR-gamma loss is each sample's plain error times min(SNR, g)/SNR:
    1 at the noisy end (SNR < g), about g/1200 at t = 0 on SD's schedule."""
    torch.manual_seed(0)
    unet = _small_unet()
    ac = base.Recipe._scheduler().alphas_cumprod
    z0, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    t, noise = torch.tensor([0, 999]), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        err = ((unet(ladd.add_noise(z0, noise, t, ac), t, ehs).sample - noise) ** 2).mean((1, 2, 3))
    snr = ac[t] / (1 - ac[t])
    assert snr[0] > 1000 and snr[1] < 5
    opt = torch.optim.SGD(unet.parameters(), lr=0.0)  # the step must not move the weights
    plain = base.teacher_step(unet, opt, z0, ehs, t, noise, ac)["loss"]
    weighted = base.teacher_step(unet, opt, z0, ehs, t, noise, ac, min_snr=5.0)["loss"]
    assert plain == pytest.approx(err.mean().item(), rel=1e-5)
    assert weighted == pytest.approx((err[0] * 5.0 / snr[0] + err[1]).item() / 2, rel=1e-5)

def test_ladd_step_lowers_distillation_loss_and_trains_only_the_heads():
    import copy

    torch.manual_seed(0)
    teacher = _small_unet().eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    disc = ladd.LADDDiscriminator(teacher, text_dim=32)
    assert len(disc.heads) == len(teacher.down_blocks) + 1
    opt_g = torch.optim.AdamW(student.parameters(), 1e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.AdamW(disc.trainable_parameters(), 1e-3, betas=(0.0, 0.99))
    ac = base.Recipe._scheduler().alphas_cumprod
    z_t, z0 = torch.randn(4, 4, 16, 16), torch.randn(4, 4, 16, 16)
    ehs, pooled = torch.randn(4, 77, 32), torch.randn(4, 32)
    s, eps = torch.randint(0, 750, (4,)), torch.randn(4, 4, 16, 16)
    before = [p.clone() for p in teacher.parameters()]
    one_step = base.OneStepStudent(student, ac)
    losses = [base.ladd_step(one_step, disc, opt_g, opt_d, z_t, z0, ehs, pooled, s, eps, ac)
              for _ in range(10)]
    assert _decreases(losses, "distill")
    assert all(np.isfinite(x["d"]) and np.isfinite(x["g_adv"]) for x in losses)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_hinge_losses_follow_eqs_6_and_7():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.5])]
    # Eq. 6: mean(relu(1 - real)) + mean(relu(1 + fake)) = 0.25 + 0.75
    assert ladd.d_hinge_loss(real, fake).item() == pytest.approx(1.0)
    assert ladd.g_adv_loss(fake).item() == pytest.approx(0.75)
    # Eq. 8: quadratic below 1, linear above
    assert ladd.distill_loss(torch.tensor([0.5]), torch.tensor([0.0])).item() == 0.125
    assert ladd.distill_loss(torch.tensor([3.0]), torch.tensor([0.0])).item() == 2.5


def test_quick_recipe_runs_end_to_end_and_resumes(tmp_path):
    from imageragturbo.model.pipeline import student_generate, teacher_generate

    run = tmp_path / "run"
    cfg = base.RecipeConfig.quick()
    out = base.Recipe(run, cfg, progress=False).run(["clip", "vae"])
    assert out["vae"]["final_loss"] < out["vae"]["first_loss"]
    # a stop in the middle of the teacher: a checkpoint exists, no done marker
    cfg_stop = base.RecipeConfig.quick()
    cfg_stop.teacher_steps = 3
    with pytest.raises(ValueError, match="different recipe"):
        base.Recipe(run, cfg_stop, progress=False)
    base.Recipe(run, cfg_stop, progress=False, reconfigure=True).run(["teacher"])
    (run / "teacher" / "done.json").unlink()
    resumed = base.Recipe(run, cfg, progress=False, reconfigure=True)
    hist_before = torch.load(run / "teacher" / "ckpt.pt", weights_only=False)["step"]
    assert hist_before == 3
    out = resumed.run()
    assert set(out) == set(base.STAGES)
    assert json.loads((run / "teacher" / "done.json").read_text())
    ckpt = torch.load(run / "teacher" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == cfg.teacher_steps and len(ckpt["history"]) == cfg.teacher_steps

    folder = run / "export" / "tiny-shapes"
    c = family.load_components(folder, with_teacher=True)
    imgs = student_generate(c, ["a red star"], [0])
    assert imgs.shape == (1, 64, 64, 3) and imgs.dtype == np.uint8
    assert teacher_generate(c, ["a red star"], [0], steps=2).shape == (1, 64, 64, 3)
    assert (folder / "clip_scorer" / "diffusion_pytorch_model.safetensors").is_file()

    from imageragturbo import evaluate

    res = evaluate.run(str(folder), "student", 1, n=6, progress=False)
    assert set(res) >= {"tifa", "categories", "fd", "clip"}
    assert 0.0 <= res["tifa"] <= 1.0 and np.isfinite(res["fd"]) and -1 <= res["clip"] <= 1


def test_frechet_distance_is_zero_for_one_distribution_and_sees_a_shift():
    from imageragturbo.evaluate import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + np.array([2.0, 0, 0, 0])) == pytest.approx(4.0, rel=1e-3)


def test_joint_text_training_moves_token_states_keeps_pooled_key_and_flows_downstream(tmp_path):
    """teacher_text_lr > 0: the teacher stage fine-tunes the text encoder; its token states
    change, its pooled output (the retrieval key) stays near the clip stage's, and the
    later stages and the export use the fine-tuned encoder and its states."""
    import dataclasses

    from imageragturbo.model.pipeline import encode_prompt

    run = tmp_path / "run"
    cfg = dataclasses.replace(base.RecipeConfig.quick(), teacher_text_lr=1e-3)
    recipe = base.Recipe(run, cfg, progress=False)
    recipe.run(["clip", "vae"])
    clip_text = recipe.text_encoder()
    out = recipe.run(["teacher"])
    assert (run / "teacher" / "text_encoder").is_dir() and "final_anchor" in out["teacher"]
    tuned = recipe.text_encoder()
    ids = tokenize(recipe.tokenizer, ["a red star left of a blue circle"])
    with torch.no_grad():
        a, b = clip_text(ids), tuned(ids)
    assert not torch.equal(a.last_hidden_state, b.last_hidden_state)
    cos = torch.nn.functional.cosine_similarity(a.pooler_output, b.pooler_output).item()
    assert cos > 0.99
    data = recipe._latents_and_text()   # now the tuned encoder's states
    with torch.no_grad():
        first = tuned(tokenize(recipe.tokenizer, recipe.data[1][:1])).last_hidden_state
    assert torch.allclose(data["ehs"][:1].float(), first, atol=1e-2)
    recipe.run()
    c = family.load_components(run / "export" / "tiny-shapes")
    ehs, _ = encode_prompt(c, ["a red star left of a blue circle"])
    assert torch.allclose(ehs.float(), b.last_hidden_state, atol=1e-2)  # fp16 export


class _Payload:
    """An arbitrary object: a checkpoint holding one needs full unpickling, which runs code."""

    def __init__(self):
        self.note = "arbitrary object"


class _FailsHalfway:
    """Pickling it raises: torch.save dies after it has begun writing the file."""

    def __reduce__(self):
        raise RuntimeError("killed halfway through the save")


def test_load_checkpoint_refuses_a_pickled_arbitrary_object(tmp_path):
    """``weights_only``: tensors, numbers, lists and dicts load; a checkpoint that needs an
    arbitrary class (which unpickling would run) is refused as a CheckpointError."""
    from imageragturbo.training.stages import CheckpointError, load_checkpoint

    good = tmp_path / "good.pt"
    torch.save({"state": {"w": torch.arange(3)}, "history": [{"step": 0, "loss": 1.5}],
                "step": 1}, good)
    assert load_checkpoint(good)["state"]["w"].tolist() == [0, 1, 2]
    bad = tmp_path / "bad.pt"
    torch.save({"state": {}, "step": 1, "extra": _Payload()}, bad)
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)


def test_save_atomic_killed_halfway_leaves_the_previous_checkpoint_loadable(tmp_path):
    from imageragturbo.training.stages import load_checkpoint, save_atomic

    ckpt = tmp_path / "ckpt.pt"
    save_atomic({"state": {"w": torch.ones(4)}, "step": 3}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(RuntimeError, match="killed halfway"):
        save_atomic({"state": {"w": torch.zeros(4)}, "step": 6, "bad": _FailsHalfway()}, ckpt)
    assert ckpt.read_bytes() == before
    blob = load_checkpoint(ckpt)
    assert blob["step"] == 3 and torch.equal(blob["state"]["w"], torch.ones(4))
    save_atomic({"state": {"w": torch.zeros(4)}, "step": 6}, ckpt)  # the next save replaces it
    assert load_checkpoint(ckpt)["step"] == 6
