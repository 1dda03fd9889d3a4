"""Workstation side of edgeft: turn trained PEFT LoRA adapters into device artifacts.

    from edgeft.convert import convert_adapter
    result = convert_adapter("runs/ner/adapter", base="smollm2-135m", name="ner")

Stages, one module each: `peft` (read + validate the PEFT folder), `names` (PEFT modules ->
GGUF tensors of the base, q/k rotary permutation, fused projections), `lora_gguf` (fold scales,
write the adapter GGUF), `bundle` (the whole conversion into an adapter bundle folder),
`verify` (PEFT vs llama.cpp parity), `merge`, `quantize`, `bench`.

The conversion imports no torch: safetensors are read with numpy and the GGUF is written with
`gguf`. torch, transformers and peft are imported lazily, only by `verify` (and for `.bin`
adapters).
"""

from __future__ import annotations

__all__ = ["convert_adapter", "ConvertResult", "read_peft", "PeftAdapter"]


def __getattr__(name: str):
    if name in ("convert_adapter", "ConvertResult"):
        from . import bundle

        return getattr(bundle, name)
    if name in ("read_peft", "PeftAdapter"):
        from . import peft

        return getattr(peft, name)
    raise AttributeError(f"module 'edgeft.convert' has no attribute {name!r}")
