"""`edgeft bench`: load, swap, TTFT, decode and memory measurements (see docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import AdapterDir, Base, GpuLayers, Threads


def _fmt(v, unit: str = "", nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        s = f"{v:.{nd}f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"
    else:
        s = str(v)
    return f"{s} {unit}".strip()


def _serving_rows(res: dict) -> list[tuple[str, str, str]]:
    """The prompt cache and bulk-job rows (absent from older reports)."""
    rows = []
    pc, bt = res.get("prompt_cache"), res.get("batch")
    if pc:
        rows.append(("TTFT after a swap: cache off / on",
                     f"{_fmt(pc['alternating_cache_off']['ttft_ms']['p50'], 'ms')} / "
                     f"{_fmt(pc['alternating_cache_on']['ttft_ms']['p50'], 'ms')}",
                     f"same adapter, cache on: {_fmt(pc['same_cache_on']['ttft_ms']['p50'], 'ms')}; "
                     f"{pc['prompt_tokens']}-token task prompts, adapters alternating"))
    if bt:
        rows.append(("bulk job: one by one / batched", f"{_fmt(bt['tps_one_by_one'])} / {_fmt(bt['tps_batched'])} tok/s",
                     f"{bt['requests']} answers of {bt['answer_tokens']} tokens, {bt['parallel']} per batch; "
                     f"{_fmt(100 * (bt['identical_answers'] or 0), '%', 0)} identical"))
    cc = res.get("concurrency")
    if cc:
        e = cc["edgeft"]
        for mode, what in (("same", "one adapter"), ("mixed", "two adapters alternating"),
                           ("distinct", "one adapter, distinct prompts")):
            loads = sorted((r["clients"], r) for k, r in e.items() if k.startswith(mode) and k.endswith("cache_on"))
            ls = cc.get("llama_server") or {}
            rows.append((f"server, {what}: " + " / ".join(f"{n}" for n, _ in loads) + " clients",
                         " / ".join(_fmt(r["tps"]) for _, r in loads) + " tok/s",
                         "p50 latency " + " / ".join(_fmt(r["latency_s"]["p50"], "s", 2) for _, r in loads)
                         + (("; llama-server " + " / ".join(_fmt((ls.get(f"{mode}_{n}") or {}).get("tps")) for n, _ in loads)
                             + " tok/s") if ls else "")))
    return rows


def _table(res: dict):
    from rich.table import Table

    t = Table(title=f"edgeft bench: {res['base']['id']} ({res['profile']['name']}, "
                    f"{res['machine']['threads_used']} threads, ctx {res['profile']['n_ctx']})")
    t.add_column("measurement")
    t.add_column("value", justify="right")
    t.add_column("detail")
    d = res["decode_tps"]
    sw, pen, rl = res["swap_ms"], res["swap_ttft_penalty_ms"], res["reload_ms"]
    rows = [
        ("base load (page cache warm)", _fmt(res["load_ms"]["base"], "ms"), ""),
        ("adapter load p50", _fmt(res["load_ms"]["adapter"]["p50"], "ms", 2),
         f"Engine.load_adapter {_fmt(res['load_ms']['adapter_with_validation']['p50'], 'ms')}; "
         f"first load (full validation) {_fmt(res['load_ms']['adapter_first_load']['p50'], 'ms')}"),
        ("swap (set + KV invalidation)", _fmt(sw["p50"], "ms", 3),
         f"p90 {_fmt(sw['p90'], 'ms', 3)}, p99 {_fmt(sw['p99'], 'ms', 3)}"),
        ("next-request TTFT penalty p50", _fmt(pen["p50"], "ms", 2),
         f"p90 {_fmt(pen['p90'], 'ms', 2)}; CPU time {_fmt(pen['detail']['penalty_cpu_ms']['p50'], 'ms', 2)}"),
        ("reload per switch (lora_path)", _fmt(rl["p50"], "ms"), f"mmap: {_fmt(rl['mmap']['p50'], 'ms')}"),
        ("reload / swap", _fmt(res["switch_ratio"]["reload_over_swap"], "x", 0),
         f"effective {_fmt(res['switch_ratio']['effective'], 'x')}"),
        ("TTFT base / adapter", f"{_fmt(res['ttft_ms']['base'], 'ms')} / {_fmt(res['ttft_ms']['adapter'], 'ms')}",
         f"{res['ttft_ms']['prompt_tokens']}-token task prompt, cleared KV"),
        ("prefill base / adapter", f"{_fmt(res['prefill_tps']['base'])} / {_fmt(res['prefill_tps']['adapter'])} tok/s",
         f"{res['prefill_tps']['prompt_tokens']}-token prompt"),
        ("decode: none / 1 / 2 mixed / merged",
         " / ".join(_fmt(d.get(m)) for m in ("base", "adapter", "two_adapters", "merged")) + " tok/s",
         "1 adapter / none: " + _fmt(res["decode_ratio"]["adapter"], "x", 2)
         + " (best rounds " + _fmt(res["decode_ratio_best"]["adapter"], "x", 2)
         + ", CPU time " + _fmt(res["decode_ratio_cpu"]["adapter"], "x", 2) + ")"),
        ("decode / none, token by token", " / ".join(_fmt((res.get("decode_ratio_interleaved") or {}).get(m), "x", 3)
                                                     for m in ("adapter", "two_adapters", "merged")),
         "1 / 2 mixed / merged; llama.cpp decode alone, alternating tokens with a second base context"),
        ("llama.cpp decode alone (no sampling)",
         " / ".join(_fmt((res["decode_raw"].get(m) or {}).get("wall_tps")) for m in ("base", "adapter", "two_adapters", "merged")) + " tok/s",
         "none / 1 / 2 mixed / merged"),
        ("decode bandwidth bound", _fmt(res["decode_bound_tps"], "tok/s"),
         f"{_fmt(res['bandwidth_gbs'], 'GB/s')} copy bandwidth; edgeft at "
         f"{_fmt(res['decode_bound']['fraction']['base'], '', 2)} of it"),
    ]
    rows += _serving_rows(res)
    sweep = res.get("decode_sweep")
    if sweep:
        def all7(rows):
            return {r["dtype"]: r["ratio"] for r in rows or [] if r["targets"] == "all7"}
        fused, unfused = all7(sweep["rows"]), all7(sweep.get("unfused_rows"))
        dts = ("f32", "f16", "q8_0")
        rows.append(("decode, 1 rank-8 all-linear adapter / none", " / ".join(_fmt(fused.get(dt), "x", 2) for dt in dts),
                     "f32 / f16 / q8_0" + (" (fused); llama.cpp's graph ops: " + " / ".join(_fmt(unfused.get(dt), "x", 2) for dt in dts)
                                          if unfused else "")))
    fa = res.get("flash_attn")
    if fa and "on_over_off" in fa:
        r = fa["on_over_off"]
        rows.append(("decode, flash attention on / off", f"{_fmt(r['base'], 'x', 2)} / {_fmt(r['adapter'], 'x', 2)}",
                     f"no adapter / 1 adapter, ctx {fa['n_ctx']}; same greedy text: "
                     + " / ".join("yes" if v else "no" for v in fa["same_greedy_text"].values())))
    lb = res.get("llama_bench")
    if lb:
        rows.append(("llama-bench tg / pp", f"{_fmt(lb['tg_tps'])} / {_fmt(lb['pp_tps'])} tok/s",
                     f"edgeft decode = {_fmt(lb['edgeft_over_llama_bench'], 'x', 2)}"))
    rss = res["rss_mb"]
    rows.append(("RSS base", _fmt(rss["base"], "MB"), f"process before load {_fmt(rss['process'], 'MB')}"))
    merged = {p["n"]: p for p in rss.get("merged_models") or []}
    for p in rss["with_adapters"]:
        m = merged.get(p["n"])
        alt = f"{_fmt(m['mb'], 'MB')}{' (est.)' if m['estimated'] else ''}" if m else "-"
        rows.append((f"RSS base + {p['n']} adapters", _fmt(p["mb"], "MB"),
                     f"+{_fmt(p['added_mb'], 'MB')} = {_fmt(p['added_over_file'], 'x', 2)} files; {p['n']} merged models: {alt}"))
    ev = res.get("evictions")
    if ev:
        rows.append(("LRU evictions (budget)", str(ev["evictions"]),
                     f"budget {_fmt(ev['budget_mb'], 'MB')}; each costs a reload of {_fmt(ev['cost_ms']['p50'], 'ms')} "
                     f"(llama.cpp load {_fmt(ev['reload_ms']['p50'], 'ms', 2)}) when used again"))
    for r in rows:
        t.add_row(*r)
    return t


def _targets_table(res: dict):
    from rich.table import Table

    t = Table(title="targets")
    for c in ("target", "measured", "limit", "met"):
        t.add_column(c)
    for row in res["targets"]:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "not measured"}[row["met"]]
        t.add_row(row["target"], _fmt(row["value"], row["unit"], 3), f"{row['op']} {row['limit']} {row['unit']}", met)
    return t


def bench(
    base: Base = None,
    adapters: Annotated[Optional[list[str]], typer.Option("--adapter", "-a", "--adapters", help="Adapter to measure (repeatable, or NAME,NAME): a name, bundle folder or .gguf. Default: two random rank-8 all-linear f32 adapters.")] = None,
    profile: Annotated[str, typer.Option("--profile", help="laptop (all cores, ctx 2048, batch 512), phone (2 threads, ctx 1024, batch 128, adapter budget forcing LRU evictions), or a NAME for a custom run with laptop defaults.")] = "laptop",
    threads: Threads = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Context size (default: the profile's).")] = None,
    gpu_layers: GpuLayers = 0,
    repeats: Annotated[Optional[int], typer.Option("--repeats", help="Repetitions of each slow measurement (default 5, --quick 2).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer repeats, no dtype sweep: under a minute on 2 cores.")] = False,
    sweep: Annotated[Optional[bool], typer.Option("--sweep/--no-sweep", help="Decode cost per adapter dtype x target set (default: on unless --quick).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full result as JSON to PATH.")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG chart to PATH (needs matplotlib: pip install 'edgeft[bench]').")] = None,
    llama_bench: Annotated[Optional[Path], typer.Option("--llama-bench", help="Path to llama.cpp's llama-bench binary: run it on the same model and threads.")] = None,
    llama_server: Annotated[Optional[Path], typer.Option("--llama-server", help="Path to llama.cpp's llama-server binary: serve the same model, threads and adapters under the same client loads.")] = None,
    concurrency: Annotated[bool, typer.Option("--concurrency/--no-concurrency", help="Measure the HTTP server under 1, 4 and 8 concurrent clients (needs the serve extra).")] = True,
    adapter_dir: AdapterDir = None,
) -> None:
    """Measure load, hot-swap, TTFT, decode and memory against reload-per-switch and merged models."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from ..bench import plot, run_bench

    err = Console(stderr=True)
    refs = [a.strip() for given in adapters or [] for a in given.split(",") if a.strip()]
    # The progress line is redrawn only when the bench reports a step: a spinner would redraw it
    # from a thread ~12 times a second, taking CPU from the threads being measured.
    with Live(Text("edgeft bench: starting"), console=err, auto_refresh=False, transient=True) as live:
        def progress(msg: str) -> None:
            live.update(Text(f"edgeft bench: {msg}"), refresh=True)

        res = run_bench(base, refs or None, profile=profile, threads=threads, ctx=ctx, gpu_layers=gpu_layers,
                        repeats=repeats, quick=quick, sweep=sweep, llama_bench=llama_bench,
                        adapter_dirs=adapter_dir or [], progress=progress, concurrency=concurrency,
                        llama_server=llama_server)
    out = Console()
    out.print(_table(res))
    out.print(_targets_table(res))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        err.print(f"wrote {json_out}")
    if plot_out:
        plot(res, plot_out)
        err.print(f"wrote {plot_out}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
