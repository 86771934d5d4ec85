"""``imageragturbo bench quality`` (imageragturbo/quality.py, stats.py): the paired bootstrap
gives known answers, prompts fall into absent / rare / common by their rarest combination,
and one end-to-end run on the shipped model (4 prompts x 2 seeds, a 48-item index) holds
per-seed scores for every row, intervals, the retrieval-off row generated without retrieval
from the tuned weights, the oracles (real, null and cross-fitted), diversity and an extra row;
the CLI writes the Markdown table and the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imageragturbo import evaluate, quality, stats
from imageragturbo import shapesworld as sw
from imageragturbo.commands.main import main
from imageragturbo.quality import CROSS_FITTED, NULL_ORACLE, ORACLE, STUDENT, TUNED_OFF

N, S = 4, 2
EXTRA = "extra: the student again"
RUN = "run: the shipped fine-tuning at k = 1"
POOL = "ImageRAGTurbo k=1, neighbour drawn by seed from top 3"


# ----------------------------------------------------------------------------- statistics


def test_paired_bootstrap_known_answers():
    rng = np.random.default_rng(1)
    b = rng.integers(0, 8, 50) / 8                       # exact binary fractions
    assert stats.paired_bootstrap(b, b.copy()) == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    assert stats.paired_bootstrap(b + 0.25, b) == {"diff": 0.25, "lo": 0.25, "hi": 0.25}
    # a noisy shift: centred on the mean difference, about +-1.96 sd / sqrt(n) wide, the
    # sign follows a - b, and the fixed RNG seed repeats it exactly
    base = rng.random(400)
    d = rng.normal(0.1, 0.2, 400)
    r = stats.paired_bootstrap(base + d, base)
    assert r["diff"] == pytest.approx(d.mean())
    half = 1.96 * d.std() / np.sqrt(len(d))
    assert r["hi"] - r["lo"] == pytest.approx(2 * half, rel=0.15)
    assert r["lo"] < r["diff"] < r["hi"]
    assert (r["lo"] + r["hi"]) / 2 == pytest.approx(r["diff"], abs=0.2 * half)
    assert stats.paired_bootstrap(base + d, base) == r
    assert stats.paired_bootstrap(base + d, base, seed=1) != r
    assert stats.paired_bootstrap(base, base + d)["diff"] == pytest.approx(-r["diff"])
    with pytest.raises(ValueError):
        stats.paired_bootstrap(b, b[:-1])


def test_split_intervals_resample_within_each_class():
    a = np.array([1.0, 1.0, 0.0, 0.0, 0.5])
    b = np.zeros(5)
    iv = stats.split_intervals(a, b, ["absent", "absent", "rare", "rare", "x"],
                               ("absent", "rare", "common"))
    assert iv["absent"] == {"diff": 1.0, "lo": 1.0, "hi": 1.0}
    assert iv["rare"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    assert "common" not in iv and iv["all"]["diff"] == pytest.approx(0.5)


def test_seed_spread_and_pixel_spread():
    f = np.array([[[1.0, 0.0], [1.0, 1.0]],            # seed 0 of prompts 0 and 1
                  [[0.0, 2.0], [2.0, 2.0]]])           # seed 1: orthogonal, then parallel
    assert stats.seed_spread(f) == pytest.approx([1.0, 0.0])
    assert np.isnan(stats.seed_spread(f[:1])).all()
    im = np.zeros((3, 1, 2, 2, 3), np.uint8)
    im[1] = 255                                         # pairs: 1, 0 (0 vs 2), 1
    assert stats.pixel_spread(im) == pytest.approx([2 / 3])


# ----------------------------------------------------------------------------- prompts


def _scene(*combos):
    return sw.Scene(kind="group", groups=[sw.Group(shape=s, colour=c, size="big")
                                          for c, s in combos])


@pytest.mark.parametrize("combos, expected", [
    ([("red", "star")], "absent"),
    ([("red", "cross"), ("yellow", "circle")], "rare"),
    ([("red", "square"), ("yellow", "circle")], "common"),
    ([("yellow", "circle"), ("red", "cross"), ("blue", "circle")], "absent"),  # rarest wins
])
def test_prompt_class_is_the_rarest_combination(combos, expected):
    assert quality.prompt_class(_scene(*combos)) == expected


def test_eval_prompts_split_222_192_86():
    items = sw.make_split("eval", 500, 0)
    classes = [quality.prompt_class(it.scene) for it in items]
    assert [classes.count(c) for c in quality.CLASSES] == [222, 192, 86]


def test_noise_seeds_keep_the_one_seed_grid_as_seed_0():
    assert evaluate.noise_seeds(0, 3, 2).tolist() == [[0, 1, 2], [100_000, 100_001, 100_002]]
    assert evaluate.noise_seeds(2, 2, 1).tolist() == [[2_000_000, 2_000_001]]


def test_oracle_search_picks_per_seed_and_cross_fits_across_seeds():
    """Two prompts x two seeds; at strength m an image is the prompt's true render (ShapesTIFA
    1) only where ``right`` says so, a blank canvas otherwise: the oracle takes each seed's
    own best, the cross-fitted row seed j's strength from seed j + 1."""
    items = sw.make_split("eval", 2, 0)
    records = [(it.id, it.caption, it.scene) for it in items] * 2
    renders = np.stack([np.asarray(sw.render(it.scene)) for it in items] * 2)
    blank = np.full_like(renders, 255)
    right = {(0, 0): 2, (1, 0): 5, (0, 1): 7, (1, 1): 7}   # (seed, prompt) -> the good m

    def generate(m, w):
        assert w == quality.SLERP_GRID[m]
        good = np.array([right[j, i] == m for j in range(2) for i in range(2)])
        return np.where(good[:, None, None, None], renders, blank)

    o = quality.oracle_search(generate, records, 2, 2)
    grid = np.asarray(quality.SLERP_GRID)
    assert o["w_best"].tolist() == [[grid[2], grid[7]], [grid[5], grid[7]]]
    assert o["w_cross"].tolist() == [[grid[5], grid[7]], [grid[2], grid[7]]]
    assert np.array_equal(o["best"], renders)
    assert np.array_equal(o["cross"][[0, 2]], blank[[0, 2]])      # prompt 0: picks disagree
    assert np.array_equal(o["cross"][[1, 3]], renders[[1, 3]])    # prompt 1: they agree
    assert quality.oracle_search(lambda m, w: generate(m, w)[:2], records[:2], 1, 2)["cross"] is None


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A 48-item index of ShapesWorld's retrieval split built with tiny-shapes' encoder."""
    from imageragturbo.model import load_retrieval_encoder
    from imageragturbo.retriever import build_index, shapesworld_pairs

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quality")
    sw.build_dataset(root / "data", {"retrieval": 48}, progress=False)
    return build_index(shapesworld_pairs(root / "data", "retrieval"),
                       load_retrieval_encoder("tiny-shapes"), root / "index", progress=False,
                       model_source="tiny-shapes")


@pytest.fixture(scope="module")
def bench(index, tmp_path_factory):
    """One ``quality.run`` with an extra row (the student once more, paired with the tuned
    model's retrieval-off row) and a --run row at k = 1 (the shipped adapter and LoRA as a run's
    export folder), every ``evaluate.generate`` call (the one generator loop every row goes
    through) recorded."""
    import shutil

    from imageragturbo.model import family

    run_export = tmp_path_factory.mktemp("run") / "export"
    for sub in ("h_adapter", family.LORA_DIR):
        shutil.copytree(family.resolve("tiny-shapes") / sub, run_export / sub)
    shutil.copy(family.resolve("tiny-shapes") / "adapter_training.json", run_export)

    mp = pytest.MonkeyPatch()
    calls = []
    real = evaluate.generate

    def spy(c, prompts, seeds, pipeline="student", steps=1, guidance=4.0, **kw):
        h_retr = kw.get("h_retr")
        calls.append({"desc": kw.get("desc"), "pipeline": pipeline, "steps": steps,
                      "adapter": c.h_adapter is not None,
                      "h": None if h_retr is None else h_retr.copy(), "w": kw.get("slerp_w"),
                      "seeds": list(seeds), "prompts": list(prompts),
                      "t_init": kw.get("t_init")})
        return real(c, prompts, seeds, pipeline, steps, guidance, **kw)

    mp.setattr(evaluate, "generate", spy)
    student = family.load_components("tiny-shapes", retrieval_tuned=False)
    extra_args = []

    def extra(prompts, seeds):
        extra_args.append((prompts, seeds))
        return real(student, prompts, seeds, progress=False)

    try:
        res = quality.run("tiny-shapes", n=N, seed=0, teacher_steps=2, index=index,
                          latency=False, progress=False, seeds=S, extra_rows={EXTRA: extra},
                          retrieval_off={EXTRA: TUNED_OFF}, runs={RUN: f"{run_export}@1"},
                          neighbour_pools=[3])
    finally:
        mp.undo()
    return res, calls, extra_args


def test_run_holds_per_seed_scores_and_intervals_for_every_row(bench):
    res, calls, extra_args = bench
    rows = {k: v for k, v in res.items() if not k.startswith("_")}
    expected = {"teacher x2", "teacher x1", STUDENT, "student + slerp w=0.8", ORACLE,
                ORACLE + CROSS_FITTED, NULL_ORACLE, NULL_ORACLE + CROSS_FITTED,
                "ImageRAGTurbo k=1", "ImageRAGTurbo k=4", TUNED_OFF, EXTRA, RUN, RUN + ", K = 0", POOL,
                RUN + ", k=1 drawn from top 3"}   # --neighbour-pool rows: the run's too
    assert set(rows) == expected
    items = sw.make_split("eval", N, 0)
    classes = [quality.prompt_class(it.scene) for it in items]
    assert res["_meta"]["classes"] == {c: classes.count(c) for c in quality.CLASSES}
    flat = evaluate.noise_seeds(0, N, S).reshape(-1).tolist()
    captions = [it.caption for it in items] * S
    # every row's images come from the one generator loop, on every prompt under every seed
    assert all(c["seeds"] == flat and c["prompts"] == captions for c in calls)
    assert next(c for c in calls if c["desc"] == "student")["pipeline"] == "student"
    teacher = [(c["pipeline"], c["steps"]) for c in calls if c["pipeline"] == "teacher"]
    assert teacher == [("teacher", 2), ("teacher", 1)]
    assert extra_args[0][1] == flat and extra_args[0][0] == [it.caption for it in items] * S
    for name, r in rows.items():
        pp = r["per_prompt"]
        assert [p["id"] for p in pp] == [it.id for it in items], name
        assert [p["combo_class"] for p in pp] == classes
        assert all(len(p["scores"]) == S and all(0 <= x <= 1 for x in p["scores"])
                   for p in pp), name
        means = np.array([np.mean(p["scores"]) for p in pp])
        assert r["tifa"] == pytest.approx(means.mean()), name
        for c in set(classes):
            assert r[c] == pytest.approx(means[np.array(classes) == c].mean()), (name, c)
        iv = r["vs_student"]
        assert iv["row"] == STUDENT and set(iv) == {"row", "all", *classes}
        for split in ("all", *classes):
            assert iv[split]["lo"] - 1e-12 <= iv[split]["diff"] <= iv[split]["hi"] + 1e-12
        assert r["vs_student"]["all"]["diff"] == pytest.approx(r["tifa"] - res[STUDENT]["tifa"])
        assert r["diversity"] >= 0 and 0 <= r["diversity_pixel_rms"] <= 1, name
    assert res[STUDENT]["diversity_vs_student"] == pytest.approx(1.0)
    # the extra row is the student's images again: paired, the difference is exactly zero
    assert rows[EXTRA]["vs_student"]["all"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    assert rows[EXTRA]["vs_retrieval_off"]["row"] == TUNED_OFF


def test_run_rows_are_served_at_their_k_and_paired_with_their_own_k0_row(bench):
    from imageragturbo.model import family

    res, calls, _ = bench
    on = next(c for c in calls if c["desc"] == RUN)
    off = next(c for c in calls if c["desc"] == RUN + ", K = 0")
    assert on["adapter"] and on["h"].shape[1] == 1 and off["h"] is None
    assert res[RUN]["vs_retrieval_off"]["row"] == RUN + ", K = 0"
    # the same weights as the installed model: its k = 1 row's images, so the same scores
    assert res[RUN]["tifa"] == pytest.approx(res["ImageRAGTurbo k=1"]["tifa"])
    # a neighbour-start model (the shipped one) starts its retrieval rows from the neighbour,
    # its K = 0 rows from z_T
    installed = next(c for c in calls if c["desc"] == "ImageRAGTurbo k=1")
    assert on["t_init"] == installed["t_init"] == family.load_components(
        "tiny-shapes").neighbour_start["timestep"]
    assert off["t_init"] is None
    assert next(c for c in calls if c["desc"] == TUNED_OFF)["t_init"] is None


def test_retrieval_off_row_is_the_tuned_weights_without_retrieval(bench):
    res, calls, _ = bench
    off = next(c for c in calls if c["desc"] == TUNED_OFF)
    assert off["adapter"] and off["h"] is None and off["w"] is None
    for k in (1, 4):
        on = next(c for c in calls if c["desc"] == f"ImageRAGTurbo k={k}")
        assert on["adapter"] and on["h"].shape[:2] == (N * S, k)
        iv = res[f"ImageRAGTurbo k={k}"]["vs_retrieval_off"]
        assert iv["row"] == TUNED_OFF
        diff = np.mean([np.mean(p["scores"]) for p in res[f"ImageRAGTurbo k={k}"]["per_prompt"]]
                       ) - res[TUNED_OFF]["tifa"]
        assert iv["all"]["diff"] == pytest.approx(diff)
        assert iv["all"]["lo"] <= iv["all"]["diff"] <= iv["all"]["hi"]
    assert "vs_retrieval_off" not in res[TUNED_OFF] and "vs_retrieval_off" not in res[STUDENT]
    assert res["_meta"]["retrieval_off"] == {"ImageRAGTurbo k=1": TUNED_OFF,
                                             "ImageRAGTurbo k=4": TUNED_OFF, EXTRA: TUNED_OFF,
                                             RUN: RUN + ", K = 0", POOL: TUNED_OFF,
                                             RUN + ", k=1 drawn from top 3": RUN + ", K = 0"}


def test_oracles_real_null_and_cross_fitted(bench):
    res, calls, _ = bench

    def scores(name):
        return np.array([p["scores"] for p in res[name]["per_prompt"]])    # (N, S)

    oracle, cross = scores(ORACLE), scores(ORACLE + CROSS_FITTED)
    # per seed the best of nine (w = 0.8 among them); cross-fitted picks one of the nine
    assert (oracle >= scores("student + slerp w=0.8")).all()
    assert (oracle >= cross).all() and (scores(NULL_ORACLE) >= scores(NULL_ORACLE + CROSS_FITTED)
                                        ).all()
    for name in (ORACLE, NULL_ORACLE, ORACLE + CROSS_FITTED, NULL_ORACLE + CROSS_FITTED):
        assert sum(res[name]["w_star_histogram"].values()) == N * S
    real = [c for c in calls if (c["desc"] or "").startswith("slerp 0.")]
    null = [c for c in calls if (c["desc"] or "").startswith("null slerp")]
    assert [c["w"] for c in null] == list(quality.SLERP_GRID) and len(real) == 10
    top1 = real[0]["h"]
    hs = [c["h"] for c in null]
    for h in hs:            # never the top-1 neighbour; one h per prompt, the same per seed
        assert h.shape == top1.shape and not np.isclose(h, top1).all(axis=(1, 2, 3, 4)).any()
        assert np.array_equal(h[:N], h[N:])
    for a in range(len(hs)):     # a different random item for each w
        for b in range(a + 1, len(hs)):
            assert not np.isclose(hs[a], hs[b]).all(axis=(1, 2, 3, 4)).any()


def test_non_neighbours_avoid_the_top_32_and_repeat_with_the_seed(index):
    from imageragturbo.model import family
    from imageragturbo.retriever import RetrievalIndex

    idx = RetrievalIndex.load(index)
    c = family.load_components("tiny-shapes", retrieval_tuned=False)
    prompts = [it.caption for it in sw.make_split("eval", 6, 0)]
    pooled = evaluate.prompt_embeddings(c, prompts)
    retrieved, _ = idx.search(pooled, 4)
    got = quality.non_neighbours(idx, pooled, retrieved, 9, seed=0)
    top, _ = idx.exact_search(pooled, 32)
    assert got.shape == (6, 9)
    for row, near, r in zip(got, top, retrieved):
        assert len(set(row)) == 9 and not set(row) & (set(near) | set(r))
    assert np.array_equal(got, quality.non_neighbours(idx, pooled, retrieved, 9, seed=0))
    assert not np.array_equal(got, quality.non_neighbours(idx, pooled, retrieved, 9, seed=1))
    with pytest.raises(ValueError, match="null oracle"):
        quality.non_neighbours(idx, pooled, retrieved, 17, seed=0)


def test_cli_writes_markdown_and_json(bench, tmp_path, monkeypatch):
    res = bench[0]
    seen = {}

    def fake_run(*args, **kw):
        seen.update(kw, args=args)
        return res

    monkeypatch.setattr(quality, "run", fake_run)
    md, js = tmp_path / "out" / "quality.md", tmp_path / "out" / "quality.json"
    assert main(["bench", "quality", "--n", "4", "--seeds", "2", "--teacher-steps", "2",
                 "--no-latency", "--markdown", str(md), "--json", str(js)]) == 0
    assert seen["seeds"] == 2 and seen["latency"] is False and seen["args"][1] == 4
    table = md.read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| pipeline | NFE | ShapesTIFA | vs student x1 (95% CI) | "
                              "vs retrieval off (95% CI) | absent | rare | common |")
    assert "diversity" in rows[0] and "FD" in rows[0]
    names = [ln.split(" | ")[0][2:] for ln in rows[1:]]
    assert names == [k for k in res if not k.startswith("_")]
    k4 = next(ln for ln in rows if ln.startswith("| ImageRAGTurbo k=4 |")).split(" | ")
    iv = res["ImageRAGTurbo k=4"]["vs_retrieval_off"]["all"]
    assert k4[4] == f"{iv['diff']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]"
    assert f"absent {res['_meta']['classes']['absent']}" in table
    assert json.loads(js.read_text())[TUNED_OFF]["per_prompt"][0]["scores"] == \
        res[TUNED_OFF]["per_prompt"][0]["scores"]


def test_relative_change_is_zero_for_equal_and_exact_for_a_known_shift():
    from imageragturbo.sensitivity import relative_change

    z = np.ones((2, 4, 2, 2), np.float32)
    assert np.all(relative_change(z, z) == 0)
    np.testing.assert_allclose(relative_change(1.5 * z, z), [0.5, 0.5], rtol=1e-6)


def test_bench_sensitivity_measures_every_route_on_the_models_layout(index):
    from imageragturbo import sensitivity

    out = sensitivity.run("tiny-shapes", n=4, index=index, progress=False)
    routes = ("h := 0", "h := neighbour", "h := other prompt", "skips := other prompt",
              "decoder text := other prompt")
    for r in routes:
        assert 0 < out[r]["mean"] < 10 and out[r]["median"] >= 0
    assert out["layout"]["h"] == [96, 4, 4] and len(out["layout"]["down"]) == 3
    table = sensitivity.markdown({"tiny-shapes": out})
    assert all(r in table for r in routes) and "tiny-shapes" in table
    with pytest.raises(ValueError, match="n must be"):
        sensitivity.run("tiny-shapes", n=1, index=index, progress=False)


def test_stage_flops_count_the_five_stages_and_the_adapter_grows_with_k():
    from imageragturbo.model import family

    f = quality.stage_flops(family.load_components("tiny-shapes"), k_values=(1, 4))
    assert f["one_step"] == f["text_encoder"] + f["unet"] + f["vae_decoder"] > 0
    assert 0 < f["h_adapter_k1"] < f["h_adapter_k4"] < f["unet"]
    assert f["h_adapter_k4_share"] == round(f["h_adapter_k4"] / f["one_step"], 4)


def test_latency_only_times_the_student_and_each_k_on_one_export_and_scores_nothing(
        index, tmp_path, monkeypatch, capsys):
    calls = []
    real = quality.onnx_latency

    def few(c, idx, k_values=(0, 1, 4), repeats=30, threads=1):
        calls.append((tuple(k_values), idx is not None))
        return real(c, idx, k_values, repeats=2, threads=threads)

    monkeypatch.setattr(quality, "onnx_latency", few)
    monkeypatch.setattr(evaluate, "measure", lambda *a, **k: pytest.fail("scored images"))
    js = tmp_path / "lat.json"
    assert main(["bench", "quality", "--latency-only", "--index", str(index),
                 "--json", str(js)]) == 0
    lat = json.loads(js.read_text())
    assert calls == [((0,), True), ((0, 1, 4), True)]
    for key in ("student_k0", "imageragturbo_k0", "imageragturbo_k1", "imageragturbo_k4"):
        assert lat[key] > 0
    assert lat["ratio_k4_vs_k0"] == round(lat["imageragturbo_k4"] / lat["imageragturbo_k0"], 3)
    assert 0 < lat["flops"]["h_adapter_k4_share"] < 0.1
    assert "k = 4" in capsys.readouterr().out


def test_retrieval_guidance_interpolates_between_retrieval_off_and_on():
    """scale 0: the K = 0 image; scale 1: the image with retrieval; the pixels in between
    move with the scale (z0 = z0_off + scale (z0_on - z0_off))."""
    from imageragturbo.model import family

    c = family.load_components("tiny-shapes")
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    h = np.random.default_rng(0).standard_normal((2, 2, 96, 4, 4)).astype(np.float32)
    lam = np.ones(2, np.float32)
    on = evaluate.generate(c, prompts, seeds, h_retr=h, lam=lam, progress=False)
    off = evaluate.generate(c, prompts, seeds, progress=False)
    assert np.abs(on.astype(int) - off).max() > 2                     # retrieval changes it
    # one prompt a batch: each batch takes its own prompts' features and lambda (the batch
    # size itself can move a pixel by one level through float rounding)
    one = evaluate.generate(c, prompts, seeds, h_retr=h, lam=lam, batch=1, progress=False)
    assert np.abs(one.astype(int) - on).max() <= 1

    def guided(scale):
        return evaluate.generate(c, prompts, seeds, h_retr=h, lam=lam, retrieval_guidance=scale,
                                 progress=False)

    g0, g1, g2 = guided(0.0), guided(1.0), guided(2.0)
    assert np.abs(g0.astype(int) - off).max() <= 1 and np.abs(g1.astype(int) - on).max() <= 1
    assert np.abs(g2.astype(int) - off).mean() > np.abs(g1.astype(int) - off).mean()


def test_generate_refuses_what_its_pipeline_cannot_take():
    h = np.zeros((1, 1, 96, 4, 4), np.float32)
    with pytest.raises(ValueError, match="teacher takes no retrieved"):
        evaluate.generate(None, ["a red circle"], [0], "teacher", 2, h_retr=h)
    with pytest.raises(ValueError, match="one-step"):
        evaluate.generate(None, ["a red circle"], [0], "student", 2)
    with pytest.raises(ValueError, match="needs retrieved features"):
        evaluate.generate(None, ["a red circle"], [0], retrieval_guidance=2.0)
    with pytest.raises(ValueError, match="unknown pipeline"):
        evaluate.generate(None, ["a red circle"], [0], "adapter")


def test_pool_row_draws_each_seeds_neighbour_from_the_prompts_top_pool(bench, index):
    from imageragturbo.retriever import RetrievalIndex

    res, calls, _ = bench
    call = next(c for c in calls if c["desc"] == POOL)
    assert call["adapter"] and call["h"].shape[:2] == (N * S, 1)
    idx = RetrievalIndex.load(index)
    items = sw.make_split("eval", N, 0)
    prompts = [it.caption for it in items]
    _, top3, _, _ = evaluate.neighbours("tiny-shapes", _base(), prompts, 3, index,
                                       progress=False)
    h = call["h"][:, 0].reshape(S, N, -1)
    for i in range(N):
        pool = idx.h(top3[i]).reshape(3, -1)
        for j in range(S):                                  # each seed's h is one of the top 3
            assert np.any(np.all(np.isclose(pool, h[j, i]), axis=1)), (i, j)
    assert res[POOL]["vs_retrieval_off"]["row"] == TUNED_OFF


def _base():
    from imageragturbo.model import family

    return family.load_components("tiny-shapes", retrieval_tuned=False)


def test_runs_only_scores_the_student_and_each_run_with_its_k0_row_alone(index, tmp_path):
    import shutil

    from imageragturbo.model import family

    export = tmp_path / "run" / "export"
    for sub in ("h_adapter", family.LORA_DIR):
        shutil.copytree(family.resolve("tiny-shapes") / sub, export / sub)
    res = quality.run("tiny-shapes", n=N, seed=0, index=index, latency=True, progress=False,
                      seeds=S, runs={RUN: f"{export}@1"}, runs_only=True,
                      grid=tmp_path / "grid.png", neighbour_pools=[2])
    drawn = RUN + ", k=1 drawn from top 2"     # the run served as serve --neighbour-pool 2
    assert {k for k in res if not k.startswith("_")} == {STUDENT, RUN, RUN + ", K = 0", drawn}
    assert res[RUN]["vs_retrieval_off"]["row"] == RUN + ", K = 0"
    assert res[drawn]["vs_retrieval_off"]["row"] == RUN + ", K = 0"
    assert "_latency" not in res and not (tmp_path / "grid.png").exists()
