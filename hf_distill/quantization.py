"""Students small in bytes: weight-only quantization after training, and quantization-aware distillation (torchao).

Two ways to the same exported format:

- post-training: the distilled student's saved weights are quantized as they load
  (`from_pretrained(..., quantization_config=TorchAoConfig(...))`) and saved again; transformers records the
  scheme in `config.json`, so `from_pretrained` and `pipeline()` load the quantized student as is.
- quantization-aware: `prepare_qat` swaps the student's linear layers for torchao's fake-quantized ones, so it
  trains (here: distills from the full-precision teacher) seeing the rounding it will ship with; `remove_qat`
  swaps them back before export. The fake quantization is the one the post-training step applies, so
  exporting a QAT student the same way gives exactly the weights it trained against.

The input embeddings and the output head stay in full precision (transformers' TorchAoConfig default).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

QUANTIZATION_SCHEMES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32


def check_scheme(name: str, value: str) -> None:
    if value not in QUANTIZATION_SCHEMES:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(QUANTIZATION_SCHEMES)} (weight-only).")


def _torchao():
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise ImportError("Quantization uses torchao: pip install torchao") from None
    return quantization


def weight_config(scheme: str):
    """torchao's weight-only config for `scheme`: int8 per output channel, int4 per group of 32, both symmetric.

    (int4 uses torchao's CPU-portable layout, one byte per weight on disk; packed int4 needs a CUDA kernel.)
    """
    quantization = _torchao()
    if scheme == "int8":
        return quantization.Int8WeightOnlyConfig()
    if scheme == "int4":
        return quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=quantization.PerGroup(INT4_GROUP_SIZE))
    raise ValueError(f"No weight config for scheme {scheme!r}.")


def _fake_quantize_config(scheme: str):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    if scheme == "int8":
        return IntxFakeQuantizeConfig(torch.int8, granularity="per_channel", is_symmetric=True)
    return IntxFakeQuantizeConfig(torch.int4, group_size=INT4_GROUP_SIZE, is_symmetric=True)


def _inner_linears(model: nn.Module):
    """A filter for the linear layers that get quantized: all but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return lambda module, fqn: isinstance(module, nn.Linear) and module is not head


def prepare_qat(model: nn.Module, scheme: str) -> nn.Module:
    """Make `model`'s linear layers (not the head) fake-quantize their weights in training; parameters are kept."""
    from torchao.quantization.qat import QATConfig

    _torchao().quantize_(model, QATConfig(weight_config=_fake_quantize_config(scheme), step="prepare"),
                         filter_fn=_inner_linears(model))
    return model


def has_qat(model: nn.Module) -> bool:
    return any(type(module).__name__ == "FakeQuantizedLinear" for module in model.modules())


def remove_qat(model: nn.Module) -> nn.Module:
    """Swap the fake-quantized layers back to plain ones (same parameters), for export or evaluation in float."""
    from torchao.quantization.qat import QATConfig

    _torchao().quantize_(model, QATConfig(step="convert"))  # the default filter visits every linear layer
    return model


def save_quantized(model_dir: str, output_dir: str, scheme: str, kind: str | None = None) -> str:
    """Quantize the model saved in `model_dir` with `scheme` and save it (and its tokenizer) to `output_dir`."""
    from transformers import AutoTokenizer, TorchAoConfig

    from .modeling import load_model

    if os.path.abspath(model_dir) == os.path.abspath(output_dir):
        raise ValueError(f"save_quantized would overwrite the float model in {model_dir}; give another output_dir.")
    model = load_model(model_dir, kind=kind, quantization_config=TorchAoConfig(weight_config(scheme)))
    model.save_pretrained(output_dir)
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(output_dir)
    except (OSError, ValueError):
        pass  # a model folder without a tokenizer
    return output_dir


def quantize_in_place(model_dir: str, scheme: str, kind: str | None = None) -> str:
    """Replace the float model saved in `model_dir` by its `scheme` quantization (written aside, then swapped in)."""
    staging = model_dir.rstrip("/\\") + f".{scheme}-partial"
    save_quantized(model_dir, staging, scheme, kind)
    for name in os.listdir(model_dir):
        if name.startswith("model") and name.endswith((".safetensors", ".bin", ".safetensors.index.json")):
            os.remove(os.path.join(model_dir, name))
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(model_dir, name))
    os.rmdir(staging)
    return model_dir


def folder_bytes(path: str) -> int:
    """Bytes of the weight files in a saved model folder."""
    return sum(
        os.path.getsize(os.path.join(path, name))
        for name in os.listdir(path)
        if name.endswith((".safetensors", ".bin", ".pt"))
    )
