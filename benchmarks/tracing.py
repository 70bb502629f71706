"""Cost of one sample of the IE study, measured side by side in one run.

A random thinker (default 8 layers, d_model 512) on a ~2.2k-token audio-in-video prompt; the patch restores the
clean ln1 output (official `before_attn`) at every layer for each of S subsets (default 13: all + 4 kinds x N in
{2, 3, 4}, like one sample of the paper's table). Rows:
- official-style: one full forward of the corrupted inputs per subset (towers included), batch of one;
- hooked-av: towers once, the decoder on 1 or `batch_size` patched copies per pass (`patching.patched_probs`;
  1 is its CPU default, 8 its GPU default). Only the answer position is unembedded.
And the MDS of sinks: all attention maps cached (run_with_cache of every hook_pattern, what reading
`output_attentions` amounts to) vs the streamed accumulation (`roles.modality_attention`), with the bytes the
attention maps occupy in each (computed from the shapes: the streamed path holds one query block of one layer).

    .venv/bin/python benchmarks/tracing.py [--layers 8] [--d-model 512] [--subsets 13] [--batch-size 8]
"""

from __future__ import annotations

import argparse

import torch

from hooked_av import HookedAVModel, SinkConstants
from hooked_av.recipes import patching, roles, scoring
from common import random_thinker, timed
from model_zoo.tiny import build_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--subsets", type=int, default=13)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = args.d_model
    hf = random_thinker(args.layers, d, args.seed)
    model = HookedAVModel.from_hf_model(hf, sinks=SinkConstants(dims=(1, 2), tau=2.0))
    raw = build_inputs(kind="av", grid=(10, 24, 32), frames=1000, seed=args.seed)
    silent = dict(raw, input_features=torch.zeros_like(raw["input_features"]))
    clean, corrupt = model.prepare_inputs(**raw), model.prepare_inputs(**silent)
    mm = clean.modality_map
    video = mm.positions("video").tolist()
    gen = torch.Generator().manual_seed(args.seed)
    subsets = [video] + [sorted(video[j] for j in torch.randperm(len(video), generator=gen)[: len(video) // (2 + i % 3)])
                         for i in range(args.subsets - 1)]
    answers = {"clean": scoring.AnswerCandidates("A", (10,)), "corrupt": scoring.AnswerCandidates("B", (11,))}
    n, L, H = clean.input_ids.shape[1], model.cfg.n_layers, model.cfg.n_heads
    print(f"random thinker: {L} layers, d_model {d}; prompt {n} tokens ({len(video)} video); {len(subsets)} subsets; "
          f"torch threads {torch.get_num_threads()}")

    with torch.no_grad():
        acts = patching.capture(model, clean, video)

        def one_by_one():
            out = []
            for s in subsets:
                with patching.restored(model, acts, [s]):
                    out.append(scoring.score(model, corrupt, answers)["clean"])
            return torch.cat(out)

        def batched(size):
            return lambda: patching.patched_probs(model, acts, corrupt, subsets, answers, batch_size=size)["clean"]

        torch.testing.assert_close(batched(args.batch_size)(), one_by_one(), rtol=1e-4, atol=1e-6)
        t_one = timed(one_by_one, args.repeats)
        t_single = timed(batched(1), args.repeats)
        t_batch = timed(batched(args.batch_size), args.repeats)

        sinks = video[::5] + mm.positions("audio").tolist()[::5]

        def cached():
            _, cache = model.run_with_cache(clean, names_filter=lambda s: s.endswith("hook_pattern"))
            return cache

        t_cached = timed(cached, args.repeats)
        t_stream = timed(lambda: roles.modality_attention(model, clean, sinks), args.repeats)
    rows = model.blocks[0].attn.block_rows(1, n, n)
    full_bytes = L * H * n * n * 4
    block_bytes = H * rows * n * 4
    print(f"{'patching, one full forward per subset':48s} {t_one:8.3f} s")
    print(f"{'patching, towers once, one copy per pass':48s} {t_single:8.3f} s   speed-up {t_one / t_single:5.2f}x")
    print(f"{f'patching, towers once, {args.batch_size} copies per pass':48s} {t_batch:8.3f} s   "
          f"speed-up {t_one / t_batch:5.2f}x")
    print(f"{'MDS, every attention map cached':48s} {t_cached:8.3f} s   maps {full_bytes / 2**20:8.1f} MiB")
    print(f"{'MDS, streamed over query blocks':48s} {t_stream:8.3f} s   maps {block_bytes / 2**20:8.1f} MiB "
          f"(one {rows}-row block)   time ratio {t_stream / t_cached:5.2f}x, memory ratio "
          f"{full_bytes / block_bytes:6.1f}x less")


if __name__ == "__main__":
    main()
