"""PEFT modules -> base GGUF tensors: q/k permutation on lora_B, fused/split projections, scale
folding, and the base-dependent refusals. Pure numpy: every planned pair is checked by rebuilding
the weight delta llama.cpp will add (alpha/r * B @ A) and comparing it with PEFT's."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.convert.lora_gguf import fold, runtime_scale
from edgeft.convert.names import ARCHS, BaseLayout, GGUFPair, permute_rows, plan
from edgeft.convert.peft import LoraModule, PeftAdapter

H, FF, NH, NKV, HD, V = 64, 128, 4, 2, 16, 300


def layout(arch="llama", fused_qkv=False, fused_gate_up=False, tied=False, n_layer=2) -> BaseLayout:
    t = {"token_embd.weight": (H, V)}
    if not tied:
        t["output.weight"] = (H, V)
    for i in range(n_layer):
        b = f"blk.{i}."
        if fused_qkv:
            t[b + "attn_qkv.weight"] = (H, NH * HD + 2 * NKV * HD)
        else:
            t.update({b + "attn_q.weight": (H, NH * HD), b + "attn_k.weight": (H, NKV * HD), b + "attn_v.weight": (H, NKV * HD)})
        t[b + "attn_output.weight"] = (NH * HD, H)
        if fused_gate_up:
            t[b + "ffn_up.weight"] = (H, 2 * FF)
        else:
            t.update({b + "ffn_gate.weight": (H, FF), b + "ffn_up.weight": (H, FF)})
        t[b + "ffn_down.weight"] = (FF, H)
        t[b + "attn_norm.weight"] = (H,)
    return BaseLayout(ARCHS[arch], t, n_layer, [NH] * n_layer, [NKV] * n_layer, [HD] * n_layer, [HD] * n_layer)


OUT = {"q_proj": NH * HD, "k_proj": NKV * HD, "v_proj": NKV * HD, "o_proj": H, "gate_proj": FF, "up_proj": FF,
       "down_proj": H, "qkv_proj": NH * HD + 2 * NKV * HD, "gate_up_proj": 2 * FF}
IN = {"o_proj": NH * HD, "down_proj": FF}
GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn", "qkv_proj": "self_attn"}


def adapter(mods: dict[str, tuple[int, float]], layers=(0, 1), seed=0, alpha=8.0) -> PeftAdapter:
    """mods: leaf -> (rank, PEFT scale)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in layers:
        for leaf, (r, s) in mods.items():
            key = f"model.layers.{i}.{GROUP.get(leaf, 'mlp')}.{leaf}"
            a = rng.standard_normal((r, IN.get(leaf, H))).astype(np.float32)
            b = rng.standard_normal((OUT[leaf], r)).astype(np.float32)
            out[key] = LoraModule(key, a, b, alpha, s)
    return PeftAdapter(path=None, config={"lora_alpha": alpha}, modules=out)  # type: ignore[arg-type]


def effective(pairs: list[GGUFPair], alpha: float) -> dict[str, np.ndarray]:
    """What llama.cpp adds to each base tensor at user scale 1 (numpy order [out, in])."""
    return {name: runtime_scale(alpha, b.shape[1]) * (b.astype(np.float64) @ a.astype(np.float64))
            for name, a, b in fold(pairs, alpha)}


def expected(ad: PeftAdapter, lay: BaseLayout, fused_qkv=False, fused_gate_up=False) -> dict[str, np.ndarray]:
    """PEFT's deltas moved into the GGUF layout by hand (rotary permutation of q/k rows for llama)."""
    want: dict[str, np.ndarray] = {}
    for m in ad.modules.values():
        i = int(m.key.split(".")[2])
        d = m.scale * (m.b.astype(np.float64) @ m.a.astype(np.float64))
        parts = {"qkv_proj": [("q", NH * HD), ("k", NKV * HD), ("v", NKV * HD)],
                 "gate_up_proj": [("gate", FF), ("up", FF)]}.get(m.leaf, [(m.leaf.split("_")[0], d.shape[0])])
        r0 = 0
        for part, n in parts:
            piece = d[r0:r0 + n]
            r0 += n
            if lay.arch.rope_permute and part in ("q", "k"):
                piece = permute_rows(piece, NH if part == "q" else NKV)
            if part in ("q", "k", "v") and fused_qkv:
                name, off = f"blk.{i}.attn_qkv.weight", {"q": 0, "k": NH * HD, "v": NH * HD + NKV * HD}[part]
            elif part in ("gate", "up") and fused_gate_up:
                name, off = f"blk.{i}.ffn_up.weight", 0 if part == "gate" else FF
            else:
                name = f"blk.{i}." + {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
                                      "up": "ffn_up", "down": "ffn_down"}[part] + ".weight"
                off = 0
            rows = lay.tensors[name][1]
            want.setdefault(name, np.zeros((rows, lay.tensors[name][0])))
            want[name][off:off + n] += piece
    return want


def check(ad, lay, **kw):
    pairs, problems = plan(ad, lay)
    assert problems == []
    got, want = effective(pairs, ad.lora_alpha), expected(ad, lay, **kw)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    return pairs


def test_permutation_is_llama_cpp_rotary_layout():
    # one head of 8 rows: HF pairs row j with j+4 (rotate_half); llama.cpp pairs adjacent rows
    rows = permute_rows(np.arange(8)[:, None], 1).ravel().tolist()
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7]
    two = permute_rows(np.arange(16)[:, None], 2).ravel().tolist()
    assert two == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_plain_lora_on_seven_projections_llama():
    seven = {m: (4, 2.0) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    pairs = check(adapter(seven), layout("llama"))
    assert len(pairs) == 14
    q = next(p for p in pairs if p.name == "blk.0.attn_q.weight")
    # lora_A untouched, lora_B permuted, no folding for plain LoRA
    ad = adapter(seven)
    m = ad.modules["model.layers.0.self_attn.q_proj"]
    assert np.array_equal(q.a, m.a) and np.array_equal(q.b, permute_rows(m.b, NH))
    assert fold([q], 8.0)[0][2] is q.b


def test_no_permutation_for_neox_archs():
    ad = adapter({"q_proj": (4, 2.0), "k_proj": (4, 2.0)})
    for arch in ("qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        pairs = check(ad, layout(arch))
        q = next(p for p in pairs if p.name == "blk.0.attn_q.weight")
        assert np.array_equal(q.b, ad.modules["model.layers.0.self_attn.q_proj"].b)


def test_per_module_scales_are_folded_into_b():
    # rsLoRA-like and alpha/rank-pattern-like scales: all differ from alpha/r of the file
    ad = adapter({"q_proj": (8, 8 / np.sqrt(8)), "v_proj": (2, 16.0), "down_proj": (4, 0.5)})
    pairs = check(ad, layout("llama"))
    assert all(p.col_scale.size == p.rank for p in pairs)


def test_separate_modules_join_a_fused_qkv_base():
    ad = adapter({"q_proj": (4, 2.0), "k_proj": (2, 4.0), "v_proj": (8, 1.0)})
    pairs = check(ad, layout("llama", fused_qkv=True), fused_qkv=True)
    qkv = next(p for p in pairs if p.name == "blk.0.attn_qkv.weight")
    assert qkv.rank == 14 and qkv.a.shape == (14, H)


def test_missing_parts_of_a_fused_tensor_stay_zero():
    check(adapter({"q_proj": (4, 2.0), "v_proj": (4, 2.0)}), layout("llama", fused_qkv=True), fused_qkv=True)


def test_fused_modules_split_onto_separate_tensors():
    ad = adapter({"qkv_proj": (4, 2.0), "gate_up_proj": (4, 2.0)})
    pairs = check(ad, layout("phi3"))
    assert {p.name for p in pairs} >= {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                                       "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"}


def test_phi3_fused_base_takes_fused_modules_as_they_are():
    ad = adapter({"qkv_proj": (4, 2.0), "gate_up_proj": (4, 2.0)})
    pairs = check(ad, layout("phi3", fused_qkv=True, fused_gate_up=True), fused_qkv=True, fused_gate_up=True)
    up = next(p for p in pairs if p.name == "blk.0.ffn_up.weight")
    assert np.array_equal(up.b, ad.modules["model.layers.0.mlp.gate_up_proj"].b)


def test_both_fused_and_part_is_refused():
    ad = adapter({"qkv_proj": (4, 2.0)})
    ad.modules.update(adapter({"q_proj": (4, 2.0)}).modules)
    _, problems = plan(ad, layout("phi3", fused_qkv=True))
    assert any("adapted twice" in p.what for p in problems)


def test_embedding_and_lm_head():
    rng = np.random.default_rng(5)
    emb = LoraModule("model.embed_tokens", rng.standard_normal((4, V)).astype(np.float32),
                     rng.standard_normal((H, 4)).astype(np.float32), 8, 2.0, embedding=True)
    head = LoraModule("lm_head", rng.standard_normal((4, H)).astype(np.float32),
                      rng.standard_normal((V, 4)).astype(np.float32), 8, 2.0)
    ad = PeftAdapter(None, {"lora_alpha": 8}, {emb.key: emb, head.key: head})  # type: ignore[arg-type]
    pairs, problems = plan(ad, layout("llama"))
    assert problems == []
    e = next(p for p in pairs if p.name == "token_embd.weight")
    assert e.a.shape == (V, 4) and np.array_equal(e.a, emb.a.T)  # token_embd takes A transposed
    assert np.array_equal(e.b, emb.b)
    o = next(p for p in pairs if p.name == "output.weight")
    assert np.array_equal(o.a, head.a) and np.array_equal(o.b, head.b)
    _, problems = plan(ad, layout("llama", tied=True))
    text = " ".join(p.what for p in problems)
    assert "lm_head" in text and "ties its output layer" in text
    assert "embed_tokens" in text and "tied" in text


def test_base_dependent_refusals_are_all_reported():
    ad = adapter({"q_proj": (4, 2.0)}, layers=(0, 5))
    ad.modules["model.layers.0.self_attn.rotary_emb"] = LoraModule("model.layers.0.self_attn.rotary_emb",
                                                                   np.zeros((4, H), np.float32), np.zeros((H, 4), np.float32), 8, 2)
    bad = ad.modules["model.layers.0.self_attn.q_proj"]
    bad.a = np.zeros((4, H + 1), np.float32)
    _, problems = plan(ad, layout("llama"))
    text = " | ".join(str(p) for p in problems)
    assert "layer 5 does not exist in the base (2 layers)" in text
    assert "rotary_emb are not supported for llama" in text and "supported targets: q_proj" in text
    assert "do not fit the base" in text
    assert len(problems) == 3


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    from edgeft.gguf_header import read_header
    import gguf

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(p, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    lay, problems = BaseLayout.from_header(read_header(p))
    assert lay is None
    assert "'mamba' is not supported" in problems[0].what
    for arch in ("llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2"):
        assert arch in problems[0].fix


def test_real_base_layout(base_path):
    from edgeft.gguf_header import read_header

    lay, problems = BaseLayout.from_header(read_header(base_path))
    assert problems == [] and lay.arch.name == "llama" and lay.n_layer == 30
    assert lay.n_head[0] == 9 and lay.n_head_kv[0] == 3 and lay.head_dim_k[0] == 64 and lay.tied_embeddings
