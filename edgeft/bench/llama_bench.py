"""llama.cpp's own `llama-bench` on the same model and threads, and its decode paired round by
round with edgeft's, so the two see the same machine load."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ..errors import InputError
from .measure import _raw_decode
from .profiles import DECODE_PROMPT, Progress
from .stats import _med, _p10_p90

LLAMA_BENCH_CTX = 256  # llama-bench's context for -p 0 -n 64: n_prompt + n_gen, padded to 256 cells


def _llama_bench_pairs(lb_bin: Path, eng, model: Path, *, threads: int, gpu_layers: int, tokens: int,
                       rounds: int, say: Progress) -> dict:
    """llama-bench's decode (tg) and edgeft's, back to back, `rounds` times (the order flips every
    round), so both see the same load: the ratio is the median of the rounds' ratios.

    edgeft runs twice per round: with llama-bench's context size (the like-for-like comparison,
    which isolates what edgeft's Python layer costs) and with the profile's (`eng`). Without
    flash attention llama.cpp's CPU backend keeps V transposed over the whole context, so decode
    at the same positions is slower in a larger context."""
    from ..engine import Engine

    same = Engine(str(model), n_ctx=LLAMA_BENCH_CTX, n_threads=threads, n_gpu_layers=gpu_layers)
    engines = {"same_ctx": same, "profile_ctx": eng}
    lb: list[float] = []
    ours: dict[str, list[float]] = {k: [] for k in engines}
    raw: dict[str, list[float]] = {k: [] for k in engines}
    try:
        def edgeft_round() -> None:
            for k, e in engines.items():
                w, _ = _raw_decode(e, {}, tokens)
                e.complete(DECODE_PROMPT, adapter={}, max_tokens=1)  # prompt in KV, as in any request
                ours[k].append(e.complete(DECODE_PROMPT, adapter={}, max_tokens=tokens).decode_tps)
                raw[k].append(w)

        same.complete(DECODE_PROMPT, adapter={}, max_tokens=4)  # warm-up
        for r in range(rounds):
            say(f"llama-bench vs edgeft decode, round {r + 1}/{rounds}")
            if r % 2:
                edgeft_round()
            lb.append(run_llama_bench(lb_bin, model, threads=threads, gpu_layers=gpu_layers,
                                      repeats=1, n_gen=tokens, n_prompt=0)["tg_tps"])
            if not r % 2:
                edgeft_round()
    finally:
        same.close()

    def ratios(xs: list[float]) -> list[float]:
        return [e / t for e, t in zip(xs, lb) if t]

    def med(xs: list[float]) -> float | None:
        return _med(xs) if xs else None

    same_ratio = ratios(ours["same_ctx"])
    return {"tg_tps": _med(lb), "tg_samples": lb, "tg_tokens": tokens, "n_ctx_same": LLAMA_BENCH_CTX,
            "edgeft_tps_samples": ours["same_ctx"],
            "edgeft_over_llama_bench": med(same_ratio),
            "edgeft_over_llama_bench_p10_p90": _p10_p90(same_ratio) if same_ratio else None,
            "edgeft_raw_over_llama_bench": med(ratios(raw["same_ctx"])),
            "profile_ctx": {"edgeft_tps_samples": ours["profile_ctx"],
                            "edgeft_over_llama_bench": med(ratios(ours["profile_ctx"])),
                            "edgeft_raw_over_llama_bench": med(ratios(raw["profile_ctx"]))},
            "note": f"tg: {rounds} rounds of one llama-bench run (-n {tokens} -r 1, after its own warm-up) "
                    "and edgeft's greedy generation of as many tokens, back to back, order alternating; "
                    f"edgeft with llama-bench's context ({LLAMA_BENCH_CTX}) and, under profile_ctx, the "
                    "profile's; ratios: median over rounds (edgeft_raw: llama.cpp decode alone through "
                    "edgeft); pp: -p 64 -r 3 afterwards"}


def run_llama_bench(binary: str | os.PathLike, model: str | os.PathLike, *, threads: int, gpu_layers: int = 0,
                    repeats: int = 5, n_gen: int = 128, n_prompt: int = 64) -> dict:
    """llama.cpp's own `llama-bench` on the same model and threads: tg (decode) and pp tok/s.

    Flash attention off, as edgeft's context runs it; everything else at llama-bench's defaults."""
    exe = llama_bench_binary(binary)
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repeats), "-ngl", str(gpu_layers), "-fa", "0", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise InputError(f"llama-bench failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}",
                         "an AMX/AVX-512 build dies with exit 132 on CPUs/VMs without them; build with GGML_NATIVE=OFF")
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    res: dict[str, Any] = {"cmd": " ".join(cmd), "tg_tps": None, "pp_tps": None}
    for row in rows:
        if row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            res["tg_tps"], res["tg_std"] = float(row["avg_ts"]), float(row.get("stddev_ts", 0.0))
        elif row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            res["pp_tps"], res["pp_std"] = float(row["avg_ts"]), float(row.get("stddev_ts", 0.0))
        res.setdefault("build", row.get("build_commit"))
    return res


def llama_bench_binary(binary: str | os.PathLike) -> Path:
    """The llama-bench executable at `binary`; InputError when it is not there."""
    exe = Path(binary).expanduser()
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise InputError(f"llama-bench not found or not executable: {exe}",
                         "build it from llama.cpp (cmake --build build --target llama-bench)")
    return exe
