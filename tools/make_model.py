"""Generate a small random-weight model in the standard Hugging Face / MLX layout.

Every model type dnet runs (--arch), in float16, bfloat16 or float32, quantized to 4 or 8
bits, or with one of mlx-lm convert's mixed per-layer recipes (--quant-recipe).

Examples:
  uv run python tools/make_model.py /tmp/qwen3-tiny
  uv run python tools/make_model.py /tmp/ds --arch deepseek_v3 --dtype float32 --layers 12
  uv run python tools/make_model.py /tmp/q4 --quant-bits 4 --hidden 256
  uv run python tools/make_model.py /tmp/mixed --arch qwen3_next --quant-recipe mixed_4_6
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from dnet.modelgen import ARCHITECTURES, DTYPES, QUANT_RECIPES, ModelSpec, generate_model


def main() -> None:
    defaults = {f.name: f.default for f in fields(ModelSpec)}
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory (replaced if it exists)")
    p.add_argument("--arch", choices=ARCHITECTURES, default=defaults["arch"])
    p.add_argument("--dtype", choices=list(DTYPES), default=defaults["dtype"])
    p.add_argument("--quant-bits", type=int, choices=[4, 8], default=None)
    p.add_argument("--quant-recipe", choices=QUANT_RECIPES, default=None,
                   help="mixed bits per layer, as mlx_lm.convert --quant-predicate writes them")
    p.add_argument("--layers", type=int, default=defaults["num_layers"])
    p.add_argument("--hidden", type=int, default=defaults["hidden_size"])
    p.add_argument("--intermediate", type=int, default=defaults["intermediate_size"])
    p.add_argument("--heads", type=int, default=defaults["num_heads"])
    p.add_argument("--kv-heads", type=int, default=defaults["num_kv_heads"])
    p.add_argument("--vocab", type=int, default=defaults["vocab_size"])
    p.add_argument("--files", type=int, default=defaults["weight_files"],
                   help="number of safetensors files the layers are spread over")
    p.add_argument("--seed", type=int, default=defaults["seed"])
    args = p.parse_args()
    spec = ModelSpec(arch=args.arch, dtype=args.dtype, quant_bits=args.quant_bits,
                     quant_recipe=args.quant_recipe,
                     num_layers=args.layers, hidden_size=args.hidden,
                     intermediate_size=args.intermediate, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, vocab_size=args.vocab,
                     weight_files=args.files, seed=args.seed)
    print(generate_model(args.out, spec))


if __name__ == "__main__":
    main()
