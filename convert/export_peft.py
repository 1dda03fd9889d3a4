"""Adapter bundle -> PEFT LoRA folder (what vLLM, LoRAX and PEFT load), checked by a round trip.

A bundle's PEFT source (`peft/`) is copied as it is, or normalized when it uses per-module rank
or alpha patterns (serving engines read one r and one alpha). A bundle without a source is
written from its GGUF, undoing what the converter did: llama's rotary row permutation of q/k
comes off lora_B (never lora_A), token_embd's lora_a is transposed back, fused tensors are split
or joined to the model's own modules, and llama.cpp's scale (alpha / r per tensor) is folded so
that PEFT's `lora_alpha / r` gives the same product. Every module is padded to one rank with
zeros, which changes no product.

Either way the folder is read back with the converter's own reader and mapped onto the base
again (`names.plan`): each adapted base tensor must get the product B @ A that the bundle's GGUF
holds, or nothing is exported. numpy only: no torch here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.bundles import AdapterBundle
from edgeft.errors import ConversionError
from edgeft.gguf_header import GGUFHeader, read_header, read_tensor
from .lora_gguf import fold, runtime_scale
from .names import LEAF_PARTS, OUTPUT, TOKEN_EMBD, BaseLayout, plan
from .peft import CONFIG_FILE, SAFETENSORS_FILE, load_peft
from .problems import Problem, refuse
from .safetensors_np import write_safetensors

ALPHA_KEY = "adapter.lora.alpha"
ROUND_TRIP_TOLERANCE = 1e-2     # relative; a wrong permutation or scale is off by O(1)
_PREFIX = "base_model.model."


@dataclass
class ExportedAdapter:
    name: str
    folder: Path
    rank: int
    source: str            # "peft" (the bundle's source, copied) or "gguf" (written from adapter.gguf)
    round_trip: float      # largest relative error of B @ A against the bundle's GGUF


def unpermute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row layout -> Hugging Face's: the inverse of names.permute_rows."""
    out = b.shape[0]
    return b.reshape(n_head, out // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_pairs(h: GGUFHeader) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """{base tensor: (lora_a, lora_b)} in numpy order, and the file's alpha."""
    names = {n[: -len(".lora_a")] for n in h.tensors if n.endswith(".lora_a")}
    pairs = {n: (read_tensor(h, n + ".lora_a"), read_tensor(h, n + ".lora_b")) for n in sorted(names)
             if n + ".lora_b" in h.tensors}
    return pairs, float(h.kv.get(ALPHA_KEY) or 0.0)


def _block_of(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1]), parts[-1]
    return None


def _module_delta(layout: BaseLayout, i: int, leaf: str, pairs, alpha: float):
    """(A, B) for one Hugging Face module with llama.cpp's scale folded into B, or None."""
    blocks = []          # (tensor, a, rows of b scaled, row offset in the module)
    row = 0
    for part in LEAF_PARTS[leaf]:
        loc = layout.locate(i, part)
        if loc is None:
            return None, {f"block {i} {part}"}
        name, row0, n = loc
        if name in pairs:
            a, b = pairs[name]
            seg = b[row0:row0 + n].astype(np.float64) * runtime_scale(alpha, b.shape[1])
            if layout.arch.rope_permute and part in ("q", "k"):
                seg = unpermute_rows(seg, layout.n_head[i] if part == "q" else layout.n_head_kv[i])
            blocks.append((name, a, seg, row))
        row += n
    if not blocks:
        return None, set()
    a_of = {name: a for name, a, _, _ in blocks}           # one A per base tensor, stacked in name order
    col, c = {}, 0
    for name in sorted(a_of):
        col[name], c = c, c + a_of[name].shape[0]
    a = np.concatenate([a_of[name] for name in sorted(a_of)], axis=0)
    b = np.zeros((row, c), dtype=np.float64)
    for name, ai, seg, r0 in blocks:
        b[r0:r0 + seg.shape[0], col[name]:col[name] + ai.shape[0]] = seg
    return (a.astype(np.float32), b), set(a_of)


def peft_from_gguf(bundle: AdapterBundle, layout: BaseLayout, hf_linear: set[str], out: Path, *,
                   dtype: str, base_ref: str) -> int:
    """Write `out` (adapter_config.json + adapter_model.safetensors) from the bundle's GGUF; returns the rank."""
    pairs, alpha = gguf_pairs(read_header(bundle.gguf_path))
    modules: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}   # key -> (A, B with scale, embedding)
    consumed: set[str] = set()
    for mod in sorted(hf_linear):
        loc = _block_of(mod)
        if loc is None or loc[1] not in LEAF_PARTS or loc[0] >= layout.n_layer:
            continue
        ab, used = _module_delta(layout, loc[0], loc[1], pairs, alpha)
        if ab is not None:
            modules[mod] = (*ab, False)
            consumed |= used
    for name, key, emb in ((TOKEN_EMBD, "model.embed_tokens", True), (OUTPUT, "lm_head", False)):
        if name in pairs:
            a, b = pairs[name]
            scaled = b.astype(np.float64) * runtime_scale(alpha, b.shape[1])
            modules[key] = ((a.T if emb else a).astype(np.float32), scaled, emb)
            consumed.add(name)
    left = sorted(set(pairs) - consumed)
    if left or not modules:
        refuse(str(bundle.gguf_path), [Problem(f"adapted tensors with no module in the exported model: {', '.join(left[:6]) or 'all'}",
                                               "the bundle does not belong to this base")])
    rank = max(a.shape[0] for a, _, _ in modules.values())
    lora_alpha = alpha if alpha > 0 else float(rank)
    tensors, bf16 = {}, set()
    np_dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.float32}[dtype]
    for key, (a, b, emb) in modules.items():
        r = a.shape[0]
        a_pad = np.zeros((rank, a.shape[1]), dtype=np.float32)
        a_pad[:r] = a
        factor = rank / lora_alpha           # PEFT multiplies by lora_alpha / rank
        b_pad = np.zeros((b.shape[0], rank), dtype=np.float64)
        b_pad[:, :r] = b if factor == 1.0 else b * factor
        names = (f"{_PREFIX}{key}.lora_embedding_A", f"{_PREFIX}{key}.lora_embedding_B") if emb else \
                (f"{_PREFIX}{key}.lora_A.weight", f"{_PREFIX}{key}.lora_B.weight")
        tensors[names[0]] = a_pad.astype(np_dtype)
        tensors[names[1]] = b_pad.astype(np_dtype)
        if dtype == "bf16":
            bf16.update(names)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / SAFETENSORS_FILE, tensors, {"format": "pt"}, bf16=bf16)
    leaves = sorted({k.rsplit(".", 1)[-1] for k in modules})
    (out / CONFIG_FILE).write_text(json.dumps(peft_config(rank, lora_alpha, leaves, base_ref), indent=2) + "\n")
    return rank


def peft_config(r: int, alpha: float, targets: list[str], base_ref: str) -> dict:
    """A plain LoRA config that PEFT, vLLM and LoRAX all read the same way (one r, one alpha)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref, "r": int(r),
            "lora_alpha": float(alpha), "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
            "layers_to_transform": None, "layers_pattern": None}


def copy_source(src: Path, out: Path, base_ref: str) -> int:
    """The bundle's own PEFT folder, with base_model_name_or_path pointing at the exported base."""
    ad = load_peft(src)
    refuse(str(src), ad.problems)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / SAFETENSORS_FILE, out / SAFETENSORS_FILE)
    cfg = dict(ad.config)
    cfg["base_model_name_or_path"] = base_ref
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return max(ad.ranks)


def needs_normalizing(src: Path) -> bool:
    """Per-module rank/alpha patterns: engines that read one r and one alpha would scale them wrongly."""
    try:
        cfg = json.loads((src / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("rank_pattern") or cfg.get("alpha_pattern"))


def round_trip_error(peft_dir: Path, bundle: AdapterBundle, layout: BaseLayout, seed: int = 0) -> float:
    """Largest relative difference between the bundle GGUF's scaled B @ A and what the exported
    PEFT folder maps to (through the converter's reader and name map), probed with random vectors."""
    ad = load_peft(peft_dir)
    refuse(str(peft_dir), ad.problems)
    planned, problems = plan(ad, layout)
    refuse(str(peft_dir), problems)
    orig, alpha = gguf_pairs(read_header(bundle.gguf_path))
    got = {name: (a, b) for name, a, b in fold(planned, alpha)}
    if set(got) != set(orig):
        missing, extra = sorted(set(orig) - set(got)), sorted(set(got) - set(orig))
        refuse(str(peft_dir), [Problem(f"the export adapts other tensors than the bundle (missing {missing[:4]}, "
                                       f"extra {extra[:4]})", "this is a bug in edgeft's export; report it")])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for name, (a0, b0) in orig.items():
        a1, b1 = got[name]
        emb = name == TOKEN_EMBD
        x = rng.standard_normal((a0.shape[0] if emb else a0.shape[1], 4))

        def apply(a, b):
            return runtime_scale(alpha, b.shape[1]) * (b.astype(np.float64) @ ((a.T if emb else a).astype(np.float64) @ x))
        ref, new = apply(a0, b0), apply(a1, b1)
        worst = max(worst, float(np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-12)))
    return worst


def export_adapter(bundle: AdapterBundle, layout: BaseLayout, hf_linear: set[str], out: Path, *,
                   dtype: str, base_ref: str) -> ExportedAdapter:
    """One bundle -> a checked PEFT folder (and its task card beside it)."""
    src = bundle.folder / "peft" if bundle.folder is not None else None
    if src is not None and (src / CONFIG_FILE).is_file() and not needs_normalizing(src):
        rank, how = copy_source(src, out, base_ref), "peft"
    else:   # no source, or one with rank/alpha patterns: written from the GGUF (one r, one alpha)
        rank, how = peft_from_gguf(bundle, layout, hf_linear, out, dtype=dtype, base_ref=base_ref), "gguf"
    err = round_trip_error(out, bundle, layout)
    if not err <= ROUND_TRIP_TOLERANCE:
        raise ConversionError(f"adapter '{bundle.name}': the exported PEFT folder computes another update than "
                              f"its GGUF (relative difference {err:.3g})",
                              "the bundle's peft/ source and adapter.gguf disagree; convert it again, or remove peft/ "
                              "so the export is written from the GGUF")
    bundle.card.save(out / "adapter.json")
    return ExportedAdapter(bundle.name, out, rank, how, err)
