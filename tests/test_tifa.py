"""ShapesTIFA: each question type is answered right on a hand-built scene and wrong on its
perturbation; the self-check separates good images from bad ones."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imageragturbo import shapesworld as sw
from imageragturbo import tifa

G = sw.Group


def scene(groups, objects, relation=None, cell=None, kind="pair"):
    return sw.Scene(kind, groups, relation=relation, cell=cell, objects=objects)


def answers(sc_questions, sc_render, resolution=64):
    """{category: [(detector's answer, true answer), ...]} for the questions of one scene
    asked of the render of another."""
    dets = tifa.detect(sw.render(sc_render, resolution))
    out = {}
    for q in tifa.questions(sc_questions):
        out.setdefault(q.category, []).append((tifa.answer(q.query, dets), q.answer))
    return out


# A red star left of a large blue circle, both sizes stated.
BASE = scene([G("star", "red", "small", 1, True), G("circle", "blue", "large", 1, True)],
             [(0, 0.2, 0.5), (1, 0.7, 0.5)], relation=("left of", 0, 1))


def test_every_question_is_answered_right_on_the_hand_built_scene():
    got = answers(BASE, BASE)
    assert set(got) == {"object", "colour", "shape", "size", "spatial"}
    for cat, pairs in got.items():
        assert all(a == truth for a, truth in pairs), cat


@pytest.mark.parametrize("category,changed", [
    ("colour", scene([G("star", "green", "small", 1, True), G("circle", "blue", "large", 1, True)],
                     [(0, 0.2, 0.5), (1, 0.7, 0.5)])),
    ("shape", scene([G("star", "red", "small", 1, True), G("square", "blue", "large", 1, True)],
                    [(0, 0.2, 0.5), (1, 0.7, 0.5)])),
    ("object", scene([G("triangle", "red", "small", 1, True), G("circle", "blue", "large")],
                     [(0, 0.2, 0.5), (1, 0.7, 0.5)])),
    ("size", scene([G("star", "red", "large", 1, True), G("circle", "blue", "large", 1, True)],
                   [(0, 0.2, 0.5), (1, 0.7, 0.5)])),
    ("spatial", scene([G("star", "red", "small", 1, True), G("circle", "blue", "large", 1, True)],
                      [(0, 0.8, 0.5), (1, 0.3, 0.5)])),
])
def test_a_changed_attribute_is_caught(category, changed):
    assert any(a != truth for a, truth in answers(BASE, changed)[category])


def test_counting_right_and_wrong():
    three = scene([G("cross", "yellow", "small", 3)], [(0, 0.2, 0.2), (0, 0.5, 0.7), (0, 0.8, 0.3)],
                  kind="count")
    two = scene([G("cross", "yellow", "small", 2)], [(0, 0.2, 0.2), (0, 0.8, 0.3)], kind="count")
    assert answers(three, three)["counting"] == [("3", "3")]
    assert answers(three, two)["counting"] == [("2", "3")]


def test_position_right_and_wrong():
    top_left = scene([G("triangle", "cyan", "large")], [(0, 0.18, 0.18)], cell="top left",
                     kind="single")
    bottom = scene([G("triangle", "cyan", "large")], [(0, 0.5, 0.82)], cell="bottom",
                   kind="single")
    assert answers(top_left, top_left)["position"] == [("top left", "top left")]
    assert answers(top_left, bottom)["position"] == [("bottom", "top left")]


@pytest.mark.parametrize("shape", sw.SHAPES)
@pytest.mark.parametrize("colour", sw.COLOURS)
def test_detector_names_every_colour_and_shape_at_both_sizes(shape, colour):
    for size in sw.SIZES:
        sc = scene([G(shape, colour, size)], [(0, 0.4, 0.6)], kind="single")
        (d,) = tifa.detect(sw.render(sc))
        assert (d.colour, d.shape, d.size) == (colour, shape, size)
        assert abs(d.x - 0.4) < 0.03 and abs(d.y - 0.6) < 0.03


def test_detector_is_resolution_independent():
    for res in (48, 64, 128, 512):
        got = answers(BASE, BASE, res)
        assert all(a == t for pairs in got.values() for a, t in pairs), res


def test_questions_only_ask_what_the_caption_states():
    sc = scene([G("star", "red", "small", 1, False), G("star", "blue", "large", 2, False)],
               [(0, 0.2, 0.2), (1, 0.5, 0.7), (1, 0.8, 0.3)], kind="group")
    cats = [q.category for q in tifa.questions(sc)]
    assert "size" not in cats            # sizes not stated
    assert "colour" not in cats          # "the star" would be ambiguous: two groups of stars
    assert "spatial" not in cats and "position" not in cats
    assert cats.count("counting") == 1   # only the group of two is asked "how many"
    assert cats.count("shape") == 2


def test_score_is_mean_per_prompt_accuracy():
    items = sw.make_split("eval", 6)
    recs = [(it.id, it.caption, it.scene) for it in items]
    good = [sw.render(it.scene) for it in items]
    blank = [Image.new("RGB", (64, 64), sw.BACKGROUND)] * 6
    mixed = good[:3] + blank[:3]
    res = tifa.score(recs, mixed)
    assert res["tifa"] == pytest.approx(0.5)
    assert [p["accuracy"] for p in res["per_prompt"]] == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="6 prompts but 5 images"):
        tifa.score(recs, good[:5])


def test_bad_image_arrays_are_rejected():
    with pytest.raises(ValueError, match="RGB image"):
        tifa.detect(np.zeros((64, 64)))


@pytest.fixture(scope="module")
def check():
    return tifa.selfcheck(n=200)


def test_selfcheck_meets_the_bars(check):
    s = {k: v["tifa"] for k, v in check.items()}
    assert s["clean"] >= 0.98
    assert s["degraded"] >= 0.90
    assert s["noise"] < 0.35 and s["blank"] < 0.35
    assert s["perturbed"] < s["clean"] - 0.2


def test_histogram_png_is_written(check, tmp_path):
    path = tifa.plot_categories(check, tmp_path / "h.png")
    img = Image.open(path)
    assert img.size[0] > 300 and img.size[1] > 200


def test_score_folder_reads_generated_images_and_reports_missing_ones(tmp_path):
    root = sw.build_dataset(tmp_path / "d", {"eval": 4}, workers=1, progress=False)
    gen = tmp_path / "gen"
    gen.mkdir()
    for r in sw.load_manifest(root, "eval")[:3]:
        sw.render(sw.Scene.from_json(r["scene"])).save(gen / f"{r['id']}.png")
    with pytest.raises(FileNotFoundError, match="1 of 4 images missing"):
        tifa.score_folder(root, gen)
    # the data set's own renders score perfectly
    assert tifa.score_folder(root, root)["tifa"] == 1.0


def test_cli_selfcheck_json_prints_one_object():
    out = subprocess.run([sys.executable, "-m", "imageragturbo.commands", "eval", "selfcheck",
                          "--json", "--n", "40"], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    assert set(res) == {"clean", "degraded", "noise", "blank", "perturbed"}
    assert res["clean"] >= 0.98


@pytest.mark.parametrize("argv", [[], ["data"], ["data", "build"], ["eval"], ["eval", "selfcheck"],
                                  ["eval", "score"], ["demo"]])
def test_every_command_has_help(argv):
    out = subprocess.run([sys.executable, "-m", "imageragturbo.commands", *argv, "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "usage: imageragturbo" in out.stdout
