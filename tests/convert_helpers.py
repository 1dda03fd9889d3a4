"""Helpers for the converter tests: tiny random HF models, their F32 GGUF bases, PEFT adapters.

The tiny base GGUF is written here with gguf.GGUFWriter straight from the HF state dict, with
gguf-py's own HF->GGUF name map (not edgeft's), llama.cpp's rotary q/k permutation for llama,
Gemma's norm offset, and a minimal SentencePiece-style vocab (3 specials + 256 byte tokens) that
llama.cpp accepts. That the base is right is itself checked: llama.cpp's logits without an
adapter must equal transformers' (test_convert_parity).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

VOCAB = 259  # <unk>, <s>, </s>, <0x00>..<0xFF>
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.1, rms_norm_eps=1e-5)
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(arch: str, **over):
    import transformers as T

    kw = dict(TINY)
    if arch == "llama":
        kw.update(tie_word_embeddings=False)
        cfg = T.LlamaConfig(**kw)
    elif arch == "qwen2":
        kw.update(tie_word_embeddings=False)
        cfg = T.Qwen2Config(**kw)
    elif arch == "qwen3":
        kw.update(tie_word_embeddings=False, head_dim=16)
        cfg = T.Qwen3Config(**kw)
    elif arch == "phi3":
        kw.update(tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  original_max_position_embeddings=512)
        cfg = T.Phi3Config(**kw)
    elif arch == "gemma":
        kw.update(head_dim=16, pad_token_id=0)
        cfg = T.GemmaConfig(**kw)
    elif arch == "gemma2":
        kw.update(head_dim=16, pad_token_id=0, query_pre_attn_scalar=16, sliding_window=4096)
        cfg = T.Gemma2Config(**kw)
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def hf_model(arch: str = "llama", seed: int = 0, **over):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    cfg = hf_config(arch, **over)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # RMSNorm weights start at 1 (Gemma: 0); randomize them a little so a wrong norm mapping shows
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_base_gguf(model, path: str | os.PathLike, arch: str | None = None, qkv: str = "as-is") -> Path:
    """The HF model as an F32 GGUF base that llama.cpp loads.

    qkv="fused" joins q/k/v into one attn_qkv (llama.cpp loads that for any architecture);
    qkv="split" splits phi3's fused qkv_proj into attn_q/attn_k/attn_v.
    """
    import gguf

    cfg = model.config
    arch = arch or {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma": "gemma",
                    "gemma2": "gemma2"}[cfg.model_type]
    march = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    n_layer = cfg.num_hidden_layers
    nmap = gguf.get_tensor_name_map(march, n_layer)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    path = Path(path)
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny random model")  # not "phi3": llama.cpp keys tokenizer quirks on the name
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    if arch == "phi3":
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", cfg.original_max_position_embeddings)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tt = gguf.TokenType
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    held: dict[str, np.ndarray] = {}
    nq, nk = n_head * head_dim, n_kv * head_dim
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = nmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        data = t.detach().float().numpy().copy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        if arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if arch in ("gemma", "gemma2") and hf_name.endswith("norm.weight"):
            data = data + 1.0
        if qkv == "fused" and hf_name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            held[name] = data
            blk = name.rsplit(".", 2)[0]
            parts = [held.get(f"{blk}.attn_{x}.weight") for x in "qkv"]
            if all(p is not None for p in parts):
                w.add_tensor(f"{blk}.attn_qkv.weight", np.ascontiguousarray(np.concatenate(parts), dtype=np.float32))
            continue
        if qkv == "split" and hf_name.endswith("qkv_proj.weight"):
            blk = name.rsplit(".", 2)[0]
            for x, part in zip("qkv", (data[:nq], data[nq:nq + nk], data[nq + nk:])):
                w.add_tensor(f"{blk}.attn_{x}.weight", np.ascontiguousarray(part, dtype=np.float32))
            continue
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_peft(model, out_dir: str | os.PathLike, *, seed: int = 1, b_scale: float = 1.0, save_dtype=None, **lora):
    """A PEFT adapter with random A and B on a copy of `model`; returns the PeftModel (eval)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    lora.setdefault("init_lora_weights", False)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**lora))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(b_scale)
    pm.eval()
    if save_dtype is not None:
        save_model = copy.deepcopy(pm).to(save_dtype)
        save_model.save_pretrained(str(out_dir))
        # PEFT must compute with the weights as stored, or parity would compare different adapters
        with torch.no_grad():
            for (n, p), (_, q) in zip(pm.named_parameters(), save_model.named_parameters()):
                if "lora_" in n:  # the base keeps float32: only the adapter was saved in save_dtype
                    p.copy_(q.float())
    else:
        pm.save_pretrained(str(out_dir))
    return pm


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0].float().numpy()


def greedy(logits_fn, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(np.argmax(logits_fn(toks)[-1])))
    return toks[len(prompt):]


def llama_cpp_source() -> Path | None:
    """llama.cpp's source tree from the llama-cpp-python sdist (the reference converter lives there).

    Looked up in $EDGEFT_LLAMA_CPP_SRC and the real EDGEFT_HOME cache; fetched into
    that cache with `pip download` (PyPI) when missing. None if it cannot be had.
    """
    from edgeft.convert.bench import find_llama_cpp_source

    return find_llama_cpp_source(download=True)


def run_reference_converter(src: Path, peft_dir: Path, hf_dir: Path, out: Path, outtype: str = "f32") -> None:
    script = src / "convert_lora_to_gguf.py"
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    res = subprocess.run([sys.executable, str(script), "--base", str(hf_dir), "--outtype", outtype,
                          "--outfile", str(out), str(peft_dir)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"reference converter failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def save_hf_config(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


# -- cached tiny models (built once per test session) -------------------------------------------

_CACHE: dict = {}
_ROOT: list[Path] = []


def _root() -> Path:
    if not _ROOT:
        import atexit
        import shutil
        import tempfile

        _ROOT.append(Path(tempfile.mkdtemp(prefix="edgeft-convert-tests-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


def tiny(arch: str = "llama", qkv: str = "as-is", **over):
    """(HF model, F32 base GGUF path) for a tiny random model, cached per session."""
    key = (arch, qkv, tuple(sorted(over.items())))
    if key not in _CACHE:
        model = hf_model(arch, **over)
        tag = "-".join([arch, qkv] + [f"{k}{v}" for k, v in sorted(over.items())])
        _CACHE[key] = (model, write_base_gguf(model, _root() / f"tiny-{tag}.gguf", qkv=qkv))
    return _CACHE[key]


def engine(base: Path, **kw):
    from edgeft.engine import Engine

    return Engine(str(base), n_ctx=kw.pop("n_ctx", 256), n_threads=kw.pop("n_threads", 2), **kw)


TOKENS = [1] + [3 + (i * 37) % 250 for i in range(47)]  # BOS + 47 byte tokens
