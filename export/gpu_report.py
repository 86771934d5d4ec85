"""The GPU yardstick's report (``bench sdturbo-gpu``): one JSON file, a latency-breakdown PNG in
the manner of the paper's Fig. 6 (a stacked horizontal bar per configuration, one segment per
stage), and a one-screen text summary with the issue's two targets (ONNX Runtime end to end at
batch 1 <= 0.6x PyTorch eager; retrieval + adapter <= 1.02x of no retrieval).

Kept apart from the timing code so the writer is tested on fake numbers on any CPU: a GPU run
is minutes of lent time, and a report that fails to write after it would lose them.

The result dict it reads (``gpu_bench.run_gpu_bench`` fills it)::

    {"device": ..., "runs": [{"config": "ort_cuda", "batch": 1, "retrieval": True,
                              "median_ms": {"text_encoder": ..., ..., "end_to_end": ...}}, ...],
     "configs": {"ort_cuda": {"memory_mib": {"1": ...}, "memcpy": {...}, "error": ...}, ...}}
"""

from __future__ import annotations

import json
from pathlib import Path

from imageragturbo.client.contract import STAGES as STAGE_ORDER

EAGER = "torch_eager"
ORT_TARGET = 0.6          # ONNX Runtime end to end at batch 1, as a fraction of eager PyTorch's
RETRIEVAL_TARGET = 1.02   # with retrieval + adapter, as a multiple of without


def _e2e(res: dict, config: str, batch: int, retrieval: bool) -> float | None:
    for r in res.get("runs", []):
        if (r["config"], int(r["batch"]), bool(r["retrieval"])) == (config, batch, retrieval):
            return r["median_ms"].get("end_to_end")
    return None


def summarize(res: dict) -> dict:
    """Per (config, batch): end to end without and with retrieval, their ratio, and the ratio
    to eager PyTorch at the same batch (the larger of the two, without and with retrieval);
    then the targets, judged on the best ONNX Runtime configuration at batch 1."""
    rows = []
    keys = sorted({(r["config"], int(r["batch"])) for r in res.get("runs", [])},
                  key=lambda x: (x[1], x[0] != EAGER, x[0]))
    for config, batch in keys:
        off, on = _e2e(res, config, batch, False), _e2e(res, config, batch, True)
        e_off, e_on = _e2e(res, EAGER, batch, False), _e2e(res, EAGER, batch, True)
        # the worse of the two ratios (without and with retrieval), so that one slow eager
        # measurement cannot make ONNX Runtime look better than it is
        ratios = [a / b for a, b in ((off, e_off), (on, e_on)) if a and b]
        rows.append({"config": config, "batch": batch, "no_retrieval_ms": off,
                     "retrieval_ms": on,
                     "retrieval_ratio": round(on / off, 4) if on and off else None,
                     "vs_eager": round(max(ratios), 3) if ratios else None})
    ort_b1 = [r for r in rows if r["batch"] == 1 and r["config"].startswith("ort")
              and r["vs_eager"] is not None]
    best = min(ort_b1, key=lambda r: r["retrieval_ms"], default=None)
    targets = {}
    if best is not None:
        targets = {
            "best_ort_config_batch1": best["config"],
            "ort_vs_eager_batch1": best["vs_eager"],
            "ort_vs_eager_met": best["vs_eager"] <= ORT_TARGET,
            "retrieval_ratio_batch1": best["retrieval_ratio"],
            "retrieval_ratio_met": (best["retrieval_ratio"] is not None
                                    and best["retrieval_ratio"] <= RETRIEVAL_TARGET),
        }
    return {"rows": rows, "targets": targets}


def plot_breakdown(res: dict, path: str | Path) -> Path:
    """Stacked horizontal bars of median ms per stage, one bar per (config, batch, retrieval),
    'host' being end to end minus the stages (tokenizing, noise, copies, uint8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(res.get("runs", []), key=lambda r: (int(r["batch"]), r["config"] != EAGER,
                                                       r["config"], bool(r["retrieval"])))
    labels = [f"{r['config']}  b{r['batch']}  {'+retrieval' if r['retrieval'] else 'no retr.'}"
              for r in runs]
    parts = [*STAGE_ORDER, "host"]
    colors = dict(zip(parts, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.38 * max(1, len(runs))))
    for i, r in enumerate(runs):
        med = r["median_ms"]
        left = 0.0
        for p in STAGE_ORDER:
            w = float(med.get(p, 0.0))
            if w > 0:
                ax.barh(i, w, left=left, color=colors[p], edgecolor="white", linewidth=0.5)
                left += w
        host = max(0.0, float(med.get("end_to_end", left)) - left)
        ax.barh(i, host, left=left, color=colors["host"], edgecolor="white", linewidth=0.5)
        ax.text(left + host, i, f" {med.get('end_to_end', left):.1f}", va="center", fontsize=8)
    ax.set_yticks(range(len(runs)), labels, fontsize=8)
    ax.invert_yaxis()
    size = res.get("image_size", "?")
    ax.set_xlabel(f"median latency (ms), one step, {size}x{size}" if isinstance(size, int)
                  else "median latency (ms), one step")
    ax.set_title(f"SD-Turbo-sized one-step latency by stage: {res.get('device', '?')}",
                 fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in parts]
    ax.legend(handles, parts, fontsize=7, ncol=len(parts), loc="lower center",
              bbox_to_anchor=(0.5, 1.06), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_summary(res: dict) -> str:
    """The one-screen text: device, export time, a table of end to end per configuration and
    batch (ms, retrieval ratio, ratio to eager), memory, Memcpy counts, errors, the targets."""
    s = res.get("summary") or summarize(res)
    lines = [f"device: {res.get('device', '?')}; onnxruntime {res.get('onnxruntime', '?')}; "
             f"torch {res.get('torch', '?')}; export {res.get('export_seconds', '?')} s; "
             f"k = {res.get('k', '?')}; repeats {res.get('repeats', '?')}",
             f"{'config':24s} {'batch':>5s} {'no retr':>9s} {'retr':>9s} {'ratio':>7s} "
             f"{'x eager':>8s} {'mem MiB':>8s}"]
    cfgs = res.get("configs", {})
    for r in s["rows"]:
        mem = cfgs.get(r["config"], {}).get("memory_mib", {}).get(str(r["batch"]))

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        lines.append(f"{r['config']:24s} {r['batch']:5d} {f(r['no_retrieval_ms'], '9.2f')} "
                     f"{f(r['retrieval_ms'], '9.2f')} {f(r['retrieval_ratio'], '7.3f')} "
                     f"{f(r['vs_eager'], '8.3f')} {f(mem, '8.0f')}")
    for name, c in cfgs.items():
        if c.get("memcpy"):
            lines.append(f"Memcpy nodes, {name}: " + ", ".join(
                f"{k} {v}" for k, v in c["memcpy"].items()))
        if c.get("error"):
            lines.append(f"ERROR {name}: {c['error'][:300]}")
    t = s["targets"]
    if t:
        lines.append(f"target ORT <= {ORT_TARGET}x eager at batch 1: {t['ort_vs_eager_batch1']} "
                     f"({t['best_ort_config_batch1']}) "
                     f"{'MET' if t['ort_vs_eager_met'] else 'NOT MET'}")
        lines.append(f"target retrieval <= {RETRIEVAL_TARGET}x: {t['retrieval_ratio_batch1']} "
                     f"{'MET' if t['retrieval_ratio_met'] else 'NOT MET'}")
    else:
        lines.append("targets: no ONNX Runtime and eager figures at batch 1 to compare")
    return "\n".join(lines)


def write_report(res: dict, out_dir: str | Path, stem: str = "sdturbo_gpu") -> dict[str, Path]:
    """``<stem>.json`` (the results with their summary), ``<stem>.png`` (the breakdown) and
    ``<stem>.txt`` (the summary) in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = {**res, "summary": summarize(res)}
    paths = {"json": out / f"{stem}.json", "png": out / f"{stem}.png",
             "txt": out / f"{stem}.txt"}
    paths["json"].write_text(json.dumps(res, indent=2, default=str) + "\n")
    plot_breakdown(res, paths["png"])
    paths["txt"].write_text(format_summary(res) + "\n")
    return paths
