"""Can the organism's backbone do the permuted 20-way letter lookup when the answer is given as text?

The official prompt lists 20 options in a per-sample order and asks for the letter; a model must find the clip's
class among them and copy its letter. This experiment removes the audio and video: "The clip: <class>." is written
before the official question. It reports the zero-shot accuracy of the base organism's language model on held-out
prompts, then trains LoRA adapters on blocks >= --lora-from on text sequences that carry the options once and then
--turns (class -> letter) exchanges, every letter supervised, evaluating single-question held-out prompts every
--eval-every steps (the answer of turn --eval-turn). With --distinct the classes of a sequence's turns differ, so a turn cannot copy an earlier
answer. Seeded; prints one line per evaluation (step, accuracy, seconds) and writes them as JSON to --out.

    .venv/bin/python scripts/letter_lookup.py [--lora-from 18] [--steps 100] [--turns 12] [--distinct]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
LETTERS = "ABCDEFGHIJKLMNOPQRST"
EVAL_SEED = 123


def main() -> None:
    from analyses.avsynth import CLASS_NAMES
    from analyses.runtime import load_runtime
    from hooked_av.components import AttentionMask
    from model_zoo.lora import add_lora
    from train_organism import lookup_sequence

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", default=str(ROOT / ".assets" / "organism"))
    ap.add_argument("--lora-from", type=int, default=18)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--distinct", action="store_true")
    ap.add_argument("--eval-prompts", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-turn", type=int, default=1,
                    help="evaluate the answer of turn K of K-turn held-out sequences (distinct classes); 1: the "
                         "official single-question prompt, with the class written before the options")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "letter_lookup.json"))
    args = ap.parse_args()
    if not 1 <= args.turns <= len(CLASS_NAMES):
        sys.exit(f"--turns must be in [1, {len(CLASS_NAMES)}], got {args.turns}")
    torch.manual_seed(args.seed)
    rt = load_runtime(args.organism, seed=args.seed)
    tok, model = rt.tokenizer, rt.model
    letter_ids = [tok.encode(x, add_special_tokens=False)[0] for x in LETTERS]

    def final_states(batch: list[list[int]]) -> torch.Tensor:
        n = max(map(len, batch))
        ids = torch.tensor([x + [0] * (n - len(x)) for x in batch])
        valid = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in batch])
        rows = model.cfg.mrope_section and 3 or 1
        rotary = model.rotary(torch.arange(n)[None, None].expand(rows, len(batch), n), model.dtype)
        mask = AttentionMask(valid, n_query=n)
        with torch.no_grad():  # the frozen blocks below the adapters
            resid = model.embed(ids)
            for block in model.blocks[:args.lora_from]:
                resid = block(resid, rotary, mask, None)
        for block in model.blocks[args.lora_from:]:
            resid = block(resid, rotary, mask, None)
        return model.ln_final(resid)

    @torch.no_grad()
    def evaluate() -> float:
        rng = random.Random(EVAL_SEED)
        items = []
        for _ in range(args.eval_prompts):
            ids, sup = lookup_sequence(tok, rng, args.eval_turn)
            items.append((ids, sup[-1:]))
        hits = 0
        for i in range(0, len(items), args.batch_size):
            chunk = items[i:i + args.batch_size]
            states = final_states([x for x, _ in chunk])
            for b, (_, sup) in enumerate(chunk):
                pos, target = sup[0]
                hits += int(model.unembed(states[b, pos])[letter_ids].argmax()) == target
        return hits / len(items)

    for p in model.parameters():
        p.requires_grad_(False)
    params = add_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj"), rank=args.rank, seed=args.seed,
                      layers=range(args.lora_from, model.cfg.n_layers))
    opt = torch.optim.AdamW(params, lr=args.lr)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    log = [{"step": 0, "eval_acc": evaluate(), "seconds": 0.0}]
    print(json.dumps(log[-1]), flush=True)
    from tqdm.auto import tqdm

    for step in tqdm(range(1, args.steps + 1), desc="lookup"):
        items = [lookup_sequence(tok, rng, args.turns, args.distinct) for _ in range(args.batch_size)]
        states = final_states([x for x, _ in items])
        picked = torch.stack([states[b, pos] for b, (_, sup) in enumerate(items) for pos, _ in sup])
        target = torch.tensor([letter_ids[t] for _, sup in items for _, t in sup])
        loss = F.cross_entropy(model.unembed(picked), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            log.append({"step": step, "train_loss": round(float(loss.detach()), 4), "eval_acc": evaluate(),
                        "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "chance": 1 / len(LETTERS), "log": log}, indent=2) + "\n")


if __name__ == "__main__":
    main()
