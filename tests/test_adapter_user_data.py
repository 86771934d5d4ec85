"""``train adapter`` on a user's own model and data (issue 20, items 1, 2 and 6): a tiny random
student and a separate tiny random teacher with SD 2.1's classes and block layout, saved as
two diffusers folders; 64 user images of mixed sizes and modes (one corrupt, one missing) in a
JSONL file and the same in a WebDataset shard; a retrieval index built with ``index build
--pairs`` over other images; training through the CLI, the bad images listed in the run's
report; the bad-share stop, and the leakage checks (ids, content hashes, another model's
index) refusing before anything trains."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imageragturbo.commands.main import main
from imageragturbo.model import family
from imageragturbo.model.h_space import HAdapter
from imageragturbo.training import shards
from imageragturbo.training.adapter import AdapterConfig, AdapterRun

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (230, 210, 40), "purple": (140, 50, 170), "orange": (240, 140, 20)}
# (width, height, mode, format): photographs of any size and the modes users have
KINDS = [(200, 150, "RGB", "JPEG"), (150, 200, "L", "PNG"), (160, 160, "RGBA", "PNG"),
         (300, 180, "P", "PNG"), (180, 140, "EXIF", "JPEG"), (128, 128, "RGB", "PNG"),
         (140, 100, "LA", "PNG"), (96, 260, "RGB", "JPEG")]
CORRUPT, MISSING = 10, 20   # rows of the 64 training pairs


def _image(i: int, seed: int) -> tuple[bytes, str, str]:
    """One picture (an ellipse or a box of a colour on a background), encoded in one of
    ``KINDS``; its caption; its file suffix."""
    rng = np.random.default_rng([seed, i])
    w, h, mode, fmt = KINDS[i % len(KINDS)]
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), 2, replace=False)
    shape = ("circle", "box")[int(rng.integers(2))]
    im = Image.new("RGB", (w, h), COLOURS[names[bg]])
    x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    box = (x0, y0, x0 + w // 2, y0 + h // 2)
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[names[fg]])
    buf, kw = io.BytesIO(), {}
    if mode == "EXIF":
        exif = Image.Exif()
        exif[0x0112] = 6                          # stored sideways, seen upright
        kw["exif"] = exif
    elif mode == "RGBA" or mode == "LA":
        im = im.convert(mode)
        alpha = Image.new("L", (w, h), 0)
        ImageDraw.Draw(alpha).rectangle((4, 4, w - 5, h - 5), fill=255)
        im.putalpha(alpha)
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode == "L":
        im = im.convert("L")
    im.save(buf, fmt, **kw)
    caption = f"a {names[fg]} {shape} on {names[bg]}, picture {seed}-{i}"
    return buf.getvalue(), caption, ".jpg" if fmt == "JPEG" else ".png"


def _user_pairs(root, n: int, seed: int, prefix: str, bad: bool):
    """n pairs as image files + a JSONL file (ids ``prefix-NNN``), and the same pairs as one
    WebDataset shard (captions in KEY.txt and KEY.json alternately). With ``bad``: row
    CORRUPT is a JPEG cut in half and row MISSING has no image (no file; no member)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows, members = [], []
    for i in range(n):
        data, caption, suffix = _image(i, seed)
        key = f"{prefix}-{i:03d}"
        if bad and i == CORRUPT:
            data, suffix = _image(i + 1, seed)[0][:400], ".jpg"
        name = f"img/{key}{suffix}"
        if not (bad and i == MISSING):
            (root / name).write_bytes(data)
            members.append((f"{key}{suffix}", data))
        rows.append({"id": key, "caption": caption, "image": name})
        members.append((f"{key}.txt", caption.encode()) if i % 2 else
                       (f"{key}.json", json.dumps({"caption": caption, "key": key}).encode()))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with tarfile.open(root / "shard-00000.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return root / "pairs.jsonl", root / "shard-00000.tar"


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The student (no teacher inside), a separate teacher folder (its own UNet, the
    student's text encoder and VAE, as SD 2.1-base beside SD-Turbo), 64 training pairs,
    40 retrieval pairs and their index (built through the CLI), 12 prompts."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("user")
    student = family.sd21_layout_tiny(seed=0)
    family.save_sd_folder(student, root / "student")
    other = family.sd21_layout_tiny(seed=1)
    family.save_sd_folder(dataclasses.replace(student, unet=other.unet), root / "teacher")
    train_jsonl, shard = _user_pairs(root / "train", 64, 0, "train", bad=True)
    retr_jsonl, _ = _user_pairs(root / "retrieval", 40, 1, "retr", bad=False)
    assert main(["index", "build", "--pairs", str(retr_jsonl), "--model", str(root / "student"),
                 "--out", str(root / "index"), "--quiet"]) == 0
    (root / "prompts.txt").write_text("".join(
        f"a {c} {s} on {b}\n" for c, s, b in zip(COLOURS, ["circle", "box"] * 3,
                                                 list(COLOURS)[::-1]))
        + "".join(f"a small {c} circle\n" for c in COLOURS))
    return {"root": root, "student": root / "student", "teacher": root / "teacher",
            "jsonl": train_jsonl, "shard": shard, "index": root / "index",
            "prompts": root / "prompts.txt", "other": other}


def _cli(user, run_dir, pairs, *extra):
    return main(["train", "adapter", "--student", str(user["student"]),
                 "--teacher", str(user["teacher"]), "--pairs", str(pairs),
                 "--index", str(user["index"]), "--run-dir", str(run_dir), "--quick",
                 "--batch", "4", "--steps", "2", "--synth-prompts", "8", "--quiet",
                 "--threads", "2", *extra])


@pytest.fixture(scope="module")
def trained(user, tmp_path_factory):
    """``train adapter --student --teacher --pairs --prompts --index`` through the CLI, a few
    steps with half of each batch real pairs; its stderr."""
    import contextlib

    run = tmp_path_factory.mktemp("trained") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert _cli(user, run, user["jsonl"], "--prompts", str(user["prompts"]),
                    "--real-fraction", "0.5") == 0
    return run, err.getvalue()


@pytest.mark.timeout(150)
def test_train_adapter_on_a_users_model_and_pairs_skips_and_reports_bad_images(
        user, trained, tmp_path):
    """End to end on the CPU: 62 of 64 pairs kept, the corrupt and the missing image listed
    with their paths; the teacher's samples come from the prompts file; neighbours come from
    the user's index and none is a training item; the same pairs from the WebDataset shard
    give the same data."""
    run, err = trained
    assert "62 of 64 pairs kept, 2 skipped (1 corrupt, 1 missing)" in err
    report = json.loads((run / "data" / "report.json").read_text())
    assert (report["listed"], report["kept"], report["bad"]) == (64, 62, 2)
    assert report["resolution"] == 128 and report["min_image_side"] == 64
    bad = {b["id"]: b for b in report["bad_items"]}
    assert bad.keys() == {f"train-{CORRUPT:03d}", f"train-{MISSING:03d}"}
    assert bad[f"train-{CORRUPT:03d}"]["reason"] == "corrupt"
    assert bad[f"train-{MISSING:03d}"]["reason"] == "missing"
    assert bad[f"train-{MISSING:03d}"]["image"] == str(user["root"] / "train" / "img" /
                                                        f"train-{MISSING:03d}.jpg")
    assert "truncated" in bad[f"train-{CORRUPT:03d}"]["detail"]

    done = {st: json.loads((run / st / "done.json").read_text())
            for st in ("data", "synth", "neighbours", "train", "export")}
    assert (done["data"]["real_items"], done["data"]["prompts"]) == (62, 12)
    assert done["data"]["training_images_in_index"] == 0
    assert done["data"]["index_images_compared"] == 40
    items = [json.loads(x) for x in (run / "data" / "items.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in items] == ["pair"] * 62 + ["prompt"] * 12
    cache = shards.read_all(run / "data" / "shards", ("latents", "ehs"))
    assert cache["latents"].shape == (62, 4, 16, 16) and cache["ehs"].shape[0] == 74
    syn = shards.read_all(run / "synth" / "shards", ("item",))
    assert len(syn["item"]) == 8 and bool((syn["item"] >= 62).all())   # the prompts' rows
    nb = torch.load(run / "neighbours" / "neighbours.pt", weights_only=True)["ids"].numpy()
    assert nb.shape == (74, 4) and int(nb.max()) < 40
    index_ids = [json.loads(x)["id"] for x in
                 (user["index"] / "items.jsonl").read_text().splitlines()]
    assert all(index_ids[i].startswith("retr-") for i in nb.ravel())
    assert done["train"]["steps"] == 2 and np.isfinite(done["train"]["final_distill"])
    assert HAdapter.from_pretrained(run / "export" / "h_adapter").config.num_heads > 0
    rec = json.loads((run / "export" / "adapter_training.json").read_text())
    assert rec["config"]["teacher"] == str(user["teacher"])

    # the same pairs from a WebDataset shard: the same items, hashes and latents
    tar_run = tmp_path / "tar"
    assert _cli(user, tar_run, user["shard"], "--prompts", str(user["prompts"]),
                "--real-fraction", "0.5", "--stages", "data") == 0
    tar_items = [json.loads(x) for x in
                 (tar_run / "data" / "items.jsonl").read_text().splitlines()]
    assert [(r["id"], r["caption"], r["sha256"]) for r in tar_items] == \
        [(r["id"], r["caption"], r["sha256"]) for r in items]
    assert torch.equal(shards.read_all(tar_run / "data" / "shards", ("latents",))["latents"],
                       cache["latents"])
    tar_bad = json.loads((tar_run / "data" / "report.json").read_text())["bad_items"]
    assert {(b["id"], b["reason"]) for b in tar_bad} == {(f"train-{CORRUPT:03d}", "corrupt"),
                                                        (f"train-{MISSING:03d}", "missing")}
    assert all(b["image"].startswith(str(user["shard"]) + ":") for b in tar_bad)


def _run(user, path, pairs, index=None, **kw):
    cfg = AdapterConfig.quick(model=str(user["student"]), teacher=str(user["teacher"]),
                              pairs=(str(pairs),), **kw)
    return AdapterRun(path, cfg, index=index or user["index"], progress=False)


def test_more_bad_images_than_the_limit_stop_the_run_before_training(user, tmp_path):
    """10 pairs, 2 bad (one missing, one corrupt), limit 10%: a clear error naming the counts
    and the report, which lists both; nothing was cached, nothing trained. At 20% it runs."""
    rows = [json.loads(x) for x in user["jsonl"].read_text().splitlines()]
    pick = rows[:8] + [rows[CORRUPT], rows[MISSING]]
    for r in pick:
        r["image"] = str(user["jsonl"].parent / r["image"])
    pairs = tmp_path / "ten.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pick))
    with pytest.raises(ValueError, match=r"2 of 10 pairs are bad \(1 corrupt, 1 missing: "
                                         r"20.0%\), more than max_bad_share 10.0%") as e:
        _run(user, tmp_path / "run", pairs, max_bad_share=0.1, retrieval="none").run()
    report = tmp_path / "run" / "data" / "report.json"
    assert str(report) in str(e.value)
    rep = json.loads(report.read_text())
    assert rep["stopped"] and {b["reason"] for b in rep["bad_items"]} == {"corrupt", "missing"}
    assert not (tmp_path / "run" / "data" / "shards" / "manifest.json").exists()
    assert not (tmp_path / "run" / "train").exists()
    run = _run(user, tmp_path / "ok", pairs, max_bad_share=0.2, retrieval="none")
    out = run.run(["data"])
    assert out["data"]["real_items"] == 8 and run.cfg.n_train == 8


def test_prompts_alone_train_on_the_teachers_samples(user, tmp_path):
    """``--prompts`` without ``--pairs``: no real pairs (n_train 0), every target a teacher
    sample for a prompt of the file, neighbours from the user's index; a step trains."""
    cfg = AdapterConfig.quick(model=str(user["student"]), teacher=str(user["teacher"]),
                              prompts=str(user["prompts"]), synth_prompts=8, batch=4, steps=1)
    run = AdapterRun(tmp_path / "run", cfg, index=user["index"], progress=False)
    out = run.run()
    assert (out["data"]["real_items"], out["data"]["prompts"], run.cfg.n_train) == (0, 12, 0)
    assert out["neighbours"]["targets"] == 12 and np.isfinite(out["train"]["final_distill"])
    with pytest.raises(ValueError, match="real_fraction > 0 needs real pairs"):
        dataclasses.replace(cfg, real_fraction=0.5)


def _index_of(user, tmp_path, rows, model=None):
    from imageragturbo.model import load_retrieval_encoder
    from imageragturbo.retriever import Pair, build_index

    model = model or user["student"]
    return build_index([Pair(*r) for r in rows], load_retrieval_encoder(model),
                       tmp_path / "index", progress=False, model_source=str(model))


def _retrieval_rows(user, n=8):
    rows = [json.loads(x) for x in (user["root"] / "retrieval" / "pairs.jsonl").read_text()
            .splitlines()[:n]]
    return [(r["id"], r["caption"], str(user["root"] / "retrieval" / r["image"])) for r in rows]


def test_a_training_image_in_the_index_is_refused_by_content_hash(user, tmp_path):
    """The index holds a copy of a training image's file under another id and path: refused
    by content hash (sha256), naming both, before anything is cached."""
    import shutil

    copy = tmp_path / "copy.png"
    shutil.copy(user["jsonl"].parent / "img" / "train-005.png", copy)
    index = _index_of(user, tmp_path, _retrieval_rows(user) + [("elsewhere-1", "x", str(copy))])
    with pytest.raises(ValueError, match=r"holds 1 images that are also training images "
                                         r"\(the same file content, sha256\), e\.g\. training "
                                         r"'train-005'.*'elsewhere-1'"):
        _run(user, tmp_path / "run", user["jsonl"], index=index).run()
    assert not (tmp_path / "run" / "data" / "shards" / "manifest.json").exists()


def test_a_training_id_in_the_index_is_refused_before_any_image_is_read(user, tmp_path):
    rows = _retrieval_rows(user)
    rows[3] = ("train-007", rows[3][1], rows[3][2])
    index = _index_of(user, tmp_path, rows)
    with pytest.raises(ValueError, match=r"holds 1 training items \(e\.g\. \['train-007'\]\)"):
        _run(user, tmp_path / "run", user["jsonl"], index=index).run()
    assert not (tmp_path / "run" / "data" / "report.json").exists()   # no image was read


def test_an_index_of_another_model_is_refused_before_anything_trains(user, tmp_path):
    """An index built with the teacher's folder (the same text encoder and VAE, another UNet,
    so other cached H features): refused by its model identity, before the data stage."""
    from imageragturbo.retriever import IndexFormatError

    index = _index_of(user, tmp_path, _retrieval_rows(user), model=user["teacher"])
    with pytest.raises(IndexFormatError, match="built with model 'teacher:"):
        _run(user, tmp_path / "run", user["jsonl"], index=index).run()
    assert not (tmp_path / "run" / "data" / "shards" / "manifest.json").exists()
    assert not (tmp_path / "run" / "train").exists()


def test_the_teacher_must_read_the_students_text_states_and_latents(user, tmp_path):
    """A teacher folder with its own text encoder is refused with what differs; a student
    folder without teacher_unet/ and no --teacher says to give one; pairs without an index
    say how to build one."""
    alien = family.sd21_layout_tiny(seed=2)
    family.save_sd_folder(dataclasses.replace(alien, vae=user["other"].vae), tmp_path / "t")
    cfg = AdapterConfig.quick(model=str(user["student"]), teacher=str(tmp_path / "t"),
                              pairs=(str(user["jsonl"]),))
    with pytest.raises(ValueError, match=r"its text_encoder/ is not the student's"):
        AdapterRun(tmp_path / "a", cfg, index=user["index"], progress=False)
    cfg = AdapterConfig.quick(model=str(user["student"]), pairs=(str(user["jsonl"]),))
    with pytest.raises(ValueError, match="no teacher_unet/.*--teacher DIR"):
        AdapterRun(tmp_path / "b", cfg, index=user["index"], progress=False)
    cfg = dataclasses.replace(cfg, teacher=str(user["teacher"]))
    with pytest.raises(ValueError, match="index build --pairs"):
        AdapterRun(tmp_path / "c", cfg, progress=False)


def test_a_run_folder_from_before_new_configuration_fields_still_resumes(tmp_path):
    """A run folder whose recorded configuration predates fields added since (at their
    defaults) is the same configuration; a changed value is still refused."""
    from dataclasses import asdict

    from imageragturbo.training.stages import StagedRun

    class Run(StagedRun):
        config_file = "adapter.json"

    old = asdict(AdapterConfig())
    for key in ("teacher", "pairs", "prompts", "min_image_side", "max_bad_share", "threads"):
        old.pop(key)
    (tmp_path / "adapter.json").write_text(json.dumps(old))
    Run(tmp_path, AdapterConfig())
    assert "max_bad_share" in json.loads((tmp_path / "adapter.json").read_text())
    (tmp_path / "adapter.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="different recipe configuration"):
        Run(tmp_path, AdapterConfig(max_bad_share=0.5))


@pytest.mark.timeout(150)
def test_the_trained_adapter_installs_exports_and_generates_with_the_users_index(
        user, trained, tmp_path):
    """The run's adapter and decoder LoRA installed into a copy of the student, exported to
    ONNX and run as served (``imageragturbo generate`` on the export: the five graphs in
    ONNX Runtime, retrieval from the user's index through the H-adapter): an image and its
    neighbours, which are the user's retrieval pairs."""
    import shutil

    from imageragturbo.training.adapter import install

    model = tmp_path / "student"
    shutil.copytree(user["student"], model)
    install(trained[0], model)
    assert (model / "h_adapter").is_dir() and (model / family.LORA_DIR).is_dir()
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "onnx"),
                 "--quiet"]) == 0
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert main(["generate", "--model", str(model), "--onnx", str(tmp_path / "onnx"),
                     "--index", str(user["index"]), "--k", "2", "--threads", "2", "--quiet",
                     "-o", str(tmp_path / "out.png"), "a red circle on blue"]) == 0
    info = json.loads(out.getvalue())
    assert info["injection"].startswith("h_adapter")
    assert [n["id"][:5] for n in info["neighbours"][0]] == ["retr-", "retr-"]
    img = np.asarray(Image.open(info["images"][0]))
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
