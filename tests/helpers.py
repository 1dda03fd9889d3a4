"""Test helpers: random LoRA adapters written with the real `gguf` writer for a base's shapes."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from edgeft.gguf_info import base_info

ALL7 = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_adapter(path: Path, base_path: Path, *, rank: int = 8, targets=ALL7, seed: int = 0,
                  b_std: float = 0.02, alpha: float | None = None, dtype=np.float32,
                  arch: str | None = None, blocks: range | None = None, mutate=None) -> Path:
    """A rank-`rank` adapter with random A and B (B != 0, so it changes the output)."""
    info = base_info(base_path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch or info.architecture)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha if alpha is not None else rank))
    tensors = {}
    for name, shape in info.tensors.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in targets:
            continue
        if blocks is not None and int(parts[1]) not in blocks:
            continue
        n_in, n_out = shape
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(dtype)   # PEFT lora_A [r, in]
        b = (rng.standard_normal((n_out, rank)) * b_std).astype(dtype)         # PEFT lora_B [out, r]
        tensors[name + ".lora_a"] = a
        tensors[name + ".lora_b"] = b
    if mutate:
        mutate(tensors)
    for k, v in tensors.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_bundle(folder: Path, base_path: Path, *, name: str, task: dict | None = None,
                 base_sha: str | None = None, **kw) -> Path:
    from edgeft.files import cached_sha256

    folder.mkdir(parents=True, exist_ok=True)
    write_adapter(folder / "adapter.gguf", base_path, **kw)
    card = {"format": 1, "name": name, "description": f"random test adapter {name}",
            "base": {"id": "smollm2-135m", "sha256": base_sha or cached_sha256(base_path), "architecture": "llama"},
            "adapter": {"file": "adapter.gguf", "rank": kw.get("rank", 8)}}
    if task:
        card["task"] = task
    (folder / "adapter.json").write_text(json.dumps(card))
    return folder
