"""`bench serve` against the session's real server: the in-process yardstick at batch 1 and at
the batch size, the served runs, and Triton's per-model statistics turned into a breakdown of
where a request's time goes (queue, compute) for every composing model."""

from __future__ import annotations

import argparse

from imageragturbo.serving.bench import bench_serve, breakdown, format_table
from imageragturbo.serving.session import Assets

COMPOSING = {"preprocess", "text_encoder", "retriever", "unet_encoder", "h_adapter",
             "unet_decoder", "vae_decoder", "postprocess"}


def test_breakdown_gives_mean_milliseconds_per_request_and_the_mean_batch():
    before = {"m": {"count": 10, "executions": 10, "queue": 10_000_000, "compute_input": 0,
                    "compute_infer": 50_000_000, "compute_output": 0}}
    after = {"m": {"count": 18, "executions": 12, "queue": 18_000_000, "compute_input": 800_000,
                   "compute_infer": 90_000_000, "compute_output": 1_600_000},
             "idle": {"count": 0, "executions": 0, "queue": 0, "compute_input": 0,
                      "compute_infer": 0, "compute_output": 0}}
    rows = breakdown(before, after)
    assert rows == {"m": {"requests": 8, "mean_batch": 4.0, "queue_ms": 1.0,
                          "compute_input_ms": 0.1, "compute_infer_ms": 5.0,
                          "compute_output_ms": 0.2}}


def test_bench_serve_reports_both_ratios_and_every_composing_model(assets, server):
    args = argparse.Namespace(
        model=str(assets["model"]), export=assets["adapter"], index=assets["index"],
        data=None, random_weights=False, retrieval_items=None, quiet=True, url=server.url,
        concurrency=[1, 4], requests=8, warmup=2, k=1, threads=1, max_batch_size=4,
        queue_delay_us=0, light_queue_delay_us=0, instances=None, ready_timeout=60,
        json=True, bursts=2, burst_size=3)
    res = bench_serve(args, lambda: Assets(str(assets["model"]), assets["adapter"],
                                           assets["index"]))
    assert [s["concurrency"] for s in res["serving"]] == [1, 4]
    assert res["in_process"]["batch"] == 4 and res["in_process"]["batch_images_per_s"] > 0
    assert res["overhead_ratio_p50"] > 0 and res["throughput_ratio"] > 0
    for s in res["serving"]:
        assert COMPOSING <= set(s["per_model"]), set(s["per_model"])
        # every timed and warm-up request passed through each composing model once
        assert all(r["requests"] == 10 for n, r in s["per_model"].items() if n in COMPOSING)
        assert all(r["compute_infer_ms"] > 0 for r in s["per_model"].values())
    b = res["bursts"]
    assert (b["bursts"], b["size"]) == (2, 3) and 0 < b["median_ms"] <= b["max_ms"]
    table = format_table(res)
    assert "per model at concurrency 4" in table and "vae_decoder" in table
    assert "2 bursts of 3 at once" in table


def test_heavy_stages_and_light_steps_get_their_own_batching_delay(assets, tmp_path):
    """The UNet encoder, UNet decoder and VAE decoder wait ``queue_delay_us`` to fill a batch,
    every other composing model ``light_queue_delay_us`` (the measured trade-off between
    latency at concurrency 1 and throughput under load); None makes them equal."""
    from imageragturbo.serving.repository import RenderOptions, load_configs, render_repository

    opts = RenderOptions(queue_delay_us=1234, light_queue_delay_us=56)
    repo = render_repository(assets["adapter"], assets["index"], tmp_path / "r", "cpu", opts)
    delays = {name: c.dynamic_batching.max_queue_delay_microseconds
              for name, c in load_configs(repo).items() if c.HasField("dynamic_batching")}
    assert delays == {"unet_encoder": 1234, "unet_decoder": 1234, "vae_decoder": 1234,
                      "preprocess": 56, "text_encoder": 56, "retriever": 56, "h_adapter": 56,
                      "postprocess": 56}
    assert set(delays) == COMPOSING
    assert RenderOptions(queue_delay_us=700, light_queue_delay_us=None).light_queue_delay_us \
        == 700


def test_the_light_steps_wait_follows_the_heavy_one_unless_given():
    """`serve --queue-delay-us N` alone sets both waits (the help says so); with
    --light-queue-delay-us the light steps get their own."""
    from imageragturbo.commands.main import build_parser
    from imageragturbo.commands.serve import _options

    parser = build_parser()
    one = _options(parser.parse_args(["serve", "--queue-delay-us", "2000"]))
    two = _options(parser.parse_args(["serve", "--queue-delay-us", "2000",
                                      "--light-queue-delay-us", "100"]))
    assert (one.queue_delay_us, one.light_queue_delay_us) == (2000, 2000)
    assert (two.queue_delay_us, two.light_queue_delay_us) == (2000, 100)


def test_serve_checks_index_digests_at_load_only_when_asked():
    """The retriever's load checks the index's structure; `serve --verify-index` adds the
    sha256 of every file (the whole index read by every instance before it is ready)."""
    from imageragturbo.commands.main import build_parser
    from imageragturbo.commands.serve import _options

    parser = build_parser()
    assert _options(parser.parse_args(["serve"])).verify_index is False
    assert _options(parser.parse_args(["serve", "--verify-index"])).verify_index is True


def test_serve_flags_are_render_options_own_defaults_and_reach_it():
    """serve's rendering flags are made from ``RenderOptions`` (its defaults are the only
    copy): no flags give the default options, and each given flag reaches its field."""
    from imageragturbo.commands.main import build_parser
    from imageragturbo.commands.serve import _options
    from imageragturbo.serving.repository import RenderOptions

    parser = build_parser()
    assert _options(parser.parse_args(["serve"])) == RenderOptions()
    given = _options(parser.parse_args([
        "serve", "--max-batch-size", "4", "--queue-timeout", "1.5", "--max-queue-size", "9",
        "--default-k", "2", "--max-k", "5", "--rerank", "0", "--neighbour-pool", "3",
        "--injection", "slerp", "--threads", "2", "--instances", "1", "--trt-cache", "/c"]))
    assert given == RenderOptions(max_batch_size=4, queue_timeout_us=1_500_000,
                                  max_queue_size=9, default_k=2, max_k=5, rerank=0,
                                  neighbour_pool=3, injection="slerp", threads=2,
                                  instances=1, trt_cache="/c")
