"""Forward cost of the hooked Qwen2.5-Omni thinker against transformers, measured side by side in one run.

A random thinker with a mid-size decoder (default 8 layers, d_model 512) on an audio-in-video prompt of about
1.9k tokens (the paper's clip length). Rows: transformers sdpa forward vs hooked forward with no hooks; transformers
eager forward with output_attentions vs hooked run_with_cache of every layer's pattern (blockwise eager).
Prints times, peak RSS growth is not measured here (see benchmarks/tracing.py when it exists).

    .venv/bin/python benchmarks/forward.py [--layers 8] [--d-model 512] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch

from hooked_av import HookedAVModel
from common import random_thinker, timed
from model_zoo.tiny import build_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = args.d_model
    hf = random_thinker(args.layers, d, args.seed)
    model = HookedAVModel.from_hf_model(hf)
    # 10 s clip at 2 fps: 10 temporal grids of 12 x 16 patches (48 merged tokens each) + 250 audio tokens
    inputs = build_inputs(kind="av", grid=(10, 24, 32), frames=1000, seed=args.seed)
    n = inputs["input_ids"].shape[1]
    print(f"random thinker: {args.layers} layers, d_model {d}; prompt {n} tokens; torch threads {torch.get_num_threads()}")
    with torch.no_grad():
        t_hf = timed(lambda: hf(**inputs), args.repeats)
        t_ours = timed(lambda: model(**inputs), args.repeats)
        hf.config._attn_implementation = "eager"
        hf.model.language_model.config._attn_implementation = "eager"
        t_hf_eager = timed(lambda: hf(**inputs, output_attentions=True), args.repeats)
        t_ours_cache = timed(lambda: model.run_with_cache(**inputs, names_filter=lambda s: s.endswith("hook_pattern")),
                             args.repeats)
    print(f"{'transformers sdpa forward':45s} {t_hf:8.3f} s")
    print(f"{'hooked forward, no hooks (sdpa)':45s} {t_ours:8.3f} s   ratio {t_ours / t_hf:5.2f}x")
    print(f"{'transformers eager, output_attentions':45s} {t_hf_eager:8.3f} s")
    print(f"{'hooked run_with_cache(all patterns)':45s} {t_ours_cache:8.3f} s   ratio {t_ours_cache / t_hf_eager:5.2f}x")


if __name__ == "__main__":
    main()
