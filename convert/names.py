"""PEFT module names -> tensors of the base GGUF, per architecture.

Everything comes from the base GGUF itself (architecture, tensor names and shapes, head counts):
no HF config.json. Three layout facts matter:

- llama (Llama, Mistral, TinyLlama, SmolLM2): llama.cpp's HF->GGUF conversion permutes the rows
  of q_proj and k_proj into its rotary layout. The same row permutation goes onto lora_B of q/k,
  never onto lora_A (delta = B @ A, permuting rows of the product permutes rows of B).
- fused projections: phi3 stores q,k,v as one `attn_qkv` and gate,up as one `ffn_up` of twice the
  width. A fused PEFT module (qkv_proj, gate_up_proj) on a base with separate tensors is split
  (rows of B, the same A for each part); separate PEFT modules on a fused base tensor are joined
  exactly: A stacked, B block-diagonal (rank = sum of ranks).
- token_embd: llama.cpp gathers rows of lora_a by token id, so it takes PEFT's
  lora_embedding_A transposed ([n_vocab, r]); lora_embedding_B goes as it is.

Each pair keeps a per-rank-column PEFT scale; `lora_gguf` folds it into lora_B.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from edgeft.gguf_header import GGUFHeader, read_tensor
from .peft import LoraModule, PeftAdapter
from .problems import Problem


@dataclass(frozen=True)
class ArchSpec:
    name: str           # GGUF general.architecture
    models: str         # what it covers, for messages
    rope_permute: bool  # q/k rows permuted by llama.cpp's converter


ARCHS: dict[str, ArchSpec] = {a.name: a for a in (
    ArchSpec("llama", "Llama 2/3, Mistral, TinyLlama, SmolLM/SmolLM2", True),
    ArchSpec("qwen2", "Qwen2, Qwen2.5", False),
    ArchSpec("qwen3", "Qwen3", False),
    ArchSpec("phi3", "Phi-3, Phi-3.5, Phi-4-mini", False),
    ArchSpec("gemma", "Gemma", False),
    ArchSpec("gemma2", "Gemma 2", False),
)}

# PEFT leaf module -> the logical projections it produces, in row order.
LEAF_PARTS: dict[str, tuple[str, ...]] = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
    "qkv_proj": ("q", "k", "v"),
    "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    "gate_up_proj": ("gate", "up"),
}
SUPPORTED_TARGETS = tuple(LEAF_PARTS) + ("embed_tokens", "lm_head")

_BLOCK_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([A-Za-z0-9_]+)$")
_EMBED_RE = re.compile(r"(?:^|\.)embed_tokens$")
_HEAD_RE = re.compile(r"(?:^|\.)lm_head$")

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"


def supported_architectures() -> str:
    return ", ".join(f"{a.name} ({a.models})" for a in ARCHS.values())


@dataclass
class BaseLayout:
    """What the converter needs to know about the base model, read from its GGUF header."""

    arch: ArchSpec
    tensors: dict[str, tuple[int, ...]]   # name -> ggml shape (ne0 = input features)
    n_layer: int
    n_head: list[int]
    n_head_kv: list[int]
    head_dim_k: list[int]
    head_dim_v: list[int]

    @property
    def tied_embeddings(self) -> bool:
        return OUTPUT not in self.tensors

    @classmethod
    def from_header(cls, h: GGUFHeader) -> tuple["BaseLayout | None", list[Problem]]:
        arch_name = h.architecture
        if h.kv.get("general.type") == "adapter":
            return None, [Problem(f"{h.path.name} is a LoRA adapter, not a base model", "pass the base model GGUF with --base")]
        spec = ARCHS.get(str(arch_name))
        if spec is None:
            return None, [Problem(f"the base architecture '{arch_name}' is not supported",
                                  f"supported: {supported_architectures()}")]
        n_layer = int(h.arch_value("block_count", 0) or 0)
        n_embd = int(h.arch_value("embedding_length", 0) or 0)

        def per_layer(v, default):
            v = default if v is None else v
            if isinstance(v, list):
                return [int(x) for x in v] + [int(v[-1])] * max(0, n_layer - len(v)) if v else [0] * n_layer
            return [int(v)] * n_layer

        n_head = per_layer(h.arch_value("attention.head_count"), 0)
        n_head_kv = per_layer(h.arch_value("attention.head_count_kv"), n_head)
        hd = [n_embd // h_ if h_ else 0 for h_ in n_head]
        hdk = per_layer(h.arch_value("attention.key_length"), hd)
        hdv = per_layer(h.arch_value("attention.value_length"), hdk)
        layout = cls(spec, {t.name: t.shape for t in h.tensors.values()}, n_layer, n_head, n_head_kv, hdk, hdv)
        if n_layer <= 0 or not n_head or not n_head[0]:
            return None, [Problem(f"the base GGUF lacks {arch_name}.block_count or attention.head_count",
                                  "the base file is incomplete; convert it again with llama.cpp")]
        return layout, []

    # -- where each logical projection of block `i` lives: (tensor name, first row, rows) --
    def locate(self, i: int, part: str) -> tuple[str, int, int] | None:
        t = self.tensors
        blk = f"blk.{i}."
        simple = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "down": "ffn_down"}
        if part in ("q", "k", "v") and f"{blk}attn_qkv.weight" not in t:
            name = f"{blk}{simple[part]}.weight"
            return (name, 0, t[name][1]) if name in t else None
        if part in ("q", "k", "v"):
            name = f"{blk}attn_qkv.weight"
            nq = self.n_head[i] * self.head_dim_k[i]
            nk = self.n_head_kv[i] * self.head_dim_k[i]
            nv = self.n_head_kv[i] * self.head_dim_v[i]
            if nq + nk + nv != t[name][1]:
                return None
            return {"q": (name, 0, nq), "k": (name, nq, nk), "v": (name, nq + nk, nv)}[part]
        if part in simple:
            name = f"{blk}{simple[part]}.weight"
            return (name, 0, t[name][1]) if name in t else None
        gate, up = f"{blk}ffn_gate.weight", f"{blk}ffn_up.weight"
        if up not in t:
            return None
        if gate in t:
            name = gate if part == "gate" else up
            return (name, 0, t[name][1])
        half = t[up][1] // 2  # fused gate_up (phi3): [gate; up] rows, as llama.cpp's swiglu splits it
        return (up, 0, half) if part == "gate" else (up, half, half)


@dataclass
class GGUFPair:
    """One adapted base tensor: a [r, in] (token_embd: [n_vocab, r]) and b [out, r], numpy order."""

    name: str
    a: np.ndarray
    b: np.ndarray
    col_scale: np.ndarray                 # PEFT scale of each rank column of b (float64 [r])
    sources: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.b.shape[1])


def permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's (per head: interleave the two halves), on rows of b."""
    out = b.shape[0]
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


@dataclass
class _Piece:
    module: LoraModule
    row0: int
    b: np.ndarray


def plan(adapter: PeftAdapter, layout: BaseLayout) -> tuple[list[GGUFPair], list[Problem]]:
    """Map every PEFT module onto base tensors; returns the pairs and every problem found."""
    problems: list[Problem] = []
    pieces: dict[str, list[_Piece]] = {}
    whole: dict[str, GGUFPair] = {}
    unknown: set[str] = set()
    for mod in adapter.modules.values():
        if _EMBED_RE.search(mod.key):
            pair = _embedding(mod, layout, problems)
            if pair is not None:
                whole[TOKEN_EMBD] = pair
            continue
        if _HEAD_RE.search(mod.key):
            pair = _lm_head(mod, layout, problems)
            if pair is not None:
                whole[OUTPUT] = pair
            continue
        m = _BLOCK_RE.search(mod.key)
        leaf = m.group(2) if m else mod.leaf
        if m is None or leaf not in LEAF_PARTS:
            unknown.add(leaf if leaf not in LEAF_PARTS else mod.key)
            continue
        if mod.embedding:
            problems.append(Problem(f"'{mod.key}' is an embedding LoRA on a linear layer", "the adapter is damaged"))
            continue
        _block_module(mod, int(m.group(1)), LEAF_PARTS[leaf], layout, pieces, problems)
    if unknown:
        problems.append(Problem(f"target module(s) {', '.join(sorted(unknown))} are not supported for "
                                f"{layout.arch.name}", f"supported targets: {', '.join(SUPPORTED_TARGETS)}"))
    pairs = dict(whole)
    for name, plist in pieces.items():
        pair = _assemble(name, plist, layout, problems)
        if pair is not None:
            pairs[name] = pair
    order = {n: i for i, n in enumerate(layout.tensors)}
    return sorted(pairs.values(), key=lambda p: order.get(p.name, 1 << 30)), problems


def _block_module(mod: LoraModule, i: int, parts: tuple[str, ...], layout: BaseLayout,
                  pieces: dict[str, list[_Piece]], problems: list[Problem]) -> None:
    if i >= layout.n_layer:
        problems.append(Problem(f"'{mod.key}': layer {i} does not exist in the base ({layout.n_layer} layers)",
                                "this adapter was trained for another (larger) base model"))
        return
    locs = []
    for part in parts:
        loc = layout.locate(i, part)
        if loc is None:
            problems.append(Problem(f"'{mod.key}': the base has no tensor for its '{part}' projection in block {i}",
                                    "this adapter was trained for another base model"))
            return
        locs.append(loc)
    rows = sum(n for _, _, n in locs)
    in_dims = {layout.tensors[name][0] for name, _, _ in locs}
    if mod.b.shape[0] != rows or in_dims != {mod.a.shape[1]}:
        want = f"lora_A [r, {'/'.join(str(d) for d in sorted(in_dims))}], lora_B [{rows}, r]"
        problems.append(Problem(f"'{mod.key}': lora_A {tuple(mod.a.shape)} / lora_B {tuple(mod.b.shape)} do not fit "
                                f"the base (expects {want})", "this adapter was trained for another base model"))
        return
    r0 = 0
    for part, (name, row0, n) in zip(parts, locs):
        b = mod.b[r0:r0 + n]
        r0 += n
        if layout.arch.rope_permute and part in ("q", "k"):
            heads = layout.n_head[i] if part == "q" else layout.n_head_kv[i]
            if heads <= 0 or n % (2 * heads):
                problems.append(Problem(f"'{mod.key}': {n} rows cannot be split into {heads} rotary heads",
                                        "this adapter was trained for another base model"))
                return
            b = permute_rows(b, heads)
        pieces.setdefault(name, []).append(_Piece(mod, row0, b))


def _assemble(name: str, plist: list[_Piece], layout: BaseLayout, problems: list[Problem]) -> GGUFPair | None:
    rows = layout.tensors[name][1]
    mods: dict[str, LoraModule] = {}
    for p in plist:
        mods.setdefault(p.module.key, p.module)
    if len(plist) == 1 and plist[0].row0 == 0 and plist[0].b.shape[0] == rows:
        m = plist[0].module
        return GGUFPair(name, m.a, plist[0].b, np.full(m.rank, m.scale), [m.key])
    covered = np.zeros(rows, dtype=bool)
    for p in plist:
        seg = covered[p.row0:p.row0 + p.b.shape[0]]
        if seg.any():
            problems.append(Problem(f"'{name}' is adapted twice ({', '.join(sorted(mods))})",
                                    "target either the fused module or its parts, not both"))
            return None
        seg[:] = True
    keys = sorted(mods)
    col0, c = {}, 0
    for k in keys:
        col0[k] = c
        c += mods[k].rank
    a = np.concatenate([mods[k].a for k in keys], axis=0)
    b = np.zeros((rows, c), dtype=np.float32)
    for p in plist:
        k0 = col0[p.module.key]
        b[p.row0:p.row0 + p.b.shape[0], k0:k0 + p.module.rank] = p.b
    scale = np.concatenate([np.full(mods[k].rank, mods[k].scale) for k in keys])
    return GGUFPair(name, a, b, scale, keys)


def _embedding(mod: LoraModule, layout: BaseLayout, problems: list[Problem]) -> GGUFPair | None:
    shape = layout.tensors.get(TOKEN_EMBD)
    if shape is None:
        problems.append(Problem(f"the base has no {TOKEN_EMBD}", "this adapter was trained for another base model"))
        return None
    if not mod.embedding:
        problems.append(Problem(f"'{mod.key}' is not an embedding LoRA (lora_embedding_A/B)", "the adapter is damaged"))
        return None
    if layout.tied_embeddings:
        problems.append(Problem(f"LoRA on '{mod.key}' with a base whose output layer is tied to the embeddings "
                                f"(no {OUTPUT}): llama.cpp would apply it to the output layer too, "
                                "where its shape does not fit",
                                "retrain without embed_tokens in target_modules"))
        return None
    n_embd, n_vocab = shape[0], shape[1]
    if mod.a.shape[1] != n_vocab or mod.b.shape[0] != n_embd:
        problems.append(Problem(f"'{mod.key}': lora_embedding_A {tuple(mod.a.shape)} / lora_embedding_B "
                                f"{tuple(mod.b.shape)} do not fit the base (vocab {n_vocab}, hidden {n_embd})",
                                "this adapter was trained for another base model (or with added tokens)"))
        return None
    return GGUFPair(TOKEN_EMBD, np.ascontiguousarray(mod.a.T), mod.b, np.full(mod.rank, mod.scale), [mod.key])


def _lm_head(mod: LoraModule, layout: BaseLayout, problems: list[Problem]) -> GGUFPair | None:
    shape = layout.tensors.get(OUTPUT)
    if shape is None:
        problems.append(Problem(f"LoRA on '{mod.key}' needs {OUTPUT}, but this base ties its output layer to the "
                                "embeddings (llama.cpp computes the output with token_embd)",
                                "retrain without lm_head in target_modules"))
        return None
    if mod.a.shape[1] != shape[0] or mod.b.shape[0] != shape[1]:
        problems.append(Problem(f"'{mod.key}': lora_A {tuple(mod.a.shape)} / lora_B {tuple(mod.b.shape)} do not fit "
                                f"{OUTPUT} {shape}", "this adapter was trained for another base model"))
        return None
    return GGUFPair(OUTPUT, mod.a, mod.b, np.full(mod.rank, mod.scale), [mod.key])


# Beyond this relative difference, saved embedding weights are not the base's (Q4 noise is ~0.1).
SAVED_WEIGHT_TOLERANCE = 0.2


def check_saved_weights(adapter: PeftAdapter, header: GGUFHeader) -> list[Problem]:
    """PEFT saves full embed_tokens/lm_head weights next to a LoRA on them (in case the vocabulary
    was resized). They can be dropped only if they are the base's own weights."""
    problems = []
    for mod, w in adapter.saved_base.items():
        if mod not in adapter.modules:
            continue  # reported by the reader
        name = TOKEN_EMBD if _EMBED_RE.search(mod) else OUTPUT if _HEAD_RE.search(mod) else None
        t = header.tensors.get(name) if name else None
        if t is None:
            continue  # the LoRA itself is reported by plan()
        if tuple(w.shape) != tuple(reversed(t.shape)):
            problems.append(Problem(f"the adapter carries '{mod}' weights of shape {tuple(w.shape)}, the base's are "
                                    f"{tuple(reversed(t.shape))}: the vocabulary was resized (added tokens)",
                                    "retrain without adding tokens; a LoRA adapter cannot carry a new vocabulary"))
            continue
        ref = read_tensor(header, name)
        rel = float(np.linalg.norm(w - ref) / max(float(np.linalg.norm(ref)), 1e-12))
        if rel > SAVED_WEIGHT_TOLERANCE:
            problems.append(Problem(f"the adapter carries '{mod}' weights that differ from the base's "
                                    f"(relative difference {rel:.2f}): trained or from another base",
                                    "retrain with the embeddings frozen, against this base"))
    return problems
