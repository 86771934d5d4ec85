"""ImageRAGTurbo fine-tuning (``imageragturbo train adapter``, training/adapter.py): the losses
of Eq. 10 fall on a fixed batch, the run retrieves from the index and never hands a target
back to itself, refuses another model's index and a corrupted checkpoint with the path named,
clamps k to the index, resumes to the same losses after an interruption, and installs an
adapter + decoder LoRA that the model then loads (and without which it is the student)."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from imageragturbo.model import family
from imageragturbo.model.h_space import HAdapter, adapter_config_for
from imageragturbo.model.lora import add_decoder_lora, lora_parameters
from imageragturbo.training import base, ladd
from imageragturbo.training.adapter import AdapterConfig, AdapterRun, install
from imageragturbo.training.stages import CheckpointError


@pytest.fixture(scope="module")
def model_and_index(tmp_path_factory):
    """A copy of the shipped tiny-shapes without its adapter (the student to fine-tune), and a
    48-item index of ShapesWorld's retrieval split built with its encoder."""
    import shutil

    from imageragturbo import shapesworld as sw
    from imageragturbo.model import load_retrieval_encoder
    from imageragturbo.retriever import build_index, shapesworld_pairs

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("adapter")
    model = root / "tiny-shapes"
    shutil.copytree(family.resolve("tiny-shapes"), model,
                    ignore=shutil.ignore_patterns("h_adapter", "unet_lora", "*.json.bak"))
    for sub in ("h_adapter", family.LORA_DIR):
        if (model / sub).exists():
            shutil.rmtree(model / sub)
    sw.build_dataset(root / "data", {"retrieval": 48}, progress=False)
    build_index(shapesworld_pairs(root / "data", "retrieval"), load_retrieval_encoder(model),
                root / "index", progress=False, model_source=str(model))
    return model, root / "index", root / "data"


def _run(path, model_and_index, **kw):
    model, index, data = model_and_index
    reconfigure = kw.pop("reconfigure", False)
    cfg = AdapterConfig.quick(model=str(model), **kw)
    return AdapterRun(path, cfg, index=index, data=data, progress=False,
                      reconfigure=reconfigure)


def test_losses_of_eq10_fall_on_a_fixed_batch_and_only_adapter_and_lora_train():
    """All three terms of Eq. 10 on (adv_weight 1, the paper's): distillation and perceptual
    losses fall on a fixed batch; the student's base weights and the teacher stay frozen."""
    torch.manual_seed(0)
    c = family.load_components("tiny-shapes", with_teacher=True, retrieval_tuned=False)
    student, teacher = c.unet.train(), c.teacher_unet.requires_grad_(False)
    add_decoder_lora(student, rank=4)
    frozen = {n: p.clone() for n, p in student.named_parameters() if "lora_" not in n}
    adapter = HAdapter(adapter_config_for(student))
    disc = ladd.LADDDiscriminator(teacher, text_dim=64)
    perc = ladd.LatentPerceptual(ladd.UNetEncoder(teacher), torch.zeros(1, 24, 64))
    opt_g = torch.optim.AdamW([*adapter.parameters(), *lora_parameters(student)], 2e-3,
                              betas=(0.0, 0.99))
    opt_d = torch.optim.AdamW(disc.trainable_parameters(), 1e-3, betas=(0.0, 0.99))
    ac = c.alphas_cumprod
    g = torch.Generator().manual_seed(1)
    z_t, z0 = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    ehs, pooled = torch.randn(4, 24, 64, generator=g), torch.randn(4, 64, generator=g)
    s, eps = torch.randint(0, 750, (4,), generator=g), torch.randn(4, 4, 16, 16, generator=g)
    h_retr, lam = torch.randn(4, 2, 96, 4, 4, generator=g), torch.full((4,), 0.9)
    one_step = base.OneStepStudent(student, ac)
    losses = [base.ladd_step(one_step, disc, opt_g, opt_d, z_t, z0, ehs, pooled, s, eps, ac,
                             h_edit=lambda h: adapter(h, h_retr, lam),
                             perceptual=lambda a, b: perc(a, b),
                             perceptual_weight=1.0) for _ in range(12)]
    assert np.mean([x["distill"] for x in losses[-3:]]) < losses[0]["distill"]
    assert np.mean([x["lpips"] for x in losses[-3:]]) < losses[0]["lpips"]
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters()
               if "lora_" not in n)
    assert adapter.proj_out.weight.abs().sum() > 0  # the zero-initialised output moved


def test_latent_perceptual_distance_is_zero_for_equal_latents_and_augments_both_alike():
    c = family.load_components("tiny-shapes", with_teacher=True, retrieval_tuned=False)
    perc = ladd.LatentPerceptual(ladd.UNetEncoder(c.teacher_unet), torch.zeros(1, 24, 64))
    z = torch.randn(3, 4, 16, 16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert perc(z, z.clone(), gen).item() == pytest.approx(0.0, abs=1e-6)
        assert perc(z, z + 0.5 * torch.randn_like(z)).item() > 0.01
    a, b = ladd.paired_augment(z, z.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, z)


def test_run_retrieves_from_the_index_never_itself_and_installs_a_loadable_model(
        tmp_path, model_and_index):
    model = model_and_index[0]
    run = _run(tmp_path / "run", model_and_index)
    out = run.run()
    nb = out["neighbours"]
    assert nb["k"] == 4 and nb["targets"] == 64 and nb["index_items"] == 48
    ids = torch.load(tmp_path / "run" / "neighbours" / "neighbours.pt")["ids"]
    assert ids.shape == (64, 4) and int(ids.max()) < 48
    # what was stored, checked from the artefacts: no neighbour is a training item (by id) or
    # has a target's very latent (its own image)
    from imageragturbo import shapesworld as sw
    from imageragturbo.retriever import RetrievalIndex

    index = RetrievalIndex.load(model_and_index[1])
    train_ids = {it.id for it in sw.make_split("train", 64, 0)}
    assert not {index.item_ids[i] for i in ids.numpy().ravel()} & train_ids
    lat = run.cache["latents"].numpy()
    same = index.latents(ids.numpy()).astype(np.float16) == lat[:, None]
    assert not same.reshape(*ids.shape, -1).all(-1).any()
    assert out["train"]["lora_parameters"] > 0 and out["train"]["adapter_parameters"] > 0
    export = tmp_path / "run" / "export"
    from safetensors.torch import load_file

    weights = load_file(export / "h_adapter" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}     # shipped in fp16
    assert (export / family.LORA_DIR / "lora.safetensors").is_file()
    rec = json.loads((export / "adapter_training.json").read_text())
    assert rec["config"]["retrieval"] == "index" and rec["train"]["steps"] == 4

    student = family.load_components(model)
    assert student.h_adapter is None
    install(tmp_path / "run", model)
    tuned = family.load_components(model)
    plain = family.load_components(model, retrieval_tuned=False)
    assert tuned.h_adapter is not None and plain.h_adapter is None
    # LoRA merged into the decoder only: the encoder (whose h the index caches) is unchanged
    enc_t = {n: p for n, p in tuned.unet.named_parameters() if not n.startswith("up_blocks")}
    assert all(torch.equal(p, dict(plain.unet.named_parameters())[n]) for n, p in enc_t.items())
    assert any(not torch.equal(p, dict(plain.unet.named_parameters())[n])
               for n, p in tuned.unet.named_parameters() if n.startswith("up_blocks"))
    # `eval run --pipeline adapter|slerp`: the installed model through retrieval, scored
    from imageragturbo import evaluate

    index = model_and_index[1]
    for pipeline in ("adapter", "slerp"):
        res = evaluate.run(str(model), pipeline, n=4, k=2, index=index, progress=False)
        assert 0.0 <= res["tifa"] <= 1.0 and np.isfinite(res["fd"]) and res["n_prompts"] == 4


def test_an_index_of_another_model_is_refused_before_training(tmp_path, model_and_index):
    import shutil

    from imageragturbo.retriever import IndexFormatError

    model, index, data = model_and_index
    other = tmp_path / "index"
    shutil.copytree(index, other)
    m = json.loads((other / "manifest.json").read_text())
    m["model_id"] = "some-other-model:0123456789ab"
    (other / "manifest.json").write_text(json.dumps(m))
    run = AdapterRun(tmp_path / "run", AdapterConfig.quick(model=str(model)), index=other,
                     data=data, progress=False)
    with pytest.raises((IndexFormatError, ValueError), match="some-other-model"):
        run.run()
    assert not (tmp_path / "run" / "train").exists()


def test_k_larger_than_the_index_is_clamped(tmp_path, model_and_index, capsys):
    model, index, data = model_and_index
    run = AdapterRun(tmp_path / "run", AdapterConfig.quick(model=str(model), k_max=60),
                     index=index, data=data, progress=True)
    out = run.run(["data", "neighbours"])
    assert out["neighbours"]["k"] == 48
    assert capsys.readouterr().err.count("larger than the index") == 1


def test_an_interrupted_run_resumes_to_the_same_losses(tmp_path, model_and_index):
    whole = _run(tmp_path / "whole", model_and_index).run()
    hist_whole = json.loads((tmp_path / "whole" / "train" / "history.json").read_text())
    # the same run stopped after the checkpoint at step 2: no done marker, a checkpoint
    part = tmp_path / "part"
    _run(part, model_and_index, steps=2).run()
    (part / "train" / "done.json").unlink()
    kept = sorted((part / "train" / "checkpoints").glob("checkpoint-*"))  # accelerate's
    assert [p.name for p in kept] == ["checkpoint-0000002"]
    assert json.loads((kept[0] / "meta.json").read_text())["step"] == 2
    resumed = _run(part, model_and_index, reconfigure=True).run()
    hist_part = json.loads((part / "train" / "history.json").read_text())
    assert [h["step"] for h in hist_part] == [0, 1, 2, 3]
    for a, b in zip(hist_whole, hist_part):
        assert set(a) - {"seconds"} == set(b) - {"seconds"} >= {"step", "distill", "lpips"}
        for key in set(a) - {"step", "seconds"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert resumed["train"]["steps"] == whole["train"]["steps"]
    # checkpoints_total_limit (2): of the one at step 2 and the one at step 4, both kept;
    # with 1, only the newest
    assert len(list((part / "train" / "checkpoints").glob("checkpoint-*"))) == 2
    (part / "train" / "done.json").unlink()
    _run(part, model_and_index, steps=6, checkpoints_total_limit=1, reconfigure=True).run(
        ["train"])
    assert [p.name for p in (part / "train" / "checkpoints").glob("checkpoint-*")] == \
        ["checkpoint-0000006"]


def test_a_corrupted_checkpoint_is_refused_with_its_path(tmp_path, model_and_index):
    run_dir = tmp_path / "run"
    _run(run_dir, model_and_index, steps=2).run(["data", "synth", "neighbours"])
    (run_dir / "train").mkdir()
    (run_dir / "train" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(run_dir / "train" / "ckpt.pt")):
        _run(run_dir, model_and_index, steps=2, reconfigure=True).run(["train"])


def test_control_and_ablation_switches_reach_the_configuration():
    assert AdapterConfig(retrieval="none").retrieval == "none"
    with pytest.raises(ValueError, match="retrieval"):
        AdapterConfig(retrieval="sometimes")
    with pytest.raises(ValueError, match="lam"):
        AdapterConfig(lam="half")
    cfg = dataclasses.replace(AdapterConfig(), lora=False, perceptual_weight=0.0)
    assert not cfg.lora and cfg.perceptual_weight == 0.0
    assert copy.deepcopy(cfg) == cfg


def test_scene_neighbour_is_the_targets_own_scene_jittered_and_trains(tmp_path, model_and_index):
    """The augmentation neighbour (``scene_neighbour``): each training item's cached h is of a
    re-render of its own scene (closer to the h of its own render than to any other item's),
    not the same render, and a run with it trains and exports."""
    from imageragturbo import shapesworld as sw
    from imageragturbo.model.unet_split import UNetEncoder
    from imageragturbo.training.steps import to_unit

    run = _run(tmp_path / "run", model_and_index, scene_neighbour=1.0, real_fraction=0.5,
               real_input="noise", positional=True)
    out = run.run()
    assert out["train"]["steps"] == 4 and np.isfinite(out["train"]["final_distill"])
    cache = run.cache
    scene_h = cache["scene_h"].float()                                    # (64, C, h, w)
    assert scene_h.shape == (64, 96, 4, 4)
    items = sw.make_split("train", 64, 0)
    imgs = np.stack([np.asarray(sw.render(it.scene)) for it in items])
    with torch.no_grad():
        z = run.c.vae.encode(to_unit(imgs)).latent_dist.mode() * run.c.vae.config.scaling_factor
        own = UNetEncoder(run.c.unet)(z, torch.zeros(64, dtype=torch.long),
                                      cache["ehs"].float())[0]
    a = torch.nn.functional.normalize(scene_h.flatten(1), dim=1)
    b = torch.nn.functional.normalize(own.flatten(1), dim=1)
    sim = a @ b.T                                                         # (64, 64)
    assert (sim.argmax(1) == torch.arange(64)).float().mean() >= 0.9
    assert not torch.allclose(scene_h, own.half().float())                # jittered, not the same


def test_jittered_scenes_keep_their_captions_true():
    from imageragturbo import shapesworld as sw
    from imageragturbo import tifa

    items = sw.make_split("train", 40, 3)
    rng = np.random.default_rng(0)
    jittered = [sw.jitter(it.scene, rng) for it in items]
    images = [np.asarray(sw.render(s)) for s in jittered]
    records = [(it.id, it.caption, it.scene) for it in items]
    acc = [p["accuracy"] for p in tifa.score(records, images)["per_prompt"]]
    plain = [p["accuracy"] for p in tifa.score(
        records, [np.asarray(sw.render(it.scene)) for it in items])["per_prompt"]]
    assert np.mean(acc) >= np.mean(plain) - 0.02
    moved = [max(abs(a[1] - b[1]), abs(a[2] - b[2])) for it, s in zip(items, jittered)
             for a, b in zip(it.scene.objects, s.objects)]
    assert 0 < max(moved) <= 3 / 64 + 1e-9


# ---------------------------------------------------------------------- issue 22, item 4.7


def _index_copy(src, dst, items=None, latents=None):
    """A copy of the index at ``src`` with items.jsonl rows and latents rows replaced
    ({row: dict} / {row: array}), its manifest's sizes and checksums updated to match."""
    import shutil

    from imageragturbo.checksums import sha256_file

    shutil.copytree(src.resolve(), dst)
    if items:
        rows = [json.loads(line) for line in (dst / "items.jsonl").read_text().splitlines()]
        for i, new in items.items():
            rows[i].update(new)
        (dst / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if latents:
        arr = np.load(dst / "latents.f16.npy")
        for i, new in latents.items():
            arr[i] = new
        np.save(dst / "latents.f16.npy", arr)
    m = json.loads((dst / "manifest.json").read_text())
    for entry in m["files"].values():
        f = dst / entry["name"]
        entry["bytes"], entry["sha256"] = f.stat().st_size, sha256_file(f)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _neighbours_run(path, model_and_index, index, **kw):
    model, _, data = model_and_index
    return AdapterRun(path, AdapterConfig.quick(model=str(model), **kw), index=index,
                      data=data, progress=False, reconfigure=True)


def test_an_index_holding_a_training_item_is_refused_by_id_not_by_caption(tmp_path,
                                                                          model_and_index):
    """The leakage check compares the training split's ids with the index's item ids: an
    index row whose id is a training item's is refused (whatever its caption); a row that only
    shares a training item's caption (a scene drawn in both splits) is not a leak."""
    from imageragturbo import shapesworld as sw

    train = sw.make_split("train", 64, 0)
    index = model_and_index[1]
    leaked = _index_copy(index, tmp_path / "leaked", items={7: {"id": train[3].id}})
    with pytest.raises(ValueError, match=rf"holds 1 training items \(e.g. \['{train[3].id}'\]\)"):
        _neighbours_run(tmp_path / "a", model_and_index, leaked).run(["data", "neighbours"])
    assert not (tmp_path / "a" / "neighbours" / "neighbours.pt").exists()
    same_caption = _index_copy(index, tmp_path / "caption",
                               items={7: {"caption": train[3].caption}})
    out = _neighbours_run(tmp_path / "b", model_and_index, same_caption).run(
        ["data", "neighbours"])
    assert out["neighbours"]["k"] == 4                  # not refused: the neighbours were found
    assert (tmp_path / "b" / "neighbours" / "neighbours.pt").is_file()


def test_a_neighbour_with_the_targets_own_image_is_dropped_by_code(tmp_path, model_and_index):
    """An index row that holds a training target's very latent (its render, under another
    id) is dropped from that target's neighbours, the next candidate moving up, and counted;
    by code, not by an ``assert`` (which ``python -O`` strips)."""
    import shutil

    index = model_and_index[1]
    copy = _index_copy(index, tmp_path / "index")
    run = _neighbours_run(tmp_path / "run", model_and_index, copy)
    first = run.run(["data", "neighbours"])["neighbours"]
    assert first["dropped_neighbours_with_the_targets_image"] == 0
    before = torch.load(tmp_path / "run" / "neighbours" / "neighbours.pt")["ids"].numpy()
    t = 5
    j = int(before[t, 0])                                   # target t's top neighbour
    shutil.rmtree(copy)
    _index_copy(index, copy, latents={j: run.cache["latents"][t].numpy()})
    shutil.rmtree(tmp_path / "run" / "neighbours")
    out = _neighbours_run(tmp_path / "run", model_and_index, copy).run(["neighbours"])
    after = torch.load(tmp_path / "run" / "neighbours" / "neighbours.pt")["ids"].numpy()
    assert j not in after[t] and after[t, :3].tolist() == before[t, 1:].tolist()
    assert out["neighbours"]["dropped_neighbours_with_the_targets_image"] >= 1
    others = np.arange(len(after)) != t
    assert np.array_equal(after[others], before[others])    # nobody else loses a neighbour


def test_the_final_own_image_check_raises_value_error(tmp_path, model_and_index, monkeypatch):
    """The stage's last line of defence, an explicit check (ValueError, kept under
    ``python -O``): fed a neighbour list in which target 2's first neighbour has the target's
    latent, though the selection saw other latents, it refuses to write the neighbours."""
    run = _neighbours_run(tmp_path / "run", model_and_index, model_and_index[1])
    run.run(["data"])
    index = run.index
    real, lat = index.latents, run.cache["latents"].numpy()

    def latents(ids):  # the selection asks for k + 4 candidates, the final check for k
        out = real(ids)
        if ids.shape[1] == 4:
            out[2, 0] = lat[2]
        return out

    monkeypatch.setattr(index, "latents", latents)
    with pytest.raises(ValueError, match="training target 2 has its own image"):
        run.run(["neighbours"])
    assert not (tmp_path / "run" / "neighbours" / "neighbours.pt").exists()


def test_lambda_is_the_top1_similarity_or_one_as_configured(tmp_path, model_and_index,
                                                            monkeypatch):
    """``lam="similarity"`` (Eq. 5): the adapter gets each target's top-1 neighbour's cosine;
    ``lam="one"``: 1 for every target. Recorded from the adapter's own calls in training."""
    import shutil

    from imageragturbo.training import adapter_train as adapter_mod

    seen: list[torch.Tensor] = []

    class Recording(adapter_mod.HAdapter):
        def forward(self, h_tgt, h_retr, lam):
            seen.append(lam.detach().cpu().clone())
            return super().forward(h_tgt, h_retr, lam)

    monkeypatch.setattr(adapter_mod, "HAdapter", Recording)
    path = tmp_path / "run"
    _run(path, model_and_index, steps=1, lora=False, perceptual_weight=0.0).run()
    top1 = torch.load(path / "neighbours" / "neighbours.pt")["scores"][:, 0]
    sim = torch.cat(seen)
    assert len(sim) >= 8 and (sim < 0.999).any()
    assert all(bool(torch.isclose(top1, v).any()) for v in sim)   # each one a target's top-1
    seen.clear()
    shutil.rmtree(path / "train")
    _run(path, model_and_index, steps=1, lora=False, perceptual_weight=0.0, lam="one",
         reconfigure=True).run(["train"])
    assert len(seen) >= 1 and all(torch.equal(v, torch.ones_like(v)) for v in seen)


def test_decoder_attention_trains_exports_installs_and_is_refused_for_the_control(
        tmp_path, model_and_index):
    """Beyond the paper (``--decoder-attention``): its gates leave zero in training, the run
    exports ``neighbour_attention/``, install copies it and the model then loads it."""
    import shutil

    from imageragturbo.model.neighbour_attention import FOLDER, NeighbourAttention

    with pytest.raises(ValueError, match="decoder_attention needs retrieval"):
        AdapterConfig(decoder_attention=True, retrieval="none")
    out = _run(tmp_path / "run", model_and_index, decoder_attention=True).run()
    assert out["train"]["decoder_attention_parameters"] > 0
    m = NeighbourAttention.from_pretrained(tmp_path / "run" / "export" / FOLDER)
    assert any(float(g.detach().abs().max()) > 0 for g in m.gate.values())
    model = tmp_path / "model"
    shutil.copytree(model_and_index[0], model)
    install(tmp_path / "run", model)
    assert (model / FOLDER / "diffusion_pytorch_model.safetensors").is_file()
    assert family.load_components(model).neighbour_attention is not None


def test_neighbour_sdedit_targets_keep_the_neighbours_layout_and_init_starts_from_it(
        tmp_path, model_and_index):
    """Beyond the paper (``--neighbour-sdedit S --neighbour-init``): the teacher's targets are
    SDEdits of each target's top-1 neighbour, so they lie nearer that neighbour's latent than
    samples from noise do; with ``neighbour_init`` the student is trained from the start the
    teacher took (the neighbour noised to the SDEdit timestep, which the run records), and a
    neighbour start at that timestep moves the student's output towards the neighbour. The
    validation grid's retrieval row starts the way it is served: from the start neighbour."""
    from PIL import Image

    from imageragturbo.model.pipeline import noised, sdedit_timestep, student_generate
    from imageragturbo.training import shards

    with pytest.raises(ValueError, match="neighbour_init needs neighbour_sdedit"):
        AdapterConfig(neighbour_init=True)
    run = _run(tmp_path / "run", model_and_index, neighbour_sdedit=0.5, neighbour_init=True,
               synth_steps=4, validation_every=1)
    run.run(["data", "neighbours", "synth"])
    c = run.c
    t_init = sdedit_timestep(c, 4, 0.5)
    # the grid before the first update (adapter and LoRA still the identity), rendered here
    # by the public generator: top row from the start neighbour at t_init, bottom from z_T
    val = shards.read_all(tmp_path / "run" / "synth" / "shards", ("item",))["item"][:4].numpy()
    caps = [run.items[int(r)]["caption"] for r in val]
    seeds = [20_000_000 + int(r) for r in val]
    want_on = student_generate(c, caps, seeds, z_init=run._start_latents(val), t_init=t_init)
    want_off = student_generate(c, caps, seeds)
    out = run.run()
    grid = np.asarray(Image.open(tmp_path / "run" / "train" / "validation" / "step-000001.png"),
                      np.int16)
    side = grid.shape[0] // 2
    got_on = grid[:side].reshape(side, 4, side, 3).transpose(1, 0, 2, 3)
    got_off = grid[side:].reshape(side, 4, side, 3).transpose(1, 0, 2, 3)
    assert np.abs(got_off - want_off).mean() < 2 and np.abs(got_on - want_on).mean() < 2
    assert np.abs(got_on - want_off).mean() > 10 * np.abs(got_on - want_on).mean()
    assert out["train"]["neighbour_init_timestep"] == t_init
    assert 0 < t_init < 999
    syn = shards.read_all(tmp_path / "run" / "synth" / "shards", ("item", "z0"))
    top1 = run._start_latents(syn["item"].numpy())        # start_pool 1: the top-1
    plain = _run(tmp_path / "plain", model_and_index, synth_steps=4)
    plain.run()
    syn0 = shards.read_all(tmp_path / "plain" / "synth" / "shards", ("item", "z0"))
    assert torch.equal(syn["item"], syn0["item"])        # same prompts, same z_T
    near = (syn["z0"] - top1).pow(2).mean()
    far = (syn0["z0"] - top1).pow(2).mean()
    assert near < 0.5 * far, (near, far)
    # the start: at t_init the neighbour is still visible in the noised latent
    eps = torch.randn_like(top1)
    z = noised(c, top1, eps, t_init)
    assert torch.corrcoef(torch.stack([z.flatten(), top1.flatten()]))[0, 1] > 0.5
    # served from the neighbour, the student's output lies nearer it than from noise
    prompts = ["a red circle"] * 2
    _, from_noise = student_generate(c, prompts, [0, 1], return_latents=True)
    _, from_nb = student_generate(c, prompts, [0, 1], return_latents=True,
                                  z_init=top1[:2], t_init=t_init)
    assert (from_nb - top1[:2]).pow(2).mean() < (from_noise - top1[:2]).pow(2).mean()
    with pytest.raises(ValueError, match="z_init and t_init go together"):
        student_generate(c, prompts, [0, 1], z_init=top1[:2])


def test_plain_targets_train_the_retrieval_off_path_and_start_pool_draws_the_start(
        tmp_path, model_and_index, monkeypatch):
    """Beyond the paper: ``plain_fraction`` stores the teacher's plain sample (from z_T, no
    neighbour) beside each SDEdit target, and that share of a batch reaches the student at
    t = 999 from pure z_T with the adapter bypassed (retrieval off, as K = 0 is served);
    ``start_pool`` P draws each target's start from its top P neighbours, in synth (the
    teacher's SDEdit lies nearer the drawn neighbour than the top-1) and in train (the first
    neighbour attended to is the start)."""
    from imageragturbo.defaults import STUDENT_TIMESTEP
    from imageragturbo.model.pipeline import sdedit_timestep
    from imageragturbo.training import adapter_train as adapter_mod
    from imageragturbo.training import shards

    with pytest.raises(ValueError, match="plain_fraction needs neighbour_init"):
        AdapterConfig(plain_fraction=0.5)
    with pytest.raises(ValueError, match="start_pool needs neighbour_sdedit"):
        AdapterConfig(start_pool=2)
    with pytest.raises(ValueError, match="start_pool must be in"):
        AdapterConfig(neighbour_sdedit=0.5, start_pool=5)

    calls: list[dict] = []
    real_step = adapter_mod.ladd_step

    def spy(one_step, disc, opt_g, opt_d, z_t, z0, ehs, *a, h_edit=None, t=None, **kw):
        h = torch.randn(len(z_t), *h_shape)
        calls.append({"t": t.cpu().clone(), "z_t": z_t.cpu().clone(), "z0": z0.cpu().clone(),
                      "edited_equal": [bool(torch.equal(x, y)) for x, y in zip(h_edit(h), h)]})
        return real_step(one_step, disc, opt_g, opt_d, z_t, z0, ehs, *a, h_edit=h_edit, t=t,
                         **kw)

    monkeypatch.setattr(adapter_mod, "ladd_step", spy)
    run = _run(tmp_path / "run", model_and_index, neighbour_sdedit=0.5, neighbour_init=True,
               synth_steps=4, plain_fraction=0.5, start_pool=3, steps=3, lora=False)
    h_shape = run.h_shape()
    out = run.run()
    t_init = sdedit_timestep(run.c, 4, 0.5)
    assert out["train"]["neighbour_init_timestep"] == t_init
    # the export records the pool, which serve then draws from by default
    start = family.neighbour_start_of(run.c, tmp_path / "run" / "export" / "adapter_training.json")
    assert start["timestep"] == t_init and start["pool"] == 3
    syn = shards.read_all(tmp_path / "run" / "synth" / "shards", ("item", "z0", "z0_plain"))
    items = syn["item"].numpy()
    ids = torch.load(tmp_path / "run" / "neighbours" / "neighbours.pt")["ids"].numpy()
    slots = run.start_slots(len(ids))
    assert set(slots[items].tolist()) == {0, 1, 2}           # the starts are drawn from the top 3
    start = run._start_latents(items)
    top1 = torch.from_numpy(run.index.latents(ids[items, 0]).astype(np.float32))
    moved = slots[items] > 0
    assert ((syn["z0"] - start).pow(2).mean((1, 2, 3))[moved].mean()
            < (syn["z0"] - top1).pow(2).mean((1, 2, 3))[moved].mean())
    # the plain samples are the teacher's from the same z_T, not SDEdits: farther from the start
    assert (syn["z0_plain"] - start).pow(2).mean() > (syn["z0"] - start).pow(2).mean()
    assert not torch.equal(syn["z0_plain"], syn["z0"])
    # in train: plain rows at t = 999, the adapter bypassed for them and only them
    n_real = round(8 * AdapterConfig.quick().real_fraction)
    ts = torch.cat([c["t"][n_real:] for c in calls])
    assert set(ts.tolist()) == {STUDENT_TIMESTEP, t_init}
    # (the adapter's output starts at zero: from the second step on it edits h)
    off = np.concatenate([c["edited_equal"][n_real:] for c in calls[1:]])
    ts_later = torch.cat([c["t"][n_real:] for c in calls[1:]])
    assert (off == (ts_later == STUDENT_TIMESTEP).numpy()).all() and off.any() and not off.all()
    plain_rows = [(c["z0"][n_real:][c["t"][n_real:] == STUDENT_TIMESTEP]) for c in calls]
    for z in plain_rows:                       # each plain row's target is a stored z0_plain
        for row in z:
            assert any(torch.equal(row, p) for p in syn["z0_plain"].float())
