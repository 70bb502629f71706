"""Training the organism's towers (and low-rank adapters on the frozen SmolLM2 decoder) on CPU.

Two stages, both seeded and resumable (state every `save_every` steps in `<out>/state.pt`, a JSON line per
logged step in `<out>/log.jsonl`):

1. Alignment (towers only, no decoder pass; a fraction of a second per step): each audio / video token is
   classified against the decoder's input embeddings of the 20 class names plus `ABSENT_TEXT` (cosine logits at
   `temperature`, cross-entropy), its target being what that token's 2-s chunk actually sounds or shows
   (`audio_classes` / `video_classes`), and its RMS is pulled to the target embedding's. The towers become
   classifiers whose outputs live where the LM reads words.
2. Task tuning (LoRA on the attention projections of blocks `lora_from` and up; towers and lower blocks frozen):
   cross-entropy of the answer's first token at the answer position for the 20-way multiple-choice prompt and
   the yes/no probes, with modality dropout (a unimodal variant, only where the remaining modality shows the
   labelled class) so that unimodal runs stay informed. The frozen part of the network is a fixed function of
   each item, so its output (the residual stream entering block `lora_from`) is computed once per item and
   variant and kept in memory: a step runs only the upper blocks, forward and backward.

Only the trained deltas (towers, LoRA factors) are written: `<out>/deltas.safetensors`.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hooked_av.files import atomic_write

#: text whose embedding stands for "nothing of a class here" in the alignment stage
ABSENT_TEXT = " background noise"
#: the towers by modality: the model attribute of each
TOWERS = {"audio": "audio_encoder", "video": "vision_encoder"}


def field_defaults(cls: type) -> dict[str, Any]:
    """The default of each field of a dataclass that has one (default factories called)."""
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)
            if f.default is not MISSING or f.default_factory is not MISSING}


def condition_keys(condition: str) -> set[str]:
    """What a `TrainConfig.condition_weights` key may name of a generator condition: the condition itself and
    each of its sides ("audio_clean+video_confusable" -> it, "audio_clean", "video_confusable")."""
    return {condition, *condition.split("+")}


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
    #: per 2-s chunk, the class that chunk actually sounds / shows ("" for none); default: `class_name` where
    #: the *_present flag is set
    audio_classes: list[str] = field(default_factory=list)
    video_classes: list[str] = field(default_factory=list)
    #: per video token (processor order), the class whose picture covers its cell ("" for background); when set,
    #: it replaces the per-chunk video target: a token is aligned to what it shows, as the paper's object tokens
    video_token_classes: list[str] = field(default_factory=list)
    #: per 2-s chunk, whether what the chunk sounds is faint (a distractor well under the nominal level): with
    #: `TrainConfig.faint_absent` its tokens are aligned partly to ABSENT, so the towers keep how strong a sound is
    audio_faint: list[bool] = field(default_factory=list)
    sample_id: str = ""
    #: the generator's condition of the clip (`analyses.avsynth.CONDITIONS`, e.g. "audio_clean+video_confusable");
    #: what `TrainConfig.condition_weights` matches ("" when unknown)
    condition: str = ""

    def token_classes(self, modality: str, chunks: Sequence[int]) -> list[str]:
        """The alignment target of each of this modality's tokens, given each token's chunk index."""
        if modality == "video" and self.video_token_classes:
            if len(self.video_token_classes) != len(chunks):
                raise ValueError(f"example {self.sample_id!r}: {len(self.video_token_classes)} video token targets "
                                 f"for {len(chunks)} video tokens")
            return list(self.video_token_classes)
        per_chunk = self.chunk_classes(modality)
        return [per_chunk[c] if c < len(per_chunk) else "" for c in chunks]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # example caches pickled before a field existed load with that field's default
        self.__dict__.update({**field_defaults(type(self)), **state})

    def token_faint(self, modality: str, chunks: Sequence[int]) -> list[bool]:
        """Whether each of this modality's tokens (given its chunk index) carries a faint sound (never video)."""
        faint = self.audio_faint if modality == "audio" else []
        return [c < len(faint) and faint[c] for c in chunks]

    def chunk_classes(self, modality: str) -> list[str]:
        given = self.audio_classes if modality == "audio" else self.video_classes
        if given:
            return given
        present = self.audio_present if modality == "audio" else self.video_present
        return [self.class_name if p else "" for p in present]


@dataclass
class LookupItem:
    """A text sequence of the lookup mixture: processor-style inputs (input_ids, attention_mask of [1, pos]) and
    the supervised (position, next-token id) pairs."""

    inputs: dict[str, Any]
    targets: list[tuple[int, int]]


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    align_steps: int = 300
    align_lr: float = 3e-3
    align_batch_size: int = 16
    temperature: float = 0.07
    absent_weight: float = 0.25  # cross-entropy weight of "nothing here" tokens (most video tokens are background)
    #: share of the alignment target given to ABSENT for the audio tokens of faint chunks (`Example.audio_faint`):
    #: 0 aligns a faint distractor exactly like the clip's own sound, which leaves the decoder no way to tell a
    #: faint distractor over silence from a loud class sound; 0.5 places it between the class and "nothing"
    faint_absent: float = 0.0
    #: alignment-stage photometric augmentation of the video tower's input: per clip and colour channel, the
    #: normalised pixels become (1 + c) x + b with c, b ~ U(-video_jitter, video_jitter) (0: none); the tower
    #: then cannot key on a clip's exact colours, which 1,200 clips otherwise let it memorise
    video_jitter: float = 0.0
    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup: int = 30
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_from: int = 0  # first decoder block with adapters; the blocks below are frozen and run once per item
    p_unimodal: float = 0.3  # probability of training on a unimodal variant when one is usable
    #: task-stage sampling weight of the multiple-choice clips whose class never sounds (a distractor may): they
    #: teach the joint run to read the picture when the sound misleads (1.0: uniform sampling)
    silent_weight: float = 1.0
    #: task-stage sampling weights by condition (multiple-choice clips): a key is a whole condition
    #: ("audio_clean+video_confusable") or one side of it ("video_confusable", "audio_absent"), and a clip weighs
    #: the product of the keys it matches (and `silent_weight` where it applies); the conditions where the joint
    #: run must discount one modality (a look-alike glyph, a faint distractor sound) can so be drawn more often
    condition_weights: dict[str, float] = field(default_factory=dict)
    #: scaffold for the permuted letter lookup (multiple-choice items only; nothing of it is saved in the deltas):
    #: linear probes on the residual entering block `aux_layer` at each option's name tokens, one telling the
    #: clip's option from the others and one reading the option's own letter (weight `aux_weight`), and, at the
    #: answer position of each block in `attn_layers`, the attention mass of its best head on the right option's
    #: name tokens (weight `attn_weight`)
    aux_layer: int | None = None
    aux_weight: float = 0.0
    attn_layers: tuple[int, ...] = ()
    attn_weight: float = 0.0
    #: text lookups mixed into the task stage (weight `lookup_weight`, `lookup_batch` sequences per step, drawn
    #: from the `lookup` pool given to `train`): the options once, then several "class -> letter" turns, every
    #: letter supervised. They teach the copy of the named option's letter densely; the clips teach finding it.
    lookup_weight: float = 0.0
    lookup_batch: int = 4
    lookup_pool: int = 0  # the pool's size (recorded so that a resumed run checks it has the same pool)
    #: scaffold for the clips' first hop (multiple-choice items): a linear probe on the residual entering block
    #: `class_layer` at the answer position reads the clip's class (independent of the option order), and at
    #: each block in `gather_layers` the best head's attention mass from the answer position on the AV tokens
    #: that carry the class is pulled up (weights `class_weight`, `gather_weight`)
    class_layer: int | None = None
    class_weight: float = 0.0
    gather_layers: tuple[int, ...] = ()
    gather_weight: float = 0.0
    #: the text lookups' answers get the same class probe and option-attention terms as the clips, so that one
    #: circuit serves both
    lookup_scaffold: bool = False
    bf16: bool = False  # the task stage under bfloat16 autocast (2-4x faster steps on CPUs with AMX)
    #: warm start: a deltas file (`trainable_state` of an earlier run) loaded into the towers and adapters before
    #: training; its towers are final, so `align_steps` must be 0, and the task stage starts a fresh cosine
    #: schedule, optimiser and scaffold probes from its adapters (the deltas keep no optimiser state)
    init_deltas: str | None = None
    #: with `init_deltas`: towers ("audio", "video") not loaded from it but kept at their seeded random init (of
    #: the model's size, which may differ from the deltas') and aligned for `align_steps` before the task stage;
    #: the other tower and the adapters come from the deltas, so the task stage re-fits warm adapters to new tokens
    fresh_towers: tuple[str, ...] = ()
    save_every: int = 25
    log_every: int = 5
    threads: int = 2

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        self.attn_layers = tuple(self.attn_layers)
        self.gather_layers = tuple(self.gather_layers)
        self.fresh_towers = tuple(self.fresh_towers)
        self.condition_weights = dict(self.condition_weights)


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _text_embedding(model: Any, tokenizer: Any, text: str) -> Tensor:
    ids = tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        return model.embed.weight[ids].mean(0)


def class_table(model: Any, tokenizer: Any, examples: Sequence[Example]) -> tuple[list[str], Tensor]:
    """The alignment's classes (ABSENT first, then every class named by the examples, sorted) and their
    target embeddings [n_classes, d_model]."""
    names = sorted({c for ex in examples for m in ("audio", "video") for c in ex.chunk_classes(m) if c}
                   | {c for ex in examples for c in ex.video_token_classes if c} | {ex.class_name for ex in examples})
    texts = [ABSENT_TEXT] + [" " + n for n in names]
    return [""] + names, torch.stack([_text_embedding(model, tokenizer, t) for t in texts])


def jitter_video(inputs: dict[str, Any], strength: float, generator: torch.Generator | None = None
                 ) -> dict[str, Any]:
    """A copy of one clip's processed inputs whose video patches get a random per-channel contrast and
    brightness change ((1 + c) x + b, c and b ~ U(-strength, strength), one draw per channel for the whole
    clip). The patch rows are channel-major (channel, temporal, row, column), as the processor writes them."""
    rows = inputs.get("pixel_values_videos")
    if rows is None or strength <= 0:
        return inputs
    n, d = rows.shape
    c, b = (torch.rand(2, 1, 3, 1, generator=generator) * 2 - 1) * strength
    return {**inputs, "pixel_values_videos": (rows.view(n, 3, d // 3) * (1 + c) + b).view(n, d).to(rows.dtype)}


def _alignment_loss(model: Any, batch: Sequence[Example], classes: list[str], table: Tensor,
                    temperature: float, absent_weight: float = 1.0, faint_absent: float = 0.0,
                    video_jitter: float = 0.0, modalities: Sequence[str] = ("audio", "video")
                    ) -> tuple[Tensor, float]:
    """Cosine-logit cross-entropy of every AV token against the class table, plus a log-RMS match. With
    `faint_absent` > 0, a faint audio token's target is the mixture (1 - faint_absent) class + faint_absent
    ABSENT (a class-weighted soft cross-entropy); the accuracy counts its class. `video_jitter` > 0 augments
    each clip's video (`jitter_video`). Only the tokens of `modalities` enter the loss."""
    from model_zoo.qwen2_5_omni_processing import collate

    index = {c: i for i, c in enumerate(classes)}
    items = [jitter_video(e.inputs, video_jitter) for e in batch]
    inputs = model.as_inputs(collate(items, model.cfg.token_ids.pad or 0))
    embeds = model.embed_inputs(inputs)  # towers run here; text rows are the frozen embedding
    mm = inputs.modality_map
    outs, targets, faint = [], [], []
    for b, ex in enumerate(batch):
        for modality in modalities:
            pos = mm.positions(modality, b)
            if not len(pos):
                continue
            chunks = mm.chunk[b, pos].tolist()
            targets.append(torch.tensor([index[c] for c in ex.token_classes(modality, chunks)]))
            faint.append(torch.tensor(ex.token_faint(modality, chunks), dtype=torch.bool))
            outs.append(embeds[b, pos.to(embeds.device)])
    out, target = torch.cat(outs), torch.cat(targets).to(embeds.device)
    logits = F.normalize(out, dim=-1) @ F.normalize(table, dim=-1).T / temperature
    weight = torch.ones(len(classes), device=logits.device)
    weight[0] = absent_weight  # classes[0] is ABSENT
    soft = torch.cat(faint).to(embeds.device) & (target != 0)
    if faint_absent > 0 and soft.any():
        probs = F.one_hot(target, len(classes)).to(logits.dtype)
        probs[soft] *= 1 - faint_absent
        probs[soft, 0] += faint_absent
        per_token = -(probs * logits.log_softmax(-1)).sum(-1)
        token_weight = probs @ weight
        ce = (token_weight * per_token).sum() / token_weight.sum()
    else:
        ce = F.cross_entropy(logits, target, weight=weight)
    rms = (out.pow(2).mean(-1).sqrt().log() - table[target].pow(2).mean(-1).sqrt().log()).pow(2).mean()
    return ce + rms, float((logits.argmax(-1) == target).float().mean())


@dataclass
class _Prefix:
    """The frozen part's output for one item: the residual entering block `lora_from`, and its positions."""

    resid: Tensor  # [pos, d_model]
    position_ids: Tensor  # [rows, pos]


@torch.no_grad()
def prefix_states(model: Any, items: Sequence[dict[str, Any]], lora_from: int, batch_size: int = 8,
                  store_dtype: torch.dtype = torch.bfloat16, desc: str = "frozen prefix") -> list[_Prefix]:
    """Run embed + towers + blocks[:lora_from] once per item (batched, padding stripped); the states are kept in
    `store_dtype` (bfloat16 halves the memory of a training set's states)."""
    from tqdm.auto import tqdm

    from hooked_av.components import AttentionMask
    from model_zoo.qwen2_5_omni_processing import collate

    out = []
    for i in tqdm(range(0, len(items), batch_size), desc=desc, leave=False):
        inputs = model.as_inputs(collate(list(items[i:i + batch_size]), model.cfg.token_ids.pad or 0))
        resid = model.hook_embed(model.embed_inputs(inputs))
        mask = AttentionMask(inputs.attention_mask, n_query=resid.shape[1])
        rotary = model.rotary(inputs.position_ids, resid.dtype)
        for block in model.blocks[:lora_from]:
            resid = block(resid, rotary, mask, None)
        for b in range(resid.shape[0]):
            valid = inputs.attention_mask[b].bool()
            out.append(_Prefix(resid[b, valid].to(store_dtype).clone(),
                               inputs.position_ids[:, b, valid].clone()))
    return out


def prefix_last_logits(model: Any, prefixes: Sequence[_Prefix], lora_from: int) -> Tensor:
    """Blocks[lora_from:] + final norm + unembedding of each item's last position, from stored prefixes
    (right-padded: under the causal mask no real position sees the padding)."""
    return prefix_forward(model, prefixes, lora_from)[0]


def prefix_forward(model: Any, prefixes: Sequence[_Prefix], lora_from: int, aux_layer: int | None = None,
                   attn_layers: Sequence[int] = (), at: Sequence[Sequence[int]] | None = None,
                   resid_layers: Sequence[int] = ()) -> tuple[Tensor, dict[str, Any]]:
    """`prefix_last_logits`, also returning what the lookup scaffold reads: `resid` (the right-padded residual
    entering block `aux_layer`, [batch, pos, d_model]), `resids` ({layer: the same for each of `resid_layers`}),
    `rows` (each item's length) and `qk_full` ({layer: (rotated queries [batch, pos, head, d_head], rotated keys
    [batch, pos, kv_head, d_head])} for each of `attn_layers`).
    With `at` (positions per item), the logits are those of these positions, concatenated item after item."""
    from hooked_av.components import AttentionMask

    n = max(p.resid.shape[0] for p in prefixes)
    dtype = model.embed.weight.dtype
    resid = torch.zeros(len(prefixes), n, prefixes[0].resid.shape[-1], dtype=dtype)
    rows = prefixes[0].position_ids.shape[0]
    position_ids = torch.zeros(rows, len(prefixes), n, dtype=torch.long)
    valid = torch.zeros(len(prefixes), n, dtype=torch.bool)
    for b, p in enumerate(prefixes):
        t = p.resid.shape[0]
        resid[b, :t] = p.resid.to(dtype)
        position_ids[:, b, :t] = p.position_ids
        valid[b, :t] = True
    mask = AttentionMask(valid.long(), n_query=n)
    rotary = model.rotary(position_ids, dtype)
    last = torch.tensor([p.resid.shape[0] - 1 for p in prefixes])
    batch = torch.arange(len(prefixes))
    extra: dict[str, Any] = {"rows": last + 1, "qk_full": {}, "resids": {}}
    captured: dict[tuple[int, str], Tensor] = {}

    def capture(layer: int, kind: str):
        def hook(x: Tensor, hook: Any) -> None:
            captured[(layer, kind)] = x
        return hook

    fwd_hooks = [(f"blocks.{layer}.attn.hook_rot_{kind}", capture(layer, kind))
                 for layer in attn_layers for kind in ("q", "k")]
    with model.hooks(fwd_hooks=fwd_hooks):
        for i, block in enumerate(model.blocks[lora_from:], start=lora_from):
            if i == aux_layer:
                extra["resid"] = resid
            if i in resid_layers:
                extra["resids"][i] = resid
            resid = block(resid, rotary, mask, None)
    for layer in attn_layers:
        extra["qk_full"][layer] = (captured[(layer, "q")], captured[(layer, "k")])
    if at is not None:
        rows_at = torch.tensor([b for b, pos in enumerate(at) for _ in pos], dtype=torch.long)
        cols_at = torch.tensor([p for pos in at for p in pos], dtype=torch.long)
        return model.unembed(model.ln_final(resid[rows_at, cols_at])), extra
    return model.unembed(model.ln_final(resid[batch, last])), extra


#: the multiple-choice option letters, in order
LETTERS = "ABCDEFGHIJKLMNOPQRST"
_OPTION = re.compile(r"\n([A-T])\. ([^\n]+)")


def option_layout(input_ids: Sequence[int], tokenizer: Any) -> list[tuple[int, int, int]]:
    """Where the prompt lists its options: (letter index, first, last + 1 token position of the option's name)
    per option line (a newline, a letter A-T, ". ", the name), in prompt order."""
    pieces = [tokenizer.decode([int(t)]) for t in input_ids]
    starts, text = [], ""
    for piece in pieces:
        starts.append(len(text))
        text += piece
    out = []
    for m in _OPTION.finditer(text):
        first = bisect.bisect_right(starts, m.start(2)) - 1
        end = bisect.bisect_left(starts, m.end(2))
        out.append((LETTERS.index(m.group(1)), first, end))
    return out


def head_log_mass(q: Tensor, keys: Tensor, span: Tensor, n_rep: int) -> Tensor:
    """log of each head's attention mass on the keys in `span` at one query: q [head, d_head] and keys [pos,
    kv_head, d_head] rotated (the keys this query sees), span a bool mask over these keys; returns [head]."""
    keys = keys.float()[:, torch.arange(q.shape[0]) // n_rep]
    scores = torch.einsum("hd,phd->hp", q.float(), keys) * q.shape[-1] ** -0.5
    return torch.logsumexp(scores[:, span], -1) - torch.logsumexp(scores, -1)


@dataclass
class QueryTarget:
    """What the first-hop scaffold asks of one query position (row `row` of the batch, position `pos`): the class
    its residual should carry (`class_index`), the keys its attention should gather (`gather`, bool over
    positions 0..pos) and the option name span it should attend (`option`, (first, end))."""

    row: int
    pos: int
    class_index: int | None = None
    gather: Tensor | None = None
    option: tuple[int, int] | None = None


def query_losses(model: Any, extra: dict[str, Any], targets: Sequence[QueryTarget], heads: Any,
                 class_layer: int | None, gather_layers: Sequence[int], option_layers: Sequence[int]
                 ) -> dict[str, Tensor]:
    """Mean over the targets that ask for it of: `class`, the cross-entropy of `heads.cls` on the residual
    entering `class_layer`; `gather`, -log of the best head's mass on the gather keys, averaged over
    `gather_layers`; `option`, the same on the option span over `option_layers` (what `extra` captured)."""
    zero = model.embed.weight.new_zeros(()).float()
    sums = {"class": zero, "gather": zero, "option": zero}
    counts = dict.fromkeys(sums, 0)
    n_rep = model.cfg.n_rep

    def mean_best(layers: Sequence[int], t: QueryTarget, span: Tensor) -> Tensor:
        out = zero
        for layer in layers:
            q, k = extra["qk_full"][layer]
            out = out - head_log_mass(q[t.row, t.pos], k[t.row, : t.pos + 1], span, n_rep).max()
        return out / len(layers)

    for t in targets:
        if t.class_index is not None and class_layer is not None:
            h = extra["resids"][class_layer][t.row, t.pos].float()
            sums["class"] = sums["class"] + F.cross_entropy(heads.cls(h), torch.tensor(t.class_index))
            counts["class"] += 1
        if t.gather is not None and t.gather.any() and gather_layers:
            sums["gather"] = sums["gather"] + mean_best(gather_layers, t, t.gather)
            counts["gather"] += 1
        if t.option is not None and option_layers:
            span = torch.zeros(t.pos + 1, dtype=torch.bool)
            span[t.option[0]:t.option[1]] = True
            sums["option"] = sums["option"] + mean_best(option_layers, t, span)
            counts["option"] += 1
    return {k: v / max(counts[k], 1) for k, v in sums.items()}


def scaffold_losses(model: Any, extra: dict[str, Any], layouts: Sequence[list[tuple[int, int, int]] | None],
                    answers: Sequence[int | None], heads: Any, layers: Sequence[int] | None = None
                    ) -> tuple[Tensor, Tensor]:
    """The lookup scaffold's two losses for a batch (zero where no item is multiple choice).

    probe: at each option's last name token of the residual entering `aux_layer`, `heads.match` scores the
    options (cross-entropy over the options, the clip's option the target) and `heads.letter` reads each
    option's letter (cross-entropy over the 20 letters).
    attention: at the answer position of each captured block (of `layers`, default all), -log of the best
    head's attention mass on the clip's option's name tokens (`query_losses`' option term)."""
    zero = model.embed.weight.new_zeros(())
    probe, n = zero, 0
    options = []
    for b, (layout, answer) in enumerate(zip(layouts, answers)):
        if not layout or answer is None:
            continue
        n += 1
        target = next(k for k, (letter, _, _) in enumerate(layout) if letter == answer)
        if "resid" in extra:
            ends = torch.tensor([e - 1 for _, _, e in layout])
            h = extra["resid"][b, ends].float()
            probe = probe + F.cross_entropy(heads.match(h).squeeze(-1), torch.tensor(target)) + F.cross_entropy(
                heads.letter(h), torch.tensor([letter for letter, _, _ in layout]))
        options.append(QueryTarget(b, int(extra["rows"][b]) - 1, option=layout[target][1:]))
    captured = [layer for layer in extra["qk_full"] if layers is None or layer in layers]
    attn = query_losses(model, extra, options, heads, None, (), captured)["option"] if captured else zero
    return probe / max(n, 1), attn


class ScaffoldHeads(torch.nn.Module):
    """The lookup scaffold's linear probes (trained alongside the adapters, never saved in the deltas)."""

    def __init__(self, d_model: int, n_letters: int = len(LETTERS), n_classes: int = 0):
        super().__init__()
        self.match = torch.nn.Linear(d_model, 1)
        self.letter = torch.nn.Linear(d_model, n_letters)
        self.cls = torch.nn.Linear(d_model, n_classes) if n_classes else None


def trainable_state(model: Any) -> dict[str, Tensor]:
    """The deltas: tower weights and LoRA factors (nothing of the frozen decoder)."""
    from model_zoo.lora import lora_state

    out = {f"{name}.{k}": v.detach().clone() for name in TOWERS.values()
           for k, v in getattr(model, name).state_dict().items()}
    out.update(lora_state(model))
    return out


def train(model: Any, tokenizer: Any, examples: Sequence[Example], cfg: TrainConfig,
          evaluate: Callable[[Any], dict[str, float]] | None = None,
          evaluate_towers: Callable[[Any], dict[str, float]] | None = None,
          lookup: Sequence[LookupItem] = ()) -> Path:
    """Run both stages (resuming from `<out>/state.pt` if present); returns the deltas file. `evaluate(model)`
    is logged at the end, `evaluate_towers(model)` at the end of the alignment stage; `lookup` is the pool of
    text lookups mixed into the task stage when `cfg.lookup_weight` > 0 (`cfg.lookup_pool` must be its size)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from model_zoo.lora import add_lora

    if not 0 <= cfg.lora_from < len(model.blocks):
        raise ValueError(f"lora_from must be in [0, {len(model.blocks) - 1}], got {cfg.lora_from}")
    if not 0 <= cfg.faint_absent < 1:
        raise ValueError(f"faint_absent must be in [0, 1), got {cfg.faint_absent}")
    if not 0 <= cfg.video_jitter < 1:
        raise ValueError(f"video_jitter must be in [0, 1), got {cfg.video_jitter}")
    if cfg.faint_absent > 0 and not any(any(ex.audio_faint) for ex in examples):
        raise ValueError("faint_absent > 0 but no example marks a faint chunk (Example.audio_faint); examples "
                         "cached before that field existed must be rebuilt")
    if cfg.condition_weights:
        mc = [ex for ex in examples if ex.kind == "mc"]
        unrecorded = [ex.sample_id for ex in mc if not ex.condition]
        if unrecorded:
            raise ValueError(f"condition_weights given but {len(unrecorded)} multiple-choice example(s) record no "
                             f"condition (e.g. {unrecorded[0]!r}); examples cached before that field existed must "
                             "be rebuilt")
        seen = set().union(*(condition_keys(ex.condition) for ex in mc))
        unmatched = sorted(set(cfg.condition_weights) - seen)
        if unmatched:
            raise ValueError(f"condition_weights: {unmatched} match no multiple-choice example's condition; "
                             f"the examples' are {sorted({ex.condition for ex in mc})}")
        check_sampling_weights(cfg.silent_weight, cfg.condition_weights)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    unknown = sorted(set(cfg.fresh_towers) - set(TOWERS))
    if unknown:
        raise ValueError(f"fresh_towers: unknown tower(s) {unknown}; expected some of {sorted(TOWERS)}")
    if cfg.fresh_towers and (cfg.init_deltas is None or not cfg.align_steps):
        raise ValueError("fresh_towers replaces towers of a warm start: it needs init_deltas and align_steps > 0, "
                         f"got init_deltas={cfg.init_deltas!r}, align_steps={cfg.align_steps}")
    aligned = cfg.fresh_towers or tuple(TOWERS)
    tower_params = [p for m in aligned for p in getattr(model, TOWERS[m]).parameters()]
    for p in tower_params:
        p.requires_grad_(True)
    lora_params = []
    if cfg.lora_rank:
        lora_params = add_lora(model, targets=cfg.lora_targets, rank=cfg.lora_rank, seed=cfg.seed,
                               layers=range(cfg.lora_from, len(model.blocks)))
    opt_align = torch.optim.AdamW(tower_params, lr=cfg.align_lr, weight_decay=cfg.weight_decay)
    opt_task = torch.optim.AdamW(lora_params, lr=cfg.lr, weight_decay=cfg.weight_decay) if lora_params else None
    scaffold = cfg.aux_weight > 0 or cfg.attn_weight > 0
    any_scaffold = scaffold or cfg.class_weight > 0 or cfg.gather_weight > 0
    if any_scaffold and (cfg.aux_layer is None and cfg.aux_weight > 0 or not cfg.lora_rank
                         or cfg.class_layer is None and cfg.class_weight > 0):
        raise ValueError("the lookup scaffold needs adapters (lora_rank > 0) and, for the probes, aux_layer / "
                         "class_layer")
    probed = [*([cfg.aux_layer] if cfg.aux_weight > 0 else []), *([cfg.class_layer] if cfg.class_weight > 0 else [])]
    used = [*(cfg.attn_layers if cfg.attn_weight > 0 else ()), *(cfg.gather_layers if cfg.gather_weight > 0 else ()),
            *probed]
    if any_scaffold and not all(cfg.lora_from <= x < len(model.blocks) for x in used):
        raise ValueError(f"aux_layer, class_layer, attn_layers and gather_layers must lie in "
                         f"[lora_from={cfg.lora_from}, {len(model.blocks)})")
    if cfg.lookup_weight > 0 and (not lookup or len(lookup) != cfg.lookup_pool):
        raise ValueError(f"lookup_weight > 0 needs the pool of text lookups: lookup_pool={cfg.lookup_pool}, "
                         f"got {len(lookup)} item(s)")
    if cfg.init_deltas is not None:
        if cfg.align_steps and not cfg.fresh_towers:
            raise ValueError(f"init_deltas starts from aligned towers: align_steps must be 0 (or name fresh_towers), "
                             f"got {cfg.align_steps}")
        load_deltas(model, cfg.init_deltas, skip=tuple(f"{TOWERS[m]}." for m in cfg.fresh_towers))
    classes, table = class_table(model, tokenizer, examples)
    heads = ScaffoldHeads(model.cfg.d_model, n_classes=len(classes) if cfg.class_weight > 0 else 0)
    opt_heads = torch.optim.AdamW(heads.parameters(), lr=cfg.lr)
    layouts: dict[int, tuple[list[tuple[int, int, int]], int] | None] = {}
    step = 0
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        _check_resumable(state_path, state["config"], asdict(cfg), state["step"])
        model.load_state_dict(state["model"], strict=False)
        opt_align.load_state_dict(state["opt_align"])
        if opt_task is not None:
            opt_task.load_state_dict(state["opt_task"])
        if state.get("heads") is not None and state["step"] > state["config"]["align_steps"]:
            heads.load_state_dict(state["heads"])
            opt_heads.load_state_dict(state["opt_heads"])
        step, rng = state["step"], state["rng"]
        torch.set_rng_state(state["torch_rng"])
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    class_index = {c: i for i, c in enumerate(classes)}
    first_hop = cfg.class_weight > 0 or cfg.gather_weight > 0
    query_cache: dict[Any, Any] = {}  # per clip variant / text lookup: what the first-hop scaffold asks
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
    option_layers = cfg.attn_layers if cfg.attn_weight > 0 else ()
    gather_layers = cfg.gather_layers if cfg.gather_weight > 0 else ()
    class_layer = cfg.class_layer if cfg.class_weight > 0 else None
    class_layers = [class_layer] if class_layer is not None else []
    total = cfg.align_steps + (cfg.steps if opt_task is not None else 0)
    log_path = out / "log.jsonl"
    if log_path.exists():  # a killed run logged steps after its last save: they are run again, so drop them
        kept = [line for line in log_path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.endswith("\n") and json.loads(line).get("step", 0) <= step]
        log_path.write_text("".join(kept), encoding="utf-8")
    log = open(log_path, "a", encoding="utf-8")
    model.train()
    bar = tqdm(total=total, initial=step, desc="organism")
    t0 = time.perf_counter()
    prefixes: dict[tuple[Any, Any], _Prefix] | None = None  # frozen-prefix states, computed on first use
    while step < total:
        if step < cfg.align_steps:
            stage, opt = "align", opt_align
            batch = rng.sample(list(examples), min(cfg.align_batch_size, len(examples)))
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(step, cfg.align_steps, cfg.align_lr, cfg.warmup)
            loss, acc = _alignment_loss(model, batch, classes, table, cfg.temperature, cfg.absent_weight,
                                         cfg.faint_absent, cfg.video_jitter, aligned)
            params = tower_params
        else:
            stage, opt, params = "task", opt_task, lora_params
            if prefixes is None:  # towers are final from here on
                for p in tower_params:
                    p.requires_grad_(False)
                prefixes = {}
            idx = task_batch(rng, examples, cfg.batch_size, cfg.silent_weight, cfg.condition_weights)
            keys = []
            for i in idx:
                usable = sorted(examples[i].variants)
                keys.append((i, rng.choice(usable) if usable and rng.random() < cfg.p_unimodal else "av"))
            with autocast:
                chosen = _prefixes(model, keys, prefixes, cfg.lora_from, lambda k: examples[k[0]].inputs
                                   if k[1] == "av" else examples[k[0]].variants[k[1]])
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(step - cfg.align_steps, cfg.steps, cfg.lr, cfg.warmup)
            with autocast:
                logits, extra = prefix_forward(model, chosen, cfg.lora_from,
                                               aux_layer=cfg.aux_layer if cfg.aux_weight > 0 else None,
                                               attn_layers=sorted({*option_layers, *gather_layers}),
                                               resid_layers=class_layers)
            target = torch.tensor([examples[i].answer_id for i in idx])
            loss = F.cross_entropy(logits.float(), target)
            acc = float((logits.argmax(-1) == target).float().mean())
            parts = {"answer": float(loss.detach())}
            if scaffold:
                for i in idx:
                    if i not in layouts:
                        layouts[i] = _lookup_target(examples[i], tokenizer)
                probe, attn = scaffold_losses(model, extra, [layouts[i] and layouts[i][0] for i in idx],
                                              [layouts[i] and layouts[i][1] for i in idx], heads,
                                              layers=option_layers)
                parts.update(probe=float(probe.detach()), attn=float(attn.detach()))
                loss = loss + cfg.aux_weight * probe + cfg.attn_weight * attn
            if first_hop:
                targets = []
                for row, key in enumerate(keys):
                    if key not in query_cache:
                        query_cache[key] = _clip_query(model, examples[key[0]], key[1], class_index)
                    if query_cache[key] is not None:
                        targets.append(QueryTarget(row, len(chosen[row].resid) - 1, *query_cache[key]))
                hop = query_losses(model, extra, targets, heads, class_layer, gather_layers, ())
                parts.update({k: float(hop[k].detach()) for k in ("class", "gather")})
                loss = loss + cfg.class_weight * hop["class"] + cfg.gather_weight * hop["gather"]
            if cfg.lookup_weight > 0:
                picked = rng.sample(range(len(lookup)), min(cfg.lookup_batch, len(lookup)))
                with autocast:
                    texts = _prefixes(model, [("lookup", j) for j in picked], prefixes, cfg.lora_from,
                                      lambda k: lookup[k[1]].inputs)
                    text_logits, text_extra = prefix_forward(
                        model, texts, cfg.lora_from, at=[[p for p, _ in lookup[j].targets] for j in picked],
                        attn_layers=option_layers if cfg.lookup_scaffold else (),
                        resid_layers=class_layers if cfg.lookup_scaffold else ())
                text_target = torch.tensor([t for j in picked for _, t in lookup[j].targets])
                text_loss = F.cross_entropy(text_logits.float(), text_target)
                parts.update(lookup=float(text_loss.detach()),
                             lookup_acc=float((text_logits.argmax(-1) == text_target).float().mean()))
                if cfg.lookup_scaffold:
                    targets = []
                    for row, j in enumerate(picked):
                        if ("lookup", j) not in query_cache:
                            query_cache[("lookup", j)] = _text_queries(lookup[j], tokenizer, class_index)
                        targets += [QueryTarget(row, *t) for t in query_cache[("lookup", j)]]
                    hop = query_losses(model, text_extra, targets, heads, class_layer, (), option_layers)
                    parts.update(lookup_class=float(hop["class"].detach()), lookup_attn=float(hop["option"].detach()))
                    text_loss = text_loss + cfg.class_weight * hop["class"] + cfg.attn_weight * hop["option"]
                loss = loss + cfg.lookup_weight * text_loss
        opt.zero_grad(set_to_none=True)
        opt_heads.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if stage == "task" and (scaffold or first_hop):
            opt_heads.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            rec = {"step": step, "stage": stage, "loss": float(loss.detach()), "acc": acc,
                   "seconds": round(time.perf_counter() - t0, 1)}
            if stage == "task" and len(parts) > 1:
                rec["parts"] = parts
            for fn, due in ((evaluate_towers, step == cfg.align_steps), (evaluate, step == total)):
                if fn is not None and due:
                    model.eval()
                    rec.setdefault("eval", {}).update(fn(model))
                    model.train()
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % cfg.save_every == 0 or step == total:
            state = {"config": asdict(cfg), "step": step, "rng": rng, "torch_rng": torch.get_rng_state(),
                     "model": {k: v for k, v in model.state_dict().items() if _is_trained(k)},
                     "opt_align": opt_align.state_dict(),
                     "opt_task": opt_task.state_dict() if opt_task is not None else None,
                     "heads": heads.state_dict(), "opt_heads": opt_heads.state_dict()}
            atomic_write(state_path, lambda tmp: torch.save(state, tmp))
    bar.close()
    log.close()
    model.eval()
    deltas = out / "deltas.safetensors"
    atomic_write(deltas, lambda tmp: save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, tmp,
                                               metadata=deltas_metadata(model)))
    return deltas


def sampling_weight(example: Example, silent_weight: float = 1.0,
                    condition_weights: dict[str, float] | None = None) -> float:
    """A task-stage item's sampling weight: 1 for yes/no probes; for a multiple-choice clip, `silent_weight` if
    its class never sounds, times the weight of each key of `condition_weights` that is its condition or one
    side of it (see `TrainConfig.condition_weights`)."""
    if example.kind != "mc":
        return 1.0
    w = silent_weight if example.audio_present and not any(example.audio_present) else 1.0
    if condition_weights:
        if not example.condition:
            raise ValueError(f"example {example.sample_id!r}: no condition recorded, so condition weights "
                             f"{sorted(condition_weights)} cannot apply (rebuild its example cache)")
        keys = condition_keys(example.condition)
        for key, value in condition_weights.items():
            if key in keys:
                w *= value
    return w


def check_sampling_weights(silent_weight: float, condition_weights: dict[str, float]) -> None:
    """Raise unless every task-stage sampling weight is > 0."""
    if not silent_weight > 0:
        raise ValueError(f"silent_weight must be > 0, got {silent_weight}")
    for key, value in condition_weights.items():
        if not value > 0:
            raise ValueError(f"condition weight {key!r} must be > 0, got {value}")


def task_batch(rng: random.Random, examples: Sequence[Example], batch_size: int, silent_weight: float = 1.0,
               condition_weights: dict[str, float] | None = None) -> list[int]:
    """Indices of one task-stage batch, without replacement: uniform (`rng.sample`, the recipe's stream) when
    every weight is 1, else weighted by `sampling_weight` (Efraimidis-Spirakis keys u^(1/w))."""
    k = min(batch_size, len(examples))
    condition_weights = condition_weights or {}
    check_sampling_weights(silent_weight, condition_weights)
    if silent_weight == 1.0 and all(v == 1.0 for v in condition_weights.values()):
        return rng.sample(range(len(examples)), k)
    weights = [sampling_weight(e, silent_weight, condition_weights) for e in examples]
    keys = [rng.random() ** (1.0 / w) for w in weights]
    return sorted(range(len(examples)), key=keys.__getitem__, reverse=True)[:k]


def _lookup_target(example: Example, tokenizer: Any) -> tuple[list[tuple[int, int, int]], int] | None:
    """A multiple-choice item's option layout and answer letter index (None for other items)."""
    if example.kind != "mc":
        return None
    ids = example.inputs["input_ids"].reshape(-1).tolist()
    letter = tokenizer.decode([example.answer_id]).strip()
    layout = option_layout(ids, tokenizer)
    if letter not in LETTERS or sorted(x for x, _, _ in layout) != list(range(len(layout))) or not layout:
        raise ValueError(f"example {example.sample_id!r}: cannot find its options and answer {letter!r} in the prompt")
    return layout, LETTERS.index(letter)


def _clip_query(model: Any, example: Example, variant: str, class_index: dict[str, int]
                ) -> tuple[int, int | None, Tensor | None] | None:
    """A multiple-choice clip's first-hop targets for `variant` ("av", "a", "v"): its class index and the AV
    tokens that carry its class (only the kept modality's for a unimodal variant); None for other items."""
    if example.kind != "mc" or example.class_name not in class_index:
        return None
    inputs = example.inputs if variant == "av" else example.variants[variant]
    mm = model.modality_map(**inputs)
    span = torch.zeros(int(inputs["input_ids"].shape[-1]), dtype=torch.bool)
    for modality in {"av": ("audio", "video"), "a": ("audio",), "v": ("video",)}[variant]:
        pos = mm.positions(modality, 0).cpu()
        if len(pos):
            classes = example.token_classes(modality, mm.chunk[0, pos].tolist())
            span[pos[torch.tensor([c == example.class_name for c in classes])]] = True
    return class_index[example.class_name], span if span.any() else None, None


def _text_queries(item: LookupItem, tokenizer: Any, class_index: dict[str, int]
                  ) -> list[tuple[int, int | None, None, tuple[int, int]]]:
    """A text lookup's first-hop targets per supervised answer: (position, asked class index, no gather, the
    asked option's name span)."""
    ids = item.inputs["input_ids"].reshape(-1).tolist()
    layout = option_layout(ids[: item.targets[0][0] + 1], tokenizer)
    by_letter = {letter: (first, end) for letter, first, end in layout}
    out = []
    for pos, token in item.targets:
        letter = tokenizer.decode([token]).strip()
        if letter not in LETTERS or LETTERS.index(letter) not in by_letter:
            raise ValueError(f"text lookup: answer {letter!r} at position {pos} names no option of its prompt")
        first, end = by_letter[LETTERS.index(letter)]
        name = tokenizer.decode(ids[first:end]).strip().lstrip(". ")
        out.append((pos, class_index.get(name), None, (first, end)))
    return out


def _prefixes(model: Any, keys: Sequence[tuple[Any, Any]], store: dict[tuple[Any, Any], _Prefix], lora_from: int,
              inputs_of: Callable[[tuple[Any, Any]], dict[str, Any]]) -> list[_Prefix]:
    """The frozen-prefix states of the items named by `keys` (`inputs_of(key)` gives an item's inputs), computing
    the missing ones (batched)."""
    missing = list(dict.fromkeys(k for k in keys if k not in store))
    if missing:
        was_training = model.training
        model.eval()
        items = [inputs_of(k) for k in missing]
        store.update(zip(missing, prefix_states(model, items, lora_from, batch_size=len(items))))
        model.train(was_training)
    return [store[k] for k in keys]


@torch.no_grad()
def tower_accuracy(model: Any, tokenizer: Any, examples: Sequence[Example], train_examples: Sequence[Example],
                   temperature: float = 0.07, batch_size: int = 16) -> dict[str, float]:
    """How well the clip's content reaches the LM's embedding space, per modality: the share of tokens whose
    nearest class embedding (cosine) is their alignment target, over tokens that carry a class
    (`tower_acc_<m>`) and over tokens that carry nothing (`tower_absent_acc_<m>`); for the audio tokens of faint
    chunks, the share whose nearest class other than ABSENT is theirs (`tower_faint_acc_audio`)."""
    from model_zoo.qwen2_5_omni_processing import collate

    classes, table = class_table(model, tokenizer, train_examples)
    index = {c: i for i, c in enumerate(classes)}
    hits = {(m, kind): [0, 0] for m in ("audio", "video") for kind in ("", "absent_")}
    hits[("audio", "faint_")] = [0, 0]
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        inputs = model.as_inputs(collate([e.inputs for e in batch], model.cfg.token_ids.pad or 0))
        embeds = model.embed_inputs(inputs)
        mm = inputs.modality_map
        for b, ex in enumerate(batch):
            for modality in ("audio", "video"):
                pos = mm.positions(modality, b)
                chunks = mm.chunk[b, pos].tolist()
                targets = ex.token_classes(modality, chunks)
                faint = ex.token_faint(modality, chunks)
                sims = F.normalize(embeds[b, pos], dim=-1) @ F.normalize(table, dim=-1).T
                pred, pred_class = sims.argmax(-1).tolist(), (sims[:, 1:].argmax(-1) + 1).tolist()
                for p, pc, t, f in zip(pred, pred_class, targets, faint):
                    if t in index:
                        kind = "absent_" if t == "" else "faint_" if f else ""
                        h = hits[(modality, kind)]
                        h[0] += int((pc if kind == "faint_" else p) == index[t])
                        h[1] += 1
    # faint tokens are reported only where the examples mark some (older example caches do not)
    return {f"tower_{kind}acc_{m}": h / max(n, 1) for (m, kind), (h, n) in hits.items() if n or kind != "faint_"}


def deltas_metadata(model: Any) -> dict[str, str]:
    """The safetensors metadata of a deltas file: the vision tower's overrides of the organism's defaults, so that
    `model_zoo.organism.assemble` builds the tower the deltas were trained on."""
    from model_zoo.organism import DELTAS_VISION_KEY, vision_overrides

    return {"format": "pt", DELTAS_VISION_KEY: json.dumps(vision_overrides(model.vision_encoder.config))}


def load_deltas(model: Any, path: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Load a deltas file (towers and LoRA factors, as `train` writes it) into `model`, whose adapters must
    already be in place with the same blocks, targets, rank and scale; anything that does not match is named.
    Entries whose names start with one of `skip` (e.g. "vision_encoder.") are left out on both sides: that part
    of the model keeps its weights, whatever its size in the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_deltas: no deltas file at {path}")
    stored = {k: v for k, v in load_file(str(path)).items() if not k.startswith(skip)}
    expected = {k: v for k, v in trainable_state(model).items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: the deltas do not fit this model's towers and adapters (lora_rank, lora_from, "
                         f"lora_targets, vision depth): missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    bad = [f"{k}: stored {tuple(stored[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
           if stored[k].shape != v.shape]
    bad += [f"{k}: stored {float(stored[k]):g}, model {float(v):g}" for k, v in expected.items()
            if k.endswith(".scale") and stored[k].shape == v.shape and not torch.equal(stored[k], v)]
    if bad:
        raise ValueError(f"{path}: the deltas do not fit this model: {'; '.join(bad[:3])}")
    weights = {k: v for k, v in stored.items() if not k.endswith(".scale")}
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: entries the model has no parameter for: {result.unexpected_keys[:3]}")


#: settings that may change when a run is resumed: more task steps extend it (the cosine schedule is recomputed
#: over the new total, a warm restart), the log cadence and the thread count do not change what is computed
EXTENSIBLE = ("steps", "save_every", "log_every", "threads")
#: settings of the task stage alone: they may change while a resumed run has not begun that stage
TASK_STAGE = ("lr", "batch_size", "p_unimodal", "silent_weight", "condition_weights", "aux_layer", "aux_weight",
              "attn_layers", "attn_weight", "lookup_weight", "lookup_batch", "lookup_pool", "class_layer",
              "class_weight", "gather_layers", "gather_weight", "lookup_scaffold", "bf16")


def _check_resumable(path: Path, saved: dict[str, Any], now: dict[str, Any], step: int = 0) -> None:
    """Raise unless a run saved with `saved` at `step` may go on with `now`."""
    # a setting added after the run was saved counts as its default there
    saved = {**{k: v for k, v in field_defaults(TrainConfig).items() if k not in saved}, **saved}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    free = EXTENSIBLE + (TASK_STAGE if step <= saved.get("align_steps", 0) else ())
    fixed = [k for k in diff if k not in free]
    if fixed:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in fixed)
        raise ValueError(f"{path}: saved with another configuration ({detail}); use another --out")
    if now["steps"] < saved["steps"]:
        raise ValueError(f"{path}: saved for {saved['steps']} task steps; a resumed run may extend it, not shorten "
                         f"it (got steps={now['steps']})")


def remaining_horizons(horizons: Sequence[int], out: str | Path) -> list[int]:
    """The task-stage horizons still to run for a staged schedule (train to the first, then extend to each next
    one: a warm restart of the cosine schedule each time). A run saved in `out` for H task steps has every horizon
    below H behind it; if none is left, H itself (a rerun resumes at the end and adds no step)."""
    horizons = [int(h) for h in horizons]
    if not horizons or horizons[0] < 0 or any(b <= a for a, b in zip(horizons, horizons[1:])):
        raise ValueError(f"horizons must be >= 0 and strictly increasing, got {horizons}")
    state = Path(out) / "state.pt"
    if not state.exists():
        return horizons
    saved = int(torch.load(state, weights_only=False)["config"]["steps"])
    return [h for h in horizons if h >= saved] or [saved]


def _is_trained(name: str) -> bool:
    return name.startswith(tuple(f"{t}." for t in TOWERS.values())) or ".lora_" in name
