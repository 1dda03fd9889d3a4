"""Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into numpy.

Everything llama.cpp cannot run is found here, before anything is written, and reported all at
once: DoRA and the other LoRA variants, LoRA biases, `modules_to_save` (full weights), trainable
tokens, NaN/Inf, configs that do not match the weights. Per-module scaling follows PEFT exactly
(`alpha / r`, `alpha / sqrt(r)` with rsLoRA, `alpha_pattern`, `rank_pattern`), so later stages
can fold it into lora_B.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .problems import Problem, refuse
from .safetensors_np import read_safetensors

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

_PREFIX = "base_model.model."
_LINEAR_RE = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")
_BASE_LAYER_RE = re.compile(r"^(?P<mod>.+)\.base_layer\.weight$")
_EMBED_RE = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[A-Za-z0-9_-]+))?$")

_RETRAIN = "retrain as plain LoRA, or merge it into the base in PEFT (merge_and_unload) and convert the merged model"
# Config keys that turn plain LoRA into something llama.cpp's `y += s * B(Ax)` cannot express.
_VARIANTS = {
    "use_dora": ("DoRA (use_dora=true) is not supported: llama.cpp has no DoRA magnitude vector", _RETRAIN),
    "use_qalora": ("QA-LoRA (use_qalora=true) is not supported", _RETRAIN),
    "velora_config": ("VeLoRA (velora_config) is not supported", _RETRAIN),
    "monteclora_config": ("MonteCLoRA (monteclora_config) is not supported", _RETRAIN),
    "use_bdlora": ("BD-LoRA (use_bdlora) is not supported", _RETRAIN),
    "arrow_config": ("Arrow routing (arrow_config) is not supported", "convert each expert LoRA on its own and mix them with --adapter NAME=SCALE"),
    "kasa_config": ("KaSA (kasa_config) is not supported", _RETRAIN),
    "alora_invocation_tokens": ("activated LoRA (alora_invocation_tokens) is not supported by edgeft's runtime",
                                "retrain as plain LoRA (without alora_invocation_tokens)"),
    "layer_replication": ("layer_replication is not supported: the base GGUF has no replicated layers",
                          "merge it in PEFT and convert the merged model with llama.cpp's convert_hf_to_gguf.py"),
    "target_parameters": ("LoRA on parameters (target_parameters) is not supported", "target nn.Linear modules (target_modules) instead"),
    "trainable_token_indices": ("trainable tokens (trainable_token_indices) are not supported",
                                "train without new/trainable tokens, or merge in PEFT and convert the merged model"),
    "lora_bias": ("LoRA bias (lora_bias=true) is not supported: llama.cpp adapters have no bias", "retrain with lora_bias=False"),
}
# Config keys that only matter at training or initialisation time, or that we read ourselves.
_KNOWN = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
    "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "runtime_config", "qalora_group_size", "ensure_weight_tying",
    "peft_version", "target_modules_to_tie", "modules_to_tie",
} | set(_VARIANTS)


@dataclass
class LoraModule:
    """One adapted module: lora_A [r, in] and lora_B [out, r] as PEFT stores them (float32)."""

    key: str            # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    a: np.ndarray       # [r, in]; embedding: [r, num_embeddings]
    b: np.ndarray       # [out, r]; embedding: [embedding_dim, r]
    alpha: float
    scale: float        # PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def leaf(self) -> str:
        return self.key.rsplit(".", 1)[-1]


@dataclass
class PeftAdapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule]
    dtypes: set[str] = field(default_factory=set)        # source dtypes, e.g. {"bf16"}
    # full weights PEFT saves next to an embed_tokens/lm_head LoRA (save_embedding_layers): module -> weight
    saved_base: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def r(self) -> int:
        return int(self.config.get("r") or 0)

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha") or 0.0)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def targets(self) -> list[str]:
        return sorted({m.leaf for m in self.modules.values()})

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})


def pattern_key(patterns, key: str) -> str | None:
    """The first rank/alpha pattern matching a module key, as PEFT's `get_pattern_key` does."""
    for pat in patterns:
        try:
            if re.match(rf"(.*\.)?({pat})$", key):
                return pat
        except re.error:
            continue
    return None


def read_peft(path: str | os.PathLike) -> PeftAdapter:
    """Read and validate a PEFT LoRA folder; raises one ConversionError listing every problem."""
    ad = load_peft(path)
    refuse(str(ad.path), ad.problems)
    return ad


def load_peft(path: str | os.PathLike) -> PeftAdapter:
    """Like read_peft, but returns the problems in `.problems` (so base checks can be added)."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE):
        p = p.parent
    problems: list[Problem] = []
    if not p.is_dir():
        refuse(str(p), [Problem(f"{p} is not a folder", "pass the folder written by PEFT's save_pretrained "
                                                        f"(it holds {CONFIG_FILE} and {SAFETENSORS_FILE})")])
    config = _read_config(p, problems)
    is_lora = str(config.get("peft_type", "LORA")).upper() == "LORA"
    tensors, dtypes = _read_weights(p, problems)
    modules: dict[str, LoraModule] = {}
    saved: dict[str, np.ndarray] = {}
    if is_lora and tensors is not None:
        for name in [n for n in tensors if _BASE_LAYER_RE.match(n)]:
            saved[_module_key(_BASE_LAYER_RE.match(name)["mod"])] = tensors.pop(name)
        modules = _pair_modules(tensors, config, problems)
        if not modules and not problems:
            problems.append(Problem(f"{p} holds no LoRA weights (no lora_A/lora_B tensors)",
                                    "save the trained adapter with PEFT's save_pretrained"))
    for mod in saved:
        if mod not in modules:
            problems.append(Problem(f"full weights for '{mod}' cannot go into a LoRA adapter",
                                    "retrain without resizing the vocabulary or saving full modules"))
    return PeftAdapter(p, config, modules, dtypes=dtypes, problems=problems, saved_base=saved)


def _read_config(p: Path, problems: list[Problem]) -> dict:
    cfg_path = p / CONFIG_FILE
    if not cfg_path.is_file():
        problems.append(Problem(f"{CONFIG_FILE} is missing in {p}",
                                "pass the folder written by PEFT's save_pretrained (it holds the config and the weights)"))
        return {}
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        problems.append(Problem(f"{CONFIG_FILE} is not valid JSON ({e})", "save the adapter again with PEFT"))
        return {}
    if not isinstance(cfg, dict):
        problems.append(Problem(f"{CONFIG_FILE} is not a JSON object", "save the adapter again with PEFT"))
        return {}
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        problems.append(Problem(f"peft_type is {cfg.get('peft_type')!r}; only LoRA adapters can be converted",
                                "llama.cpp runs plain LoRA; train with peft.LoraConfig"))
        return cfg
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(Problem(f"r must be a positive integer, not {r!r}", f"fix 'r' in {CONFIG_FILE}"))
    alpha = cfg.get("lora_alpha")
    if not _positive(alpha):
        problems.append(Problem(f"lora_alpha must be a number above 0 and at most {MAX_ALPHA:g}, not {alpha!r}",
                                f"fix 'lora_alpha' in {CONFIG_FILE}"))
    if cfg.get("fan_in_fan_out"):
        problems.append(Problem("fan_in_fan_out=true (transposed Conv1D weights, GPT-2 style) is not supported",
                                "train LoRA on nn.Linear layers (fan_in_fan_out=false)"))
    tm = cfg.get("target_modules")
    if tm is not None and not (isinstance(tm, str) and tm) and not (
            isinstance(tm, list) and tm and all(isinstance(x, str) and x for x in tm)):
        problems.append(Problem(f"target_modules must be a non-empty list of module names (or a regex), not {tm!r}",
                                f"fix 'target_modules' in {CONFIG_FILE}"))
    ltt = cfg.get("layers_to_transform")
    if ltt is not None and not (isinstance(ltt, int) and not isinstance(ltt, bool) and ltt >= 0) and not (
            isinstance(ltt, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ltt)):
        problems.append(Problem(f"layers_to_transform must be a layer index or a list of them, not {ltt!r}",
                                f"fix 'layers_to_transform' in {CONFIG_FILE}"))
    for key, (what, fix) in _VARIANTS.items():
        if cfg.get(key):
            problems.append(Problem(what, fix))
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        problems.append(Problem(f"bias={bias!r} trains the base model's biases, which a LoRA adapter GGUF cannot carry",
                                "retrain with bias='none'"))
    mts = cfg.get("modules_to_save")
    if mts:
        problems.append(Problem(f"modules_to_save={mts} stores full copies of those modules, which a LoRA adapter cannot carry",
                                "retrain without modules_to_save (target those modules with LoRA instead), "
                                "or merge in PEFT and convert the merged model"))
    for key in ("rank_pattern", "alpha_pattern"):
        val = cfg.get(key)
        if val is not None and not isinstance(val, dict):
            problems.append(Problem(f"{key} must be an object, not {type(val).__name__}", f"fix '{key}' in {CONFIG_FILE}"))
        elif val:
            ok = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0) if key == "rank_pattern" else _positive
            bad = {k: v for k, v in val.items() if not ok(v)}
            if bad:
                problems.append(Problem(f"{key} has values that are not positive numbers: {bad}",
                                        f"fix '{key}' in {CONFIG_FILE}"))
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        log.warning("task_type is %s; edgeft runs the adapter inside a causal LM", task)
    for key in sorted(set(cfg) - _KNOWN):
        val = cfg[key]
        looks_variant = (key.startswith("use_") and bool(val)) or (key.endswith("_config") and val not in (None, {}, []))
        if looks_variant:
            problems.append(Problem(f"unknown LoRA option {key}={val!r} (from a newer PEFT?) may change the forward pass",
                                    "retrain without it, or upgrade edgeft"))
        else:
            log.warning("ignoring unknown adapter_config.json key %s=%r", key, val)
    return cfg


MAX_ALPHA = 65536.0
MAX_WEIGHT = 1e8      # |w| of a LoRA factor: trained ones stay below 100; 3e38 passes isfinite and overflows later


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= MAX_ALPHA


def _read_weights(p: Path, problems: list[Problem]) -> tuple[dict[str, np.ndarray] | None, set[str]]:
    st = p / SAFETENSORS_FILE
    if st.is_file():
        from edgeft.errors import ConversionError

        try:
            arrays, dtypes, _ = read_safetensors(st)
        except ConversionError as e:
            problems.append(Problem(e.message, e.hint or "save the adapter again"))
            return None, set()
        return arrays, set(dtypes.values())
    other = sorted(x.name for x in p.glob("*.safetensors"))
    if other:
        problems.append(Problem(f"no {SAFETENSORS_FILE} in {p} (found {', '.join(other)})",
                                f"rename the adapter weights to {SAFETENSORS_FILE}"))
        return None, set()
    binf = p / BIN_FILE
    if binf.is_file():
        if importlib.util.find_spec("torch") is None:
            problems.append(Problem(f"{BIN_FILE} is a pickle that needs torch to read, and torch is not installed",
                                    "re-save the adapter with save_pretrained(..., safe_serialization=True), "
                                    "or install torch (pip install 'edgeft[train]')"))
            return None, set()
        return _read_bin(binf, problems)
    problems.append(Problem(f"no adapter weights in {p} ({SAFETENSORS_FILE} or {BIN_FILE})",
                            "pass the folder written by PEFT's save_pretrained"))
    return None, set()


def _read_bin(path: Path, problems: list[Problem]) -> tuple[dict[str, np.ndarray] | None, set[str]]:
    import torch  # only for legacy .bin adapters

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors of all kinds
        problems.append(Problem(f"cannot read {path.name}: {type(e).__name__}: {e}", "re-save the adapter with safetensors"))
        return None, set()
    out, dtypes = {}, set()
    for k, v in sd.items():
        if hasattr(v, "detach"):
            dtypes.add(str(v.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float", "f"))
            out[k] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
    return out, dtypes


def _module_key(raw: str) -> str:
    return raw[len(_PREFIX):] if raw.startswith(_PREFIX) else raw


def _pair_modules(tensors: dict[str, np.ndarray], cfg: dict, problems: list[Problem]) -> dict[str, LoraModule]:
    parts: dict[str, dict[str, np.ndarray]] = {}
    embed: set[str] = set()
    for name, arr in tensors.items():
        m = _LINEAR_RE.match(name) or _EMBED_RE.match(name)
        if m:
            mod = _module_key(m["mod"])
            part = m["part"]
            if part.startswith("lora_embedding"):
                embed.add(mod)
            parts.setdefault(mod, {})["A" if part.endswith("A") else "B"] = arr
            continue
        prob = _unexpected(name, cfg)
        if prob is not None:
            problems.append(prob)
    rank_pat = cfg.get("rank_pattern") or {}
    alpha_pat = cfg.get("alpha_pattern") or {}
    rank_pat = rank_pat if isinstance(rank_pat, dict) else {}
    alpha_pat = alpha_pat if isinstance(alpha_pat, dict) else {}
    tm = cfg.get("target_modules")
    targeted = set(tm) if isinstance(tm, list) and all(isinstance(x, str) for x in tm) else None
    r_default = cfg.get("r") if isinstance(cfg.get("r"), int) else None
    alpha_default = cfg.get("lora_alpha") if isinstance(cfg.get("lora_alpha"), (int, float)) else None
    rslora = bool(cfg.get("use_rslora"))
    modules: dict[str, LoraModule] = {}
    for mod in sorted(parts):
        ab = parts[mod]
        if "A" not in ab or "B" not in ab:
            have, miss = ("lora_A", "lora_B") if "A" in ab else ("lora_B", "lora_A")
            problems.append(Problem(f"'{mod}' has {have} but no {miss}", "the weights file is incomplete; save the adapter again"))
            continue
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2:
            problems.append(Problem(f"'{mod}': lora_A {a.shape} / lora_B {b.shape} are not 2-D",
                                    "only LoRA on Linear and Embedding layers can be converted"))
            continue
        if a.shape[0] != b.shape[1]:
            problems.append(Problem(f"'{mod}': lora_A {a.shape} and lora_B {b.shape} disagree on the rank",
                                    "the weights file is damaged; save the adapter again"))
            continue
        bad_weights = False
        for which, arr in (("lora_A", a), ("lora_B", b)):
            if arr.dtype.kind != "f":
                problems.append(Problem(f"'{mod}.{which}' holds {arr.dtype} values, not floating point",
                                        "save the adapter in float32, float16 or bfloat16"))
                bad_weights = True
            elif not np.isfinite(arr).all():
                problems.append(Problem(f"'{mod}.{which}' contains NaN or Inf",
                                        "training diverged; use an earlier checkpoint or a lower learning rate"))
            elif arr.size and float(np.abs(arr).max()) > MAX_WEIGHT:
                problems.append(Problem(f"'{mod}.{which}' has values up to {float(np.abs(arr).max()):.3g}, far beyond "
                                        "any trained LoRA", "training diverged or the file is damaged; save it again"))
        if bad_weights:
            continue
        rank = int(a.shape[0])
        rp = pattern_key(rank_pat, mod)
        r_cfg = rank_pat[rp] if rp is not None else r_default
        if r_cfg is not None and r_cfg != rank:
            problems.append(Problem(f"'{mod}' has rank {rank} but {CONFIG_FILE} says r={r_cfg}"
                                    f"{f' (rank_pattern {rp!r})' if rp is not None else ''}",
                                    "the config does not belong to these weights; save the adapter again"))
            continue
        if targeted is not None and not any(mod == t or mod.endswith("." + t) for t in targeted):
            problems.append(Problem(f"weights for '{mod}', which target_modules {sorted(targeted)} does not name",
                                    "the config does not belong to these weights; save the adapter again"))
            continue
        ap = pattern_key(alpha_pat, mod)
        alpha_v = alpha_pat[ap] if ap is not None else alpha_default
        if not _positive(alpha_v):
            continue  # reported by the config checks
        alpha = float(alpha_v)
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        modules[mod] = LoraModule(mod, a, b, alpha, scale, embedding=mod in embed)
    return modules


def _unexpected(name: str, cfg: dict) -> Problem | None:
    """The problem a non-LoRA tensor stands for (None when the config check already reported it)."""
    if "lora_magnitude_vector" in name:
        return Problem(*_VARIANTS["use_dora"])
    if re.search(r"\.lora_[AB](\.[^.]+)?\.bias$", name):
        return Problem(*_VARIANTS["lora_bias"])
    if "trainable_tokens" in name:
        return Problem(*_VARIANTS["trainable_token_indices"])
    if ".modules_to_save." in name and cfg.get("modules_to_save"):
        return None
    if ".modules_to_save." in name or name.endswith((".weight", ".bias")):
        mod = name.split(".modules_to_save.")[0] if ".modules_to_save." in name else name
        return Problem(f"full weights for '{_module_key(mod)}' (modules_to_save or a resized vocabulary) "
                       "cannot go into a LoRA adapter",
                       "retrain without modules_to_save (target those modules with LoRA instead), "
                       "or merge in PEFT and convert the merged model")
    return Problem(f"unexpected tensor '{name}' (not lora_A/lora_B)", "only plain LoRA adapters can be converted")
