"""ShapesWorld: determinism, the documented long tail of the splits, geometry, data set I/O."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from imageragturbo import shapesworld as sw


def _files(root):
    return {p.relative_to(root).as_posix(): sw.sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_same_bytes_and_worker_count_does_not_matter(tmp_path):
    counts = {"train": 60, "retrieval": 30, "eval": 20}
    a = sw.build_dataset(tmp_path / "a", counts, seed=3, workers=1, progress=False)
    b = sw.build_dataset(tmp_path / "b", counts, seed=3, workers=2, progress=False)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 60 + 30 + 20 + 3 + 1  # PNGs, 3 manifests, world.json
    assert fa == fb


def test_other_seed_gives_other_data(tmp_path):
    counts = {"eval": 20}
    a = sw.build_dataset(tmp_path / "a", counts, seed=0, workers=1, progress=False)
    b = sw.build_dataset(tmp_path / "b", counts, seed=1, workers=1, progress=False)
    assert (a / "eval.jsonl").read_bytes() != (b / "eval.jsonl").read_bytes()


def test_manifest_records_caption_image_and_scene(tmp_path):
    root = sw.build_dataset(tmp_path / "d", {"eval": 5}, workers=1, progress=False)
    recs = sw.load_manifest(root, "eval")
    assert [r["id"] for r in recs] == [f"eval-{i:06d}" for i in range(5)]
    for r in recs:
        assert (root / r["image"]).is_file()
        scene = sw.Scene.from_json(r["scene"])
        assert scene.to_json() == r["scene"]
        assert r["caption"]
    world = json.loads((root / "world.json").read_text())
    assert world["manifests"]["eval"] == sw.sha256_file(root / "eval.jsonl")


def test_existing_output_is_not_overwritten_without_asking(tmp_path):
    sw.build_dataset(tmp_path / "d", {"eval": 2}, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        sw.build_dataset(tmp_path / "d", {"eval": 2}, workers=1, progress=False)
    sw.build_dataset(tmp_path / "d", {"eval": 3}, workers=1, progress=False, overwrite=True)
    assert len(sw.load_manifest(tmp_path / "d", "eval")) == 3


def test_failed_build_leaves_no_data_set(tmp_path):
    # A resolution below the renderer's minimum fails while images are being written.
    with pytest.raises(ValueError, match="resolution"):
        sw.build_dataset(tmp_path / "d", {"eval": 3}, resolution=8, workers=1, progress=False)
    assert not (tmp_path / "d").exists()


def test_unknown_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        sw.build_dataset(tmp_path / "d", {"test": 3}, workers=1, progress=False)
    with pytest.raises(ValueError, match="unknown split"):
        sw.make_split("validation", 3)


@pytest.fixture(scope="module")
def splits():
    return {s: sw.make_split(s, n) for s, n in
            (("train", 6000), ("retrieval", 3000), ("eval", 500))}


def test_train_split_has_the_documented_long_tail(splits):
    st = sw.split_stats(splits["train"])
    per = st["objects_by_combo"]
    total = sum(per.values())
    assert st["objects_by_class"]["absent"] == 0
    for c, s in sw.ABSENT:
        assert per[f"{c} {s}"] == 0
    common = [per[f"{c} {s}"] for c, s in sw.COMBOS if sw.combo_class(c, s) == "common"]
    for c, s in sw.RARE:
        # rare: present, but an order of magnitude below every common combination
        assert 0 < per[f"{c} {s}"] <= 0.1 * min(common), (c, s, per[f"{c} {s}"])
    assert sw.split_stats(splits["train"])["objects_by_class"]["rare"] / total < 0.01
    # every colour and every shape still appears in training on its own
    seen = {(g.colour, g.shape) for it in splits["train"] for g in it.scene.groups}
    assert {c for c, _ in seen} == set(sw.COLOURS)
    assert {s for _, s in seen} == set(sw.SHAPES)
    # groups of four are rare in train
    counts = Counter(g.count for it in splits["train"] for g in it.scene.groups
                     if it.scene.kind == "count")
    assert counts[4] < 0.15 * counts[2]


def test_retrieval_split_covers_the_tail(splits):
    per = sw.split_stats(splits["retrieval"])["objects_by_combo"]
    mean = np.mean(list(per.values()))
    for combo, n in per.items():
        assert n >= 0.6 * mean, combo  # every combination, absent and rare ones included
    counts = Counter(g.count for it in splits["retrieval"] for g in it.scene.groups
                     if it.scene.kind == "count")
    assert counts[4] >= 0.6 * counts[2]


def test_eval_prompts_are_weighted_to_the_tail_and_to_composition(splits):
    items = splits["eval"]
    st = sw.split_stats(items)
    assert st["items_with_tail_combo"] / len(items) >= 0.6
    compositional = sum(it.scene.kind != "single" for it in items)
    assert compositional / len(items) >= 0.8
    assert sum(it.scene.relation is not None for it in items) / len(items) >= 0.3


def test_placed_objects_do_not_overlap_and_honour_relation_and_cell(splits):
    for it in splits["eval"][:300]:
        sc = it.scene
        sides = [sw.SIZES[sc.groups[g].size] for g, _, _ in sc.objects]
        for i, (_, x, y) in enumerate(sc.objects):
            h = sides[i] / 2
            assert h <= x <= 1 - h and h <= y <= 1 - h
            for j in range(i):
                _, x2, y2 = sc.objects[j]
                need = (sides[i] + sides[j]) / 2 + sw.MIN_GAP - 1e-9
                assert abs(x - x2) >= need or abs(y - y2) >= need
        if sc.relation:
            rel, a, b = sc.relation
            pa = next((x, y) for g, x, y in sc.objects if g == a)
            pb = next((x, y) for g, x, y in sc.objects if g == b)
            assert sw.relation_of(pa, pb) == rel
        if sc.cell:
            _, x, y = sc.objects[0]
            assert sw.cell_of(x, y) == sc.cell


def test_caption_states_every_group(splits):
    for it in splits["eval"][:200]:
        for g in it.scene.groups:
            assert g.colour in it.caption
            word = g.shape if g.count == 1 else sw.PLURALS[g.shape]
            assert word in it.caption
            if g.count > 1:
                assert sw.COUNT_WORDS[g.count] in it.caption
    wrappers = Counter(it.caption.split()[0] for it in splits["eval"])
    assert len(wrappers) >= 5  # several templates are in use


@pytest.mark.parametrize("resolution", [32, 64, 200])
def test_render_any_size_is_antialiased(resolution):
    scene = sw.place(sw.Scene("single", [sw.Group("circle", "red", "large")]),
                     np.random.default_rng(0))
    img = np.asarray(sw.render(scene, resolution))
    assert img.shape == (resolution, resolution, 3)
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert tuple(sw.BACKGROUND) in colours and sw.COLOURS["red"] in colours
    assert len(colours) > 2  # edge pixels are blends, not just two colours


def test_perturb_changes_exactly_one_stated_attribute():
    for i, it in enumerate(sw.make_split("eval", 100)):
        new, what = sw.perturb(it.scene, sw.item_rng(0, "perturbed", i))
        old = it.scene
        diff = []
        if [g.colour for g in old.groups] != [g.colour for g in new.groups]:
            diff.append("colour")
        if [g.shape for g in old.groups] != [g.shape for g in new.groups]:
            diff.append("shape")
        if [g.size for g in old.groups] != [g.size for g in new.groups]:
            diff.append("size")
        if [g.count for g in old.groups] != [g.count for g in new.groups]:
            diff.append("count")
        if old.relation != new.relation:
            diff.append("relation")
        if old.cell != new.cell:
            diff.append("cell")
        assert diff == [what], (it.caption, what, diff)


def test_data_build_and_data_grid_commands_write_their_sample_grids(tmp_path, capsys):
    """The CLI end to end: `data build` writes the splits and samples.png, `data grid` a PNG
    of the asked split (both draw through the shared caption-grid helper)."""
    from PIL import Image

    from imageragturbo.commands.main import main

    out = tmp_path / "sw"
    assert main(["data", "build", "--out", str(out), "--train", "6", "--retrieval", "4",
                 "--eval", "5", "--workers", "1", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["grid"] == str(out / "samples.png")
    assert Image.open(out / "samples.png").size[0] > 0
    grid = tmp_path / "grid.png"
    assert main(["data", "grid", "--split", "train", "--n", "4", "--output", str(grid)]) == 0
    assert capsys.readouterr().out.strip() == str(grid)
    assert Image.open(grid).size[0] > 0
