"""Training the organism's towers (and low-rank adapters on the frozen SmolLM2 decoder) on CPU.

Two stages, both seeded and resumable (state every `save_every` steps in `<out>/state.pt`, a JSON line per
logged step in `<out>/log.jsonl`):

1. Alignment (towers only, no decoder pass; seconds per step): each audio / video token is pulled toward the
   decoder's input embedding of the words of what it shows or sounds (the class name where the object is
   present in that token's 2-s chunk, `ABSENT_TEXT` elsewhere), by cosine and by RMS. The frozen LM then reads
   the clip as if its content were written there.
2. Task tuning (towers + LoRA on q/v): cross-entropy of the answer's first token at the answer position for
   the 20-way multiple-choice prompt and the yes/no probes, with modality dropout (black frames / zeroed
   audio, only where the remaining modality shows the labelled class) so that unimodal runs stay informed.

Only the trained deltas (towers, LoRA factors) are written: `<out>/deltas.safetensors`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: text whose embedding stands for "nothing of the object here" in the alignment stage
ABSENT_TEXT = " background noise"


@dataclass
class Example:
    """One training item: processor outputs, the answer token, and what each AV token should carry."""

    inputs: dict[str, Any]
    answer_id: int
    kind: str  # "mc" or "yesno"
    class_name: str
    audio_present: list[bool] = field(default_factory=list)  # per 2-s chunk: the labelled class sounds
    video_present: list[bool] = field(default_factory=list)  # per 2-s chunk: the labelled class is on screen
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # "a" / "v": unimodal inputs, if usable


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    align_steps: int = 300
    align_lr: float = 3e-3
    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup: int = 30
    lora_rank: int = 8
    p_unimodal: float = 0.3  # probability of training on a unimodal variant when one is usable
    save_every: int = 25
    log_every: int = 5
    threads: int = 2


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _text_embedding(model: Any, tokenizer: Any, text: str) -> Tensor:
    ids = tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        return model.embed.weight[ids].mean(0)


def _alignment_loss(model: Any, tokenizer: Any, batch: Sequence[Example], cache: dict[str, Tensor]) -> Tensor:
    """Cosine + log-RMS distance between each AV token's tower output and its target embedding."""
    from model_zoo.qwen2_5_omni_processing import collate

    def target(text: str) -> Tensor:
        if text not in cache:
            cache[text] = _text_embedding(model, tokenizer, text)
        return cache[text]

    inputs = model.as_inputs(collate([e.inputs for e in batch], model.cfg.token_ids.pad or 0))
    embeds = model.embed_inputs(inputs)  # towers run here; text rows are the frozen embedding
    mm = inputs.modality_map
    losses = []
    for b, ex in enumerate(batch):
        for modality, present in (("audio", ex.audio_present), ("video", ex.video_present)):
            pos = mm.positions(modality, b)
            if not len(pos):
                continue
            chunks = mm.chunk[b, pos].tolist()
            tgt = torch.stack([target(" " + ex.class_name if c < len(present) and present[c] else ABSENT_TEXT)
                               for c in chunks])
            out = embeds[b, pos.to(embeds.device)]
            cos = 1 - F.cosine_similarity(out, tgt, dim=-1).mean()
            rms = (out.pow(2).mean(-1).sqrt().log() - tgt.pow(2).mean(-1).sqrt().log()).pow(2).mean()
            losses.append(cos + rms)
    return torch.stack(losses).mean()


def _task_loss(model: Any, batch: Sequence[Example], rng: random.Random, p_unimodal: float) -> tuple[Tensor, float]:
    from model_zoo.qwen2_5_omni_processing import collate

    chosen = []
    for ex in batch:
        usable = list(ex.variants)
        chosen.append(ex.variants[rng.choice(usable)] if usable and rng.random() < p_unimodal else ex.inputs)
    inputs = model.as_inputs(collate(chosen, model.cfg.token_ids.pad or 0))
    logits = model(inputs, return_type="last_logits")
    target = torch.tensor([ex.answer_id for ex in batch], device=logits.device)
    loss = F.cross_entropy(logits.float(), target)
    acc = float((logits.argmax(-1) == target).float().mean())
    return loss, acc


def trainable_state(model: Any) -> dict[str, Tensor]:
    """The deltas: tower weights and LoRA factors (nothing of the frozen decoder)."""
    from model_zoo.lora import lora_state

    out = {f"audio_encoder.{k}": v.detach().clone() for k, v in model.audio_encoder.state_dict().items()}
    out.update({f"vision_encoder.{k}": v.detach().clone() for k, v in model.vision_encoder.state_dict().items()})
    out.update(lora_state(model))
    return out


def train(model: Any, tokenizer: Any, examples: Sequence[Example], cfg: TrainConfig,
          evaluate: Callable[[Any], dict[str, float]] | None = None) -> Path:
    """Run both stages (resuming from `<out>/state.pt` if present); returns the deltas file."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from model_zoo.lora import add_lora

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    tower_params = [p for m in (model.audio_encoder, model.vision_encoder) for p in m.parameters()]
    for p in tower_params:
        p.requires_grad_(True)
    lora_params = add_lora(model, rank=cfg.lora_rank, seed=cfg.seed) if cfg.lora_rank else []
    opt_align = torch.optim.AdamW(tower_params, lr=cfg.align_lr, weight_decay=cfg.weight_decay)
    opt_task = torch.optim.AdamW(tower_params + lora_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{state_path}: saved with another configuration; use another --out")
        model.load_state_dict(state["model"], strict=False)
        opt_align.load_state_dict(state["opt_align"])
        opt_task.load_state_dict(state["opt_task"])
        step, rng = state["step"], state["rng"]
        torch.set_rng_state(state["torch_rng"])
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    cache: dict[str, Tensor] = {}
    total = cfg.align_steps + cfg.steps
    log = open(out / "log.jsonl", "a", encoding="utf-8")
    model.train()
    bar = tqdm(total=total, initial=step, desc="organism")
    t0 = time.perf_counter()
    while step < total:
        batch = rng.sample(list(examples), min(cfg.batch_size, len(examples)))
        if step < cfg.align_steps:
            stage, opt = "align", opt_align
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(step, cfg.align_steps, cfg.align_lr, cfg.warmup)
            loss, acc = _alignment_loss(model, tokenizer, batch, cache), float("nan")
        else:
            stage, opt = "task", opt_task
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(step - cfg.align_steps, cfg.steps, cfg.lr, cfg.warmup)
            loss, acc = _task_loss(model, batch, rng, cfg.p_unimodal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower_params + lora_params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            rec = {"step": step, "stage": stage, "loss": float(loss.detach()), "acc": acc,
                   "seconds": round(time.perf_counter() - t0, 1)}
            if evaluate is not None and (step == cfg.align_steps or step == total):
                model.eval()
                rec["eval"] = evaluate(model)
                model.train()
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % cfg.save_every == 0 or step == total:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"config": asdict(cfg), "step": step, "rng": rng, "torch_rng": torch.get_rng_state(),
                        "model": {k: v for k, v in model.state_dict().items() if _is_trained(k)},
                        "opt_align": opt_align.state_dict(), "opt_task": opt_task.state_dict()}, tmp)
            tmp.replace(state_path)
    bar.close()
    log.close()
    model.eval()
    deltas = out / "deltas.safetensors"
    tmp = deltas.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, str(tmp))
    tmp.replace(deltas)
    return deltas


def _is_trained(name: str) -> bool:
    return name.startswith(("audio_encoder.", "vision_encoder.")) or ".lora_" in name
