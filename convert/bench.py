"""Conversion timing: edgeft's converter vs llama.cpp's convert_lora_to_gguf.py, same adapter.

    python -m edgeft.convert.bench --json bench-convert.json [--base smollm2-135m] [--repeats 5]

A synthetic PEFT adapter with the base's shapes (rank 8 on all seven projections of every layer,
like a typical task adapter) is written once; each converter then turns it into a GGUF adapter,
as a fresh process each time (what a user waits for), median of the repeats. edgeft is also
timed in-process (the conversion itself, without interpreter start-up). The reference script
comes from the llama-cpp-python sdist (fetched with pip into EDGEFT_HOME/src when missing) and
needs torch and transformers; without them only edgeft is timed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeft.paths import edgeft_home

from edgeft.gguf_header import GGUFHeader, read_header

log = logging.getLogger(__name__)

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARTS = {"q_proj": ("self_attn", "attn_q"), "k_proj": ("self_attn", "attn_k"), "v_proj": ("self_attn", "attn_v"),
          "o_proj": ("self_attn", "attn_output"), "gate_proj": ("mlp", "ffn_gate"), "up_proj": ("mlp", "ffn_up"),
          "down_proj": ("mlp", "ffn_down")}


def llama_cpp_python_version() -> str | None:
    """The installed llama-cpp-python's version (the pin itself lives in pyproject.toml only)."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def find_llama_cpp_source(download: bool = False) -> Path | None:
    """llama.cpp's source tree (vendor/llama.cpp of the llama-cpp-python sdist) with its converters."""
    ver = llama_cpp_python_version()
    cands = [Path(p) for p in [os.environ.get("EDGEFT_LLAMA_CPP_SRC")] if p]
    if ver is not None:
        cands.append(edgeft_home() / "src" / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp")
    for c in cands:
        if (c / "convert_lora_to_gguf.py").is_file():
            return c
    if not download or ver is None:
        return None
    return _download_source(ver, edgeft_home() / "src")


def _download_source(ver: str, dest: Path) -> Path | None:
    """pip download the sdist (about 76 MB) and extract only the Python converters and gguf-py."""
    wanted = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tempfile.TemporaryDirectory(prefix="edgeft-sdist-") as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              "--disable-pip-version-check", "-d", tmp, f"llama-cpp-python=={ver}"],
                             capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if res.returncode != 0 or not archives:
            log.warning("could not download llama-cpp-python %s: %s", ver, (res.stderr or res.stdout)[-500:])
            return None
        prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
        dest.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".sdist-", dir=dest))
        try:
            with tarfile.open(archives[0]) as tf:
                members = [m for m in tf.getmembers()
                           if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)
                           and (m.isfile() or m.isdir())]
                tf.extractall(stage, members=members, filter="data")
            final = dest / f"llama_cpp_python-{ver}"
            if not final.exists():
                os.replace(stage / f"llama_cpp_python-{ver}", final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    out = dest / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    return out if (out / "convert_lora_to_gguf.py").is_file() else None


def hf_config_from_gguf(h: GGUFHeader) -> dict:
    """The HF config.json that llama.cpp's converter wants, rebuilt from a llama GGUF's metadata."""
    if h.architecture != "llama":
        raise ValueError("the benchmark's config.json writer knows only llama bases")
    n_head = int(h.arch_value("attention.head_count"))
    n_embd = int(h.arch_value("embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": n_embd, "intermediate_size": int(h.arch_value("feed_forward_length")),
        "num_hidden_layers": int(h.arch_value("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(h.arch_value("attention.head_count_kv", n_head)),
        "head_dim": int(h.arch_value("rope.dimension_count", n_embd // n_head)),
        "vocab_size": int(h.arch_value("vocab_size") or h.tensors["token_embd.weight"].shape[1]),
        "max_position_embeddings": int(h.arch_value("context_length", 2048)),
        "rms_norm_eps": float(h.arch_value("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(h.arch_value("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in h.tensors, "torch_dtype": "float32",
    }


def write_synthetic_adapter(h: GGUFHeader, folder: Path, *, rank: int = 8, alpha: float = 16.0,
                            targets=SEVEN, dtype: str = "float32", seed: int = 0) -> Path:
    """A PEFT folder shaped for the base `h` (random A and B), as save_pretrained writes it."""
    from .safetensors_np import write_safetensors

    rng = np.random.default_rng(seed)
    n_layer = int(h.arch_value("block_count"))
    tensors = {}
    for i in range(n_layer):
        for t in targets:
            group, gg = _PARTS[t]
            n_in, n_out = h.tensors[f"blk.{i}.{gg}.weight"].shape
            key = f"base_model.model.model.layers.{i}.{group}.{t}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(dtype)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, rank)) * 0.01).astype(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(h.path.parent),
           "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
           "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
           "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def _time_cmd(cmd: list[str], repeats: int, env: dict | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])}... failed:\n{res.stderr[-3000:]}")
    return times


def _summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "runs": [round(t, 4) for t in times]}


def run(base: str | None = None, repeats: int = 5, outtype: str = "f32", keep: Path | None = None) -> dict:
    from edgeft.models import resolve_base

    from .bundle import convert_adapter

    bm = resolve_base(base or "smollm2-135m")
    h = read_header(bm.path)
    work = Path(tempfile.mkdtemp(prefix="edgeft-bench-convert-"))
    try:
        peft_dir = write_synthetic_adapter(h, work / "peft")
        size = (peft_dir / "adapter_model.safetensors").stat().st_size
        out: dict = {"base": {"id": bm.id, "path": str(bm.path), "architecture": h.architecture},
                     "adapter": {"rank": 8, "targets": list(SEVEN), "layers": int(h.arch_value("block_count")),
                                 "safetensors_bytes": size},
                     "outtype": outtype, "repeats": repeats,
                     "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "platform": platform.platform(),
                                 "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}}
        bm.sha256  # hash once (cached), so no run pays for it
        inproc = []
        for i in range(repeats):
            t0 = time.perf_counter()
            convert_adapter(peft_dir, str(bm.path), name="bench", out_dir=work / "inproc", outtype=outtype, force=True)
            inproc.append(time.perf_counter() - t0)
        out["edgeft_in_process"] = _summary(inproc)
        env = dict(os.environ)
        cli = [sys.executable, "-m", "edgeft", "convert", str(peft_dir), "--base", str(bm.path), "--name", "bench",
               "-o", str(work / "cli"), "--outtype", outtype, "--force"]
        out["edgeft_cli"] = _summary(_time_cmd(cli, repeats, env))
        src = find_llama_cpp_source(download=True)
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if src is None or missing:
            out["llama_cpp"] = {"skipped": f"needs {', '.join(missing) or 'the llama.cpp source (pip download failed)'}"}
        else:
            hf_dir = work / "hf"
            hf_dir.mkdir()
            (hf_dir / "config.json").write_text(json.dumps(hf_config_from_gguf(h), indent=1))
            ref = [sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(hf_dir), "--outtype", outtype,
                   "--outfile", str(work / "ref.gguf"), str(peft_dir)]
            env.pop("NO_LOCAL_GGUF", None)
            out["llama_cpp"] = {"script": str(src / "convert_lora_to_gguf.py"), **_summary(_time_cmd(ref, repeats, env))}
            out["speedup_cli_vs_llama_cpp"] = round(out["llama_cpp"]["median_s"] / out["edgeft_cli"]["median_s"], 1)
        out["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        if keep:
            shutil.copytree(work, keep, dirs_exist_ok=True)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeft.convert.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--base", default=None, help="base model id or .gguf path (default: smollm2-135m)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--outtype", default="f32", choices=("f32", "f16", "q8_0"))
    args = ap.parse_args(argv)
    res = run(args.base, args.repeats, args.outtype)
    text = json.dumps(res, indent=2)
    if args.json:
        from edgeft.files import write_text_atomic

        write_text_atomic(args.json, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
