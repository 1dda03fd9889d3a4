"""What the report concludes: the runtime's targets (measured value, limit, met or not) and a
PNG chart of the main comparisons."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .fixtures import ADAPTER_DTYPES, TARGET_SETS


def evaluate_targets(res: dict) -> list[dict]:
    """The runtime's targets, each with the measured value and whether it is met (None: not measured)."""
    def g(*keys):
        cur: Any = res
        for k in keys:
            if not isinstance(cur, dict) or cur.get(k) is None:
                return None
            cur = cur[k]
        return cur

    lb = g("llama_bench", "edgeft_over_llama_bench")
    rows = [
        ("swap p50 (set adapters + KV invalidation)", g("swap_ms", "p50"), "<=", 1.0, "ms"),
        ("next-request TTFT penalty p50", g("swap_ttft_penalty_ms", "p50"), "<=", 5.0, "ms"),
        ("reload-per-switch / swap", g("switch_ratio", "reload_over_swap"), ">=", 100.0, "x"),
        ("RSS added per resident adapter / file size", g("rss_mb", "per_adapter_over_file"), "<=", 1.1, "x"),
        ("decode with 1 adapter / without", g("decode_ratio_interleaved", "adapter") or g("decode_ratio", "adapter"),
         ">=", 0.95, "x"),
        ("edgeft decode / llama-bench tg", lb, ">=", 0.95, "x"),
        ("TTFT alternating adapters / same adapter (prompt cache on)",
         g("prompt_cache", "alternating_over_same_cache_on"), "<=", 1.15, "x"),
        ("TTFT alternating adapters: cache off / on", g("prompt_cache", "cache_off_over_on_alternating"), ">=", 2.5, "x"),
        ("bulk job: batched / one-by-one tok/s", g("batch", "batched_over_one_by_one"), ">=", 1.3, "x"),
        ("server, 8 clients / 1 client tok/s, one adapter", g("concurrency", "eight_over_one_same"), ">=", 1.5, "x"),
        ("server, 8 clients, one adapter: edgeft / llama-server tok/s",
         g("concurrency", "edgeft_over_llama_server", "same_8"), ">=", 1.0, "x"),
        ("server, 8 clients, one adapter: edgeft / llama-server p50 latency",
         g("concurrency", "p50_latency_edgeft_over_llama_server", "same_8"), "<=", 1.0, "x"),
        ("server, 8 clients, two adapters: edgeft / llama-server tok/s",
         g("concurrency", "edgeft_over_llama_server", "mixed_8"), ">=", 1.3, "x"),
        ("server, 8 clients, distinct prompts: edgeft / llama-server p50 latency",
         g("concurrency", "p50_latency_edgeft_over_llama_server", "distinct_8"), "<=", 1.0, "x"),
    ]
    out = []
    for name, value, op, limit, unit in rows:
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": met})
    return out


def plot(res: dict, path: str | os.PathLike) -> Path:
    """A PNG with switch cost vs reload, memory vs number of tasks, and decode tok/s per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib", "pip install 'edgeft[bench]'") from None

    fig, grid = plt.subplots(3, 2, figsize=(13, 14))
    axes = grid.ravel()
    load = res["machine"].get("load_avg_start")
    title = (f"edgeft bench: {res['base']['id']}, profile {res['profile']['name']}, "
             f"{res['machine']['threads_used']} thread(s), {res['machine']['cpu']}"
             + (f", load average {load[0]:.1f} at start" if load else ""))
    fig.suptitle(title, fontsize=10)
    _plot_switch(axes[0], res)
    _plot_memory(axes[1], res)
    _plot_decode(axes[2], res)
    _plot_sweep(axes[3], res.get("decode_sweep"))
    _plot_concurrency(axes[4], res.get("concurrency"))
    axes[5].axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_switch(ax, res: dict) -> None:
    labels = ["hot swap\n(set + KV)", "hot swap\n+ next-request\npenalty", "reload\n(mmap)", "reload\n(lora_path,\nno mmap)"]
    vals = [res["swap_ms"]["p50"], max(res["swap_ttft_penalty_ms"]["p50"] or 0, 0) + res["swap_ms"]["p50"],
            res["reload_ms"]["mmap"]["p50"], res["reload_ms"]["p50"]]
    bars = ax.bar(labels, vals, color=["#2a9d8f", "#8ab17d", "#e9c46a", "#e76f51"])
    ax.set_yscale("log")
    ax.set_ylabel("ms per switch (p50, log)")
    ax.set_title("switch cost")
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.3g} ms", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def _plot_memory(ax, res: dict) -> None:
    rss = res["rss_mb"]
    xs = [0] + [p["n"] for p in rss["with_adapters"]]
    ax.plot(xs, [rss["base"]] + [p["mb"] for p in rss["with_adapters"]], "o-", color="#2a9d8f",
            label="1 base + N adapters")
    mm = rss.get("merged_models")
    if mm:
        meas = [p for p in mm if not p["estimated"]]
        est = [p for p in mm if p["estimated"]]
        ax.plot([p["n"] for p in meas], [p["mb"] for p in meas], "s-", color="#e76f51", label="N merged models")
        if est:
            ax.plot([meas[-1]["n"]] + [p["n"] for p in est], [meas[-1]["mb"]] + [p["mb"] for p in est], "s--",
                    color="#e76f51", alpha=0.6, label="N merged models (estimated)")
    ax.set_xlabel("tasks (N)")
    ax.set_ylabel("process RSS, MB")
    ax.set_title("memory vs number of tasks")
    ax.legend(fontsize=8)


def _plot_decode(ax, res: dict) -> None:
    d = res["decode_tps"]
    modes = [("base", "no adapter"), ("adapter", "1 adapter"), ("two_adapters", "2 mixed"), ("merged", "merged GGUF")]
    names = [lbl for m, lbl in modes if d.get(m)]
    vals = [d[m] for m, _ in modes if d.get(m)]
    colors = ["#264653"] + ["#2a9d8f"] * (len(vals) - 1)
    lb = res.get("llama_bench")
    if lb and lb.get("tg_tps"):
        names.append(f"llama-bench\ntg{lb.get('tg_tokens', '')}")
        vals.append(lb["tg_tps"])
        colors.append("#e9c46a")
    bars = ax.bar(names, vals, color=colors)
    ax.axhline(res["decode_bound_tps"], ls="--", color="grey")
    ax.text(-0.4, res["decode_bound_tps"], f"bandwidth bound {res['decode_bound_tps']:.0f}", va="bottom", fontsize=8)
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode tok/s (greedy, median)")
    ax.set_title("decode speed per mode")
    ax.tick_params(axis="x", labelsize=8)


def _plot_concurrency(ax, conc: dict | None) -> None:
    """Server tok/s per number of clients: edgeft (one adapter, two alternating) and llama-server."""
    if not conc:
        ax.axis("off")
        return
    series = [("edgeft, one adapter", conc["edgeft"], "same_{}_cache_on", "#2a9d8f"),
              ("edgeft, two adapters", conc["edgeft"], "mixed_{}_cache_on", "#8ab17d"),
              ("llama-server, one adapter", conc.get("llama_server") or {}, "same_{}", "#e9c46a"),
              ("llama-server, two adapters", conc.get("llama_server") or {}, "mixed_{}", "#f4a261")]
    clients = sorted({r["clients"] for r in conc["edgeft"].values()})
    shown = [(lbl, src, key, c) for lbl, src, key, c in series if any(key.format(n) in src for n in clients)]
    width = 0.8 / max(1, len(shown))
    for j, (lbl, src, key, color) in enumerate(shown):
        ys = [(src.get(key.format(n)) or {}).get("tps") or 0 for n in clients]
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(clients))]
        ax.bar(xs, ys, width, label=lbl, color=color)
    ax.set_xticks(range(len(clients)), [f"{n} client{'s' if n > 1 else ''}" for n in clients])
    ax.set_ylabel("generated tok/s over the load")
    ax.set_title(f"HTTP server under concurrent clients ({conc['answer_tokens']}-token answers)")
    ax.legend(fontsize=8)


def _plot_sweep(ax, sweep: dict | None) -> None:
    if not sweep:
        ax.axis("off")
        return
    tsets = list(TARGET_SETS)
    key = "ratio"
    width = 0.8 / len(ADAPTER_DTYPES)
    for j, dt in enumerate(ADAPTER_DTYPES):
        ys = [next((r[key] for r in sweep["rows"] if r["dtype"] == dt and r["targets"] == t), 0) or 0
              for t in tsets]
        ax.bar(np.arange(len(tsets)) + (j - 1) * width, ys, width, label=dt)
    ax.axhline(0.9, ls="--", color="grey")
    ax.set_xticks(np.arange(len(tsets)), tsets)
    ax.set_ylim(0.5, 1.05)
    ax.set_ylabel("decode tok/s with / without adapter")
    ax.set_title("rank-8 adapter cost by dtype and targets")
    ax.legend(fontsize=8)
