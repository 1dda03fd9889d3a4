"""A tiny llama-architecture base GGUF written with numpy + gguf only (no torch), for the fast lane.

llama.cpp loads it in milliseconds and decodes thousands of tokens a second, so every engine,
server, CLI and validation test that needs *a* model, not real language, runs on it. What it
keeps from the real SmolLM2 base: the `llama` architecture with grouped-query attention (4 heads,
2 KV heads), Q4_1 block weights and Q8_0 embeddings, a vocab with byte fallback, SmolLM2's ChatML
chat template in `tokenizer.chat_template` and `<|im_end|>` as EOS/EOG, so the engine's chat, task
cards, grammars, stop strings and KV reuse all run the same code paths.

The vocab: 3 specials, 256 byte tokens, `<|im_start|>` / `<|im_end|>` (control), then "▁" and the
printable ASCII characters as normal tokens. The normal tokens are there so text round-trips
(a space is "▁", which llama.cpp turns back into " " only for normal tokens) and so generated text
is printable: the output rows of every other token are ~50x smaller than those of the printable
ones, so greedy decoding never picks a control byte, half a UTF-8 sequence or `<|im_end|>` (an
answer runs to max_tokens unless a grammar or stop string ends it), and the space row is larger
so answers have words. One character is one token. Weights are seeded Gaussians scaled so attention is sharp enough
that the next token depends on the whole context (greedy answers do not fall into a short cycle)
and a LoRA adapter with B ~ N(0, 0.05) changes a 20-token answer.

Adapters for it come from the same writer the real-base tests use (`edgeft.bench.fixtures.
write_random_adapter`, shapes read from the base's header): `helpers.write_adapter(path, tiny)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_CTX_TRAIN = 2, 64, 4, 2, 128, 8192
HEAD_DIM = N_EMBD // N_HEAD
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
CHAT = ["<|im_start|>", "<|im_end|>"]
SPACE = "\u2581"
PRINTABLE = [chr(c) for c in range(0x21, 0x7F)]
TOKENS = SPECIALS + BYTES + CHAT + [SPACE] + PRINTABLE
IM_START, IM_END = TOKENS.index("<|im_start|>"), TOKENS.index("<|im_end|>")
DEFAULT_SYSTEM = "You are a tiny random test model."
# SmolLM2's ChatML template, with its own default system prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _output_rows(rng: np.random.Generator) -> np.ndarray:
    """[n_vocab, n_embd]: printable tokens get full-size rows (space larger: ~1 token in 6 is a
    space), every other token a row ~50x smaller, so it never wins the argmax."""
    rows = rng.standard_normal((len(TOKENS), N_EMBD)) * 0.02
    first = TOKENS.index(SPACE)
    rows[first:] = rng.standard_normal((len(TOKENS) - first, N_EMBD))
    rows[first] *= 2.3
    rows[[TOKENS.index(c) for c in "abcdefghijklmnopqrstuvwxyz"]] *= 1.25
    return rows.astype(np.float32)


def write_tiny_base(path: str | os.PathLike, *, seed: int = 0, tied: bool = False,
                    n_layer: int = N_LAYER) -> Path:
    """Write the tiny base (~0.1 MB) and return its path.

    Quantized as SmolLM2's Q4_1 file is: block matrices Q4_1, embeddings Q8_0, norms F32. That
    also keeps llama.cpp's results independent of how many rows a batch outputs (with F32
    weights its batched matmul sums in another order than its one-row kernel).
    `tied=True` leaves out output.weight, so llama.cpp reuses token_embd as the output matrix
    (as SmolLM2 does): for checks of the file, not of answers (with input and output rows one
    matrix, each token's own row dominates its logits and greedy text repeats one character)."""
    import gguf

    rng = np.random.default_rng(seed)
    path = Path(path)
    tt = gguf.TokenType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny random llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * len(TOKENS))
    w.add_token_types([tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256 + [tt.CONTROL] * 2
                      + [tt.NORMAL] * (1 + len(PRINTABLE)))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(IM_END)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, data: np.ndarray, qtype=gguf.GGMLQuantizationType.Q4_1) -> None:
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    q8 = gguf.GGMLQuantizationType.Q8_0
    out_rows = _output_rows(rng)
    add("token_embd.weight", out_rows if tied else normal(len(TOKENS), N_EMBD, std=1.0), q8)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    if not tied:
        add("output.weight", out_rows, q8)
    d, kv = N_EMBD, N_HEAD_KV * HEAD_DIM
    for i in range(n_layer):
        # numpy shape [out, in] (ggml ne = [in, out]). q/k std 0.25: attention logits with a
        # spread of a few units, so positions and earlier tokens matter.
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        add(f"blk.{i}.attn_q.weight", normal(d, d, std=0.25))
        add(f"blk.{i}.attn_k.weight", normal(kv, d, std=0.25))
        add(f"blk.{i}.attn_v.weight", normal(kv, d, std=0.25))
        add(f"blk.{i}.attn_output.weight", normal(d, d, std=0.25))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        add(f"blk.{i}.ffn_gate.weight", normal(N_FF, d, std=0.2))
        add(f"blk.{i}.ffn_up.weight", normal(N_FF, d, std=0.2))
        add(f"blk.{i}.ffn_down.weight", normal(d, N_FF, std=0.2))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
