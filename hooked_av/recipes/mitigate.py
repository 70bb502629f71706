"""Hallucination mitigation at decoding time, generic over the uniform hook names (any `HookedAVModel`).

Four methods share one interface (`Method`): `scores(model, sample)` gives the method's next-token log-probabilities
at the answer position (teacher-forced yes/no or letter scoring), `generate(model, sample, ...)` decodes greedily
with KV caches and reports the cost per generated token (`DecodeCost`).

- `Plain`: the model as is.
- `Amplify`: attention amplification of a token set (`recipes.amplify`, the PAI rule a <- a + alpha|a| on the
  pre-softmax scores) with alpha, layers, query rows and optionally heads chosen from sink-role statistics
  (`HeadRule`, `select_heads`). Token sets (`TOKEN_SETS`): the sample's cross-modal sinks, all its audio/video
  global sinks, its unimodal sinks, or a seeded random control of non-sink audio/video tokens of the same count
  and modality mix as the cross-modal sinks (`random_av_tokens`).
- `Contrastive`: AVCD-style contrastive decoding (VCD's rule on an audio-visual input):
  (1 + beta) * logits(full) - beta * logits(input lacking one modality), restricted to the plausible tokens
  {y : p_full(y) >= plausibility * max p_full} (the adaptive plausibility constraint of VCD), the rest -inf.
  The inputs lacking a modality come from `hooked_av.corrupt` (zeroed waveform, black frames) and are passed in
  `MitigationSample.negatives`; "both" averages the two negative logits.
- `Guidance`: the official adaptive two-cache guidance of crossmodal-hub (`GuidanceLogits`, METHOD.md §11.3),
  made runnable (see `Guidance` for the formulas and the discrepancies resolved).

Sink sets come from `find_sink_sets`: global sinks (METHOD.md §4) split by MDS into unimodal and cross-modal ones
for each modality (§5), named as the official guidance code: `av` = audio sinks read by video (cross-modal),
`va` = video sinks read by audio (cross-modal), `aa`, `vv` = unimodal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .. import hook_names
from ..inputs import Modality, ModalityMap
from . import amplify, roles, sinks

# ------------------------------------------------------------------------------------------------- constants
#: official GuidanceLogits constructor defaults and the deleted runner's CLI (METHOD.md §1, §11.3)
OFFICIAL_GUIDANCE_STRENGTH = 0.5  # --guidance_strength: the "base" of t = min(clamp, base * w)
OFFICIAL_ADAPTIVE_THRESHOLD = 0.6  # w below it: t *= (w / 0.6)^2
OFFICIAL_TEXT_MASS_THRESHOLD = 0.4  # text mass above it: cosine ramp-down of t
OFFICIAL_TEXT_MASS_RAMP = 0.2  # ... reaching 0 at text mass 0.4 + 0.2
OFFICIAL_MOMENTUM = 0.5  # s = 0.5 s_prev + 0.5 t
OFFICIAL_STRENGTH_CLAMP = 0.6  # t = min(0.6, base * w)
OFFICIAL_TARGET_LAYERS = (18, 26)  # range(18, 26) of the 28-layer Qwen2.5-Omni-7B thinker
OFFICIAL_N_LAYERS = 28
OFFICIAL_GUIDANCE_K_DIVIDE = 3  # --k_divide 3 of the deleted infer_adpative_guidance.py
#: the denominator guard of w = cross / (cross + uni + eps) in GuidanceLogits
SHARE_EPS = 1e-8
#: VCD (Leng et al., CVPR 2024; DAMO-NLP-SG/VCD vcd_sample.py): cd_beta = 0.1 is the plausibility cutoff
#: (PAI's CFG uses the same log 0.1 cut, METHOD.md §12); cd_alpha = 1 is the contrast weight of its POPE scripts
VCD_PLAUSIBILITY = 0.1
VCD_BETA = 1.0
#: head selection: VAR's "image-centric head" rule (METHOD.md §12) needs attention >= summ = 0.2 on the image;
#: we ask the same mass of the cross-modal sinks, with the cross-modal share >= the official adaptive threshold
VAR_MIN_MASS = 0.2

TOKEN_SETS: tuple[str, ...] = ("cross_modal", "sinks", "unimodal", "random")
TokenSet = Literal["cross_modal", "sinks", "unimodal", "random"]
DROPS: tuple[str, ...] = ("audio", "video", "both")
FIRST_STEPS: tuple[str, ...] = ("official", "adaptive")
GRANULARITIES: tuple[str, ...] = ("head", "layer")


# ------------------------------------------------------------------------------------------------- sink sets
@dataclass(frozen=True)
class SinkSets:
    """One sample's audio/video global sinks by role (prompt positions, ascending).

    av: audio sinks read relatively more by video queries (cross-modal); va: video sinks read relatively more by
    audio queries (cross-modal); aa, vv: the unimodal ones. Named as the official GuidanceLogits' sink_data (first
    letter: the sink's modality, second: the modality reading it).
    """

    av: tuple[int, ...]
    va: tuple[int, ...]
    aa: tuple[int, ...]
    vv: tuple[int, ...]
    k_divide: int | None = None
    rule: str = "official"

    @property
    def cross_modal(self) -> list[int]:
        return sorted(self.av + self.va)

    @property
    def unimodal(self) -> list[int]:
        return sorted(self.aa + self.vv)

    @property
    def all(self) -> list[int]:
        return sorted(self.av + self.va + self.aa + self.vv)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SinkSets":
        return cls(*(tuple(int(p) for p in d[k]) for k in ("av", "va", "aa", "vv")),
                   k_divide=d.get("k_divide"), rule=d.get("rule", "official"))


def _one_sample(av: Any, what: str) -> None:
    if av.input_ids.shape[0] != 1:
        raise ValueError(f"{what} works on one sample at a time (its sink positions), got a batch of "
                         f"{av.input_ids.shape[0]}")


def find_sink_sets(
    model: Any,
    inputs: Any,
    k_divide: int = OFFICIAL_GUIDANCE_K_DIVIDE,
    rule: roles.SplitRule = "official",
) -> SinkSets:
    """The sample's global sinks (K = int(T / k_divide)) split per modality into unimodal and cross-modal ones.

    Video sinks are split as the non-dominant modality of an audio-dominant sample (sorted by layer-mean MDS,
    the most video-read half unimodal), audio sinks as that of a video-dominant one; `rule="threshold"` uses the
    sign of the mean MDS instead of the median split. Two forward passes (sink values, attention roles).
    """
    av = model.as_inputs(inputs)
    _one_sample(av, "find_sink_sets")
    is_sink = sinks.layer_sinks(sinks.sink_values(model, av)[:, 0], model.cfg.sinks.tau)
    g = sinks.global_sinks(is_sink, av.modality_map, k_divide=k_divide)
    if not g.video and not g.audio:
        return SinkSets((), (), (), (), k_divide, rule)
    r = roles.modality_attention(model, av, g.video + g.audio)
    vv, va = roles.split_roles(r, dominant="audio", rule=rule)
    aa, av_ = roles.split_roles(r, dominant="video", rule=rule)
    return SinkSets(*(tuple(sorted(x)) for x in (av_, va, aa, vv)), k_divide=k_divide, rule=rule)


def random_av_tokens(
    modality_map: ModalityMap, like: Sequence[int], exclude: Sequence[int], seed: int, batch: int = 0
) -> list[int]:
    """A seeded random control for `like`: audio/video tokens outside `exclude`, as many audio and as many video
    tokens as `like` has (topped up from the other modality when one has too few candidates)."""
    rng = np.random.default_rng(seed)
    mod = modality_map.modality[batch].tolist()
    banned = set(map(int, exclude))
    picked: list[int] = []
    leftover: list[int] = []
    for m in (Modality.AUDIO, Modality.VIDEO):
        want = sum(mod[p] == m for p in like)
        cands = [p for p in modality_map.positions(m, batch).tolist() if p not in banned]
        take = [int(p) for p in rng.choice(cands, size=min(want, len(cands)), replace=False)] if want else []
        picked += take
        leftover += sorted(set(cands) - set(take))
    short = len(like) - len(picked)
    if short > len(leftover):
        raise ValueError(f"only {len(picked) + len(leftover)} audio/video tokens are outside the excluded set; "
                         f"cannot draw {len(like)}")
    if short > 0:
        picked += [int(p) for p in rng.choice(leftover, size=short, replace=False)]
    return sorted(picked)


def token_set(kind: TokenSet, sink_sets: SinkSets, modality_map: ModalityMap, seed: int = 0) -> list[int]:
    """The positions a method amplifies: "cross_modal", "sinks" (all audio/video global sinks), "unimodal", or
    "random" (non-sink audio/video tokens matching the cross-modal sinks' count and modality mix, seeded)."""
    if kind == "cross_modal":
        return sink_sets.cross_modal
    if kind == "sinks":
        return sink_sets.all
    if kind == "unimodal":
        return sink_sets.unimodal
    if kind == "random":
        return random_av_tokens(modality_map, sink_sets.cross_modal, sink_sets.all, seed)
    raise ValueError(f"token set must be one of {TOKEN_SETS}, got {kind!r}")


# ------------------------------------------------------------------------------------- head statistics
@dataclass
class HeadStats:
    """Per layer and head: mean over the chosen queries of the attention mass on the cross-modal sinks and on the
    unimodal sinks (one prefill pass over one sample)."""

    layers: list[int]
    cross: Float[Tensor, "layer head"]
    uni: Float[Tensor, "layer head"]
    n_queries: int

    @property
    def share(self) -> Float[Tensor, "layer head"]:
        """Cross-modal share of the sink mass, cross / (cross + uni + eps), as the official w."""
        return self.cross / (self.cross + self.uni + SHARE_EPS)


def head_sink_mass(
    model: Any,
    inputs: Any,
    sink_sets: SinkSets,
    queries: amplify.QueryRows = "text",
    layers: Sequence[int] | None = None,
) -> HeadStats:
    """Attention mass of the amplified queries (`queries`, as in `amplify.query_starts`) on the cross-modal and
    unimodal sinks, per layer and head, streamed over attention blocks (no map is kept)."""
    av = model.as_inputs(inputs)
    _one_sample(av, "head_sink_mass")
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    mm = av.modality_map
    start = amplify.query_starts(mm, queries)[0]
    last = amplify.query_starts(mm, "last")[0]
    device = model.device
    cross_idx = torch.tensor(sink_sets.cross_modal, dtype=torch.long, device=device)
    uni_idx = torch.tensor(sink_sets.unimodal, dtype=torch.long, device=device)
    index = {layer: i for i, layer in enumerate(layers)}
    cross = torch.zeros(len(layers), model.cfg.n_heads, dtype=torch.float64, device=device)
    uni = torch.zeros_like(cross)

    def keep(pattern: Tensor, hook: Any) -> None:
        rows: slice = hook.query_slice
        q = torch.arange(rows.start, rows.stop, device=pattern.device)
        chosen = (q >= start) & (q <= last)
        if not bool(chosen.any()):
            return
        p = pattern[0][:, chosen].double()  # [head, query, key]
        i = index[hook.layer()]
        cross[i] += p[..., cross_idx].sum((-1, -2))
        uni[i] += p[..., uni_idx].sum((-1, -2))

    with torch.no_grad():
        model.run_with_hooks(av, return_type="none", fwd_hooks=[(hook_names.pattern(layer), keep) for layer in layers])
    n = max(0, last - start + 1)
    return HeadStats(layers, (cross / max(n, 1)).float().cpu(), (uni / max(n, 1)).float().cpu(), n)


@dataclass(frozen=True)
class HeadRule:
    """Which heads (or layers) to amplify, from `HeadStats`.

    granularity "head": a head is chosen when the amplified queries put at least `min_mass` of their attention on
    the cross-modal sinks and the cross-modal share of their sink mass is at least `min_share`; "layer": the same
    test on the head-mean masses of each layer, choosing every head of a passing layer. With `top_k`, the `top_k`
    heads (layers) with the largest cross-modal mass among those passing the share test are chosen instead of
    applying `min_mass`. Defaults: VAR's summ = 0.2 and the official adaptive threshold 0.6.
    """

    min_mass: float = VAR_MIN_MASS
    min_share: float = OFFICIAL_ADAPTIVE_THRESHOLD
    granularity: Literal["head", "layer"] = "head"
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass(frozen=True)
class HeadSelection:
    """The chosen layers and, per chosen layer, heads (None: every head of that layer)."""

    heads: dict[int, list[int] | None]

    @property
    def layers(self) -> list[int]:
        return sorted(self.heads)

    def head_map(self) -> dict[int, list[int]]:
        """For `amplify.amplify_hooks`: only the layers restricted to some heads."""
        return {layer: hs for layer, hs in self.heads.items() if hs is not None}

    def to_dict(self) -> dict[str, Any]:
        return {str(k): v for k, v in sorted(self.heads.items())}


def _pick(mass: Tensor, passes_share: Tensor, rule: HeadRule) -> Tensor:
    """Boolean mask of the chosen entries of `mass` (any shape) under `rule`."""
    if rule.top_k is None:
        return passes_share & (mass >= rule.min_mass)
    ranked = torch.where(passes_share, mass, torch.full_like(mass, -math.inf)).flatten()
    k = min(rule.top_k, int(passes_share.sum()))
    chosen = torch.zeros_like(ranked, dtype=torch.bool)
    chosen[torch.topk(ranked, k).indices] = True
    return chosen.view_as(mass)


def select_heads(stats: HeadStats, rule: HeadRule = HeadRule()) -> HeadSelection:
    """Apply `rule` to `stats` (see `HeadRule`)."""
    if rule.granularity == "layer":
        cross, uni = stats.cross.mean(1), stats.uni.mean(1)
        chosen = _pick(cross, cross / (cross + uni + SHARE_EPS) >= rule.min_share, rule)
        return HeadSelection({stats.layers[i]: None for i in chosen.nonzero().flatten().tolist()})
    chosen = _pick(stats.cross, stats.share >= rule.min_share, rule)
    out: dict[int, list[int] | None] = {}
    for i, h in chosen.nonzero().tolist():
        out.setdefault(stats.layers[i], []).append(h)  # type: ignore[union-attr]
    return HeadSelection(out)


# ------------------------------------------------------------------------------------------------- runners
class LastQueryAttention:
    """Hooks keeping, for chosen layers, the attention row of each batch row's target query (float32,
    [batch, head, keys]); the target is set before each forward pass by `reset`."""

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self.targets: Tensor | None = None
        self.rows: dict[int, Tensor] = {}

    def reset(self, targets: Int[Tensor, " batch"]) -> None:
        self.targets, self.rows = targets, {}

    def hooks(self) -> list[tuple[str, Any]]:
        return [(hook_names.pattern(layer), self._keep) for layer in self.layers]

    def _keep(self, pattern: Tensor, hook: Any) -> None:
        rows: slice = hook.query_slice
        t = self.targets.to(pattern.device)
        inside = (t >= rows.start) & (t < rows.stop)
        if not bool(inside.any()):
            return
        batch = torch.arange(pattern.shape[0], device=pattern.device)
        picked = pattern[batch, :, (t - rows.start).clamp(0, pattern.shape[2] - 1)].float()  # [batch, head, keys]
        layer = hook.layer()
        current = self.rows.get(layer, torch.zeros_like(picked))
        current[inside] = picked[inside]
        self.rows[layer] = current

    def stacked(self) -> Float[Tensor, "layer batch head keys"]:
        missing = [layer for layer in self.layers if layer not in self.rows]
        if missing:
            raise RuntimeError(f"no attention was captured for layers {missing}")
        return torch.stack([self.rows[layer] for layer in self.layers])


def _last_valid(mask: Tensor) -> Int[Tensor, " batch"]:
    return (torch.arange(mask.shape[1], device=mask.device) * mask.bool()).amax(1)


class Runner:
    """One greedy decoding of one prompt under fixed hooks: `start()` gives the next-token logits at the answer
    position, `step(token)` those after appending one token per row. With `use_cache` the prompt is prefilled
    once into a KV cache (`HookedAVModel.start_decoding` / `decode_step`); without, every step reruns the decoder
    over prompt + generated tokens (a slow reference). `capture` records the attention row of the newest query."""

    def __init__(self, model: Any, inputs: Any, hooks: Sequence[tuple[str, Any]] = (), embeds: Tensor | None = None,
                 use_cache: bool = True, capture: LastQueryAttention | None = None):
        self.model, self.inputs = model, model.as_inputs(inputs)
        self.embeds, self.use_cache, self.capture = embeds, use_cache, capture
        self.hooks = list(hooks) + (capture.hooks() if capture is not None else [])
        self.state: Any = None
        self.tokens: list[Tensor] = []

    @torch.no_grad()
    def start(self) -> Float[Tensor, "batch vocab"]:
        if self.capture is not None:
            self.capture.reset(_last_valid(self.inputs.attention_mask))
        if self.embeds is None:
            self.embeds = self.model.embed_inputs(self.inputs)
        with self.model.hooks(fwd_hooks=self.hooks):
            if self.use_cache:
                logits, self.state = self.model.start_decoding(self.inputs, self.embeds)
                return logits.float()
            return self._full().float()

    @torch.no_grad()
    def step(self, token: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        self.tokens.append(token)
        n_keys = self.inputs.input_ids.shape[1] + len(self.tokens)
        if self.capture is not None:
            self.capture.reset(torch.full_like(token, n_keys - 1))
        with self.model.hooks(fwd_hooks=self.hooks):
            if self.use_cache:
                return self.model.decode_step(self.state, token).float()
            return self._full().float()

    def _full(self) -> Tensor:
        """The decoder over prompt + generated tokens; logits of the last position."""
        from ..model import AVInputs

        p = self.inputs
        if not self.tokens:
            return self.model.decode(p, self.embeds, return_type="last_logits")
        new = torch.stack(self.tokens, dim=1)  # [batch, n]
        b, n = new.shape
        steps = torch.arange(n, device=new.device)
        pos = (p.next_position[:, None] + steps[None])[None].expand(p.position_ids.shape[0], b, n)
        av = AVInputs(torch.cat([p.input_ids, new], 1),
                      torch.cat([p.attention_mask, torch.ones_like(new, dtype=p.attention_mask.dtype)], 1),
                      torch.cat([p.position_ids, pos.to(p.position_ids.dtype)], 2), p.modality_map, {})
        embeds = torch.cat([self.embeds, self.model.embed(new)], 1)
        return self.model.decode(av, embeds, return_type="last_logits")


# --------------------------------------------------------------------------------------------- decoding
@dataclass
class MitigationSample:
    """What the methods need of one prompt.

    inputs: the prompt (AVInputs or processor outputs); one sample for the sink-based methods.
    negatives: the same prompt with one modality removed at the raw input, "audio" (zeroed waveform,
        `hooked_av.corrupt.zero_audio`) and/or "video" (black frames, `corrupt.black_frames`); for `Contrastive`.
    sinks: the prompt's sink sets (`find_sink_sets`); for `Amplify` and `Guidance`.
    seed: the seed of the random token-set control for this sample.
    The merged input embeddings (the towers' output) are computed once per input and reused by every method
    (`embeddings`): methods hook the decoder only, from `hook_embed` on.
    """

    inputs: Any
    negatives: Mapping[str, Any] = field(default_factory=dict)
    sinks: SinkSets | None = None
    seed: int = 0
    _embeds: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def embeddings(self, model: Any, which: str = "inputs") -> Float[Tensor, "batch pos d_model"]:
        """The merged embeddings of `inputs` ("inputs") or of a negative ("audio", "video"), memoised."""
        if which not in self._embeds:
            source = self.inputs if which == "inputs" else self.negatives[which]
            with torch.no_grad():
                self._embeds[which] = model.embed_inputs(model.as_inputs(source))
        return self._embeds[which]

    def need_sinks(self, who: str) -> SinkSets:
        if self.sinks is None:
            raise ValueError(f"{who} needs the sample's sink sets: pass MitigationSample(sinks=find_sink_sets(...))")
        return self.sinks


@dataclass(frozen=True)
class DecodeCost:
    """Wall time and decoder passes of one greedy generation (a pass = the decoder stack run once over the new
    positions of one cache; setup passes such as head statistics count too)."""

    n_tokens: int
    seconds: float
    first_token_seconds: float
    passes: int

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / self.n_tokens if self.n_tokens else math.nan

    @property
    def decode_seconds_per_token(self) -> float:
        """Seconds per token after the first (the prefill excluded)."""
        n = self.n_tokens - 1
        return (self.seconds - self.first_token_seconds) / n if n > 0 else math.nan

    @property
    def passes_per_token(self) -> float:
        return self.passes / self.n_tokens if self.n_tokens else math.nan

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "seconds_per_token": self.seconds_per_token,
                "decode_seconds_per_token": self.decode_seconds_per_token, "passes_per_token": self.passes_per_token}


@dataclass
class MitigatedGeneration:
    """Greedy generation under a method: the tokens, the method's log-probabilities of each step
    ([steps, batch, vocab]), each row's steps up to its eos, the cost and, for `Guidance`, each step's strength."""

    new_tokens: Int[Tensor, "batch steps"]
    scores: Float[Tensor, "steps batch vocab"]
    n_steps: Int[Tensor, " batch"]
    cost: DecodeCost
    strengths: list[list[float]] | None = None


class Decoder(Protocol):
    passes: int

    def start(self) -> Float[Tensor, "batch vocab"]: ...

    def step(self, token: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]: ...


def greedy(decoder: Decoder, max_new_tokens: int, eos: set[int], pad: int) -> MitigatedGeneration:
    """Greedy decoding on a method's scores; a row stops at its first eos (later tokens are `pad`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t0 = time.perf_counter()
    scores = decoder.start()
    first = time.perf_counter() - t0
    finished = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    n_steps = torch.zeros_like(finished, dtype=torch.long)
    stop = torch.tensor(sorted(eos), dtype=torch.long, device=scores.device)
    tokens, steps = [], []
    for step in range(max_new_tokens):
        steps.append(scores)
        n_steps += (~finished).long()
        token = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), scores.argmax(-1))
        tokens.append(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        scores = decoder.step(token)
    cost = DecodeCost(len(tokens), time.perf_counter() - t0, first, decoder.passes)
    return MitigatedGeneration(torch.stack(tokens, 1), torch.stack(steps), n_steps, cost,
                               getattr(decoder, "strengths", None))


class Method:
    """A decoding-time method: `decoder(model, sample)` builds its decoder; `scores` and `generate` use it."""

    family: str = ""
    knob_name: str = ""

    @property
    def knob(self) -> float:
        return 0.0

    @property
    def key(self) -> str:
        return f"{self.family}@{self.knob:g}"

    def decoder(self, model: Any, sample: MitigationSample, use_cache: bool = True) -> Decoder:
        raise NotImplementedError

    def scores(self, model: Any, sample: MitigationSample) -> Float[Tensor, "batch vocab"]:
        """The method's next-token log-probabilities at the answer position (teacher-forced scoring)."""
        return self.decoder(model, sample).start()

    def generate(self, model: Any, sample: MitigationSample, max_new_tokens: int = 32,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 stop_at_eos: bool = True, use_cache: bool = True) -> MitigatedGeneration:
        """Greedy generation on the method's scores (`stop_at_eos=False`: exactly `max_new_tokens`, e.g. to
        measure the cost per token)."""
        eos = model.eos_ids(eos_token_id) if stop_at_eos else set()
        pad = pad_token_id if pad_token_id is not None else (model.cfg.token_ids.pad or 0)
        return greedy(self.decoder(model, sample, use_cache), max_new_tokens, eos, pad)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        return {"method": type(self).__name__.lower(), "key": self.key, **d}


class _SingleRunnerDecoder:
    """A decoder over one runner: log-softmax of its logits."""

    def __init__(self, runner: Runner, setup: Any = None):
        self.runner, self.setup, self.passes = runner, setup, 0

    def start(self) -> Tensor:
        if self.setup is not None:
            self.passes += self.setup()
        self.passes += 1
        return F.log_softmax(self.runner.start(), -1)

    def step(self, token: Tensor) -> Tensor:
        self.passes += 1
        return F.log_softmax(self.runner.step(token), -1)


@dataclass(frozen=True)
class Plain(Method):
    """The model without intervention."""

    family = "plain"
    knob_name = "none"

    @property
    def key(self) -> str:
        return "plain"

    def decoder(self, model: Any, sample: MitigationSample, use_cache: bool = True) -> Decoder:
        return _SingleRunnerDecoder(Runner(model, sample.inputs, (), sample.embeddings(model), use_cache))


@dataclass(frozen=True)
class Amplify(Method):
    """Attention amplification (PAI rule) of a token set of the sample, in the prefill's chosen query rows and at
    every decoding step. alpha = 0 leaves the scores unchanged (eager attention, so equal up to rounding).

    layers: default the official l > 5. head_rule: choose layers/heads per sample from `head_sink_mass`
    statistics among `layers` (one extra prefill pass, counted in the cost); none chosen = no amplification.
    """

    alpha: float = amplify.OFFICIAL_ALPHA
    tokens: TokenSet = "cross_modal"
    layers: tuple[int, ...] | None = None
    queries: amplify.QueryRows = "text"
    head_rule: HeadRule | None = None

    family = "amplify"
    knob_name = "alpha"

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.tokens not in TOKEN_SETS:
            raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {self.tokens!r}")
        if self.queries not in amplify.QUERY_ROWS:
            raise ValueError(f"queries must be one of {amplify.QUERY_ROWS}, got {self.queries!r}")

    @property
    def knob(self) -> float:
        return self.alpha

    @property
    def key(self) -> str:
        heads = f"/{self.head_rule.granularity}s" if self.head_rule else ""
        return f"amplify[{self.tokens}{heads}]@{self.alpha:g}"

    def decoder(self, model: Any, sample: MitigationSample, use_cache: bool = True) -> Decoder:
        av = model.as_inputs(sample.inputs)
        _one_sample(av, "Amplify")
        sink_sets = sample.need_sinks("Amplify")
        layers = amplify.official_layers(model.cfg.n_layers) if self.layers is None else list(self.layers)
        amplify.check_layers_and_heads(model, layers)
        keys = token_set(self.tokens, sink_sets, av.modality_map, sample.seed)
        starts = amplify.query_starts(av.modality_map, self.queries)
        runner = Runner(model, av, amplify.amplify_hooks([keys], starts, self.alpha, layers),
                        sample.embeddings(model), use_cache)
        if self.head_rule is None:
            return _SingleRunnerDecoder(runner)

        def choose_heads() -> int:
            stats = head_sink_mass(model, av, sink_sets, self.queries, layers)
            chosen = select_heads(stats, self.head_rule)
            runner.hooks = amplify.amplify_hooks([keys], starts, self.alpha, chosen.layers, chosen.head_map())
            decoder.selection = chosen  # type: ignore[attr-defined]
            return 1

        decoder = _SingleRunnerDecoder(runner, setup=choose_heads)
        return decoder


def contrastive_scores(
    full: Float[Tensor, "batch vocab"],
    negatives: Sequence[Float[Tensor, "batch vocab"]],
    beta: float = VCD_BETA,
    plausibility: float = VCD_PLAUSIBILITY,
) -> Float[Tensor, "batch vocab"]:
    """log_softmax of (1 + beta) full - beta mean(negatives) on the tokens with p_full >= plausibility * max p_full
    (logit >= log(plausibility) + max logit), -inf elsewhere. beta = 0 gives the plain log-probabilities on the
    plausible tokens."""
    full = full.float()
    neg = torch.stack([n.float() for n in negatives]).mean(0)
    mixed = (1 + beta) * full - beta * neg
    cutoff = math.log(plausibility) + full.amax(-1, keepdim=True)
    return F.log_softmax(mixed.masked_fill(full < cutoff, -math.inf), -1)


class _ContrastiveDecoder:
    def __init__(self, method: "Contrastive", full: Runner, negatives: list[Runner]):
        self.method, self.full, self.negatives, self.passes = method, full, negatives, 0

    def _mix(self, full: Tensor, negs: list[Tensor]) -> Tensor:
        self.passes += 1 + len(negs)
        return contrastive_scores(full, negs, self.method.beta, self.method.plausibility)

    def start(self) -> Tensor:
        return self._mix(self.full.start(), [n.start() for n in self.negatives])

    def step(self, token: Tensor) -> Tensor:
        return self._mix(self.full.step(token), [n.step(token) for n in self.negatives])


@dataclass(frozen=True)
class Contrastive(Method):
    """AVCD-style contrastive decoding against the input lacking `drop` ("audio", "video" or "both": the mean of
    the two negatives' logits), with VCD's adaptive plausibility constraint. One extra cache per negative."""

    beta: float = VCD_BETA
    drop: Literal["audio", "video", "both"] = "video"
    plausibility: float = VCD_PLAUSIBILITY

    family = "contrastive"
    knob_name = "beta"

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.drop not in DROPS:
            raise ValueError(f"drop must be one of {DROPS}, got {self.drop!r}")
        if not 0 < self.plausibility <= 1:
            raise ValueError(f"plausibility must be in (0, 1], got {self.plausibility}")

    @property
    def knob(self) -> float:
        return self.beta

    @property
    def key(self) -> str:
        return f"contrastive[{self.drop}]@{self.beta:g}"

    def decoder(self, model: Any, sample: MitigationSample, use_cache: bool = True) -> Decoder:
        names = ("audio", "video") if self.drop == "both" else (self.drop,)
        missing = [n for n in names if n not in sample.negatives]
        if missing:
            how = {"audio": "corrupt.zero_audio", "video": "corrupt.black_frames"}
            raise ValueError(f"Contrastive(drop={self.drop!r}) needs sample.negatives[{missing[0]!r}]: the prompt "
                             f"with that modality removed (hooked_av.{how[missing[0]]})")
        full = Runner(model, sample.inputs, (), sample.embeddings(model), use_cache)
        return _ContrastiveDecoder(self, full, [Runner(model, sample.negatives[n], (), sample.embeddings(model, n),
                                                       use_cache) for n in names])


def official_target_layers(n_layers: int) -> list[int]:
    """The official guidance layers 18..25 of 28, scaled to `n_layers`: floor(18 L/28) .. ceil(26 L/28) - 1
    (the official set itself for 28 layers; at least one layer)."""
    lo = math.floor(OFFICIAL_TARGET_LAYERS[0] * n_layers / OFFICIAL_N_LAYERS)
    hi = math.ceil(OFFICIAL_TARGET_LAYERS[1] * n_layers / OFFICIAL_N_LAYERS)
    return list(range(min(lo, n_layers - 1), max(min(hi, n_layers), lo + 1)))


@dataclass(frozen=True)
class GuidanceSignal:
    """What one guidance step read from the plain model's attention (per batch row)."""

    text_mass: Float[Tensor, " batch"]
    cross: Float[Tensor, " batch"]
    uni: Float[Tensor, " batch"]
    share: Float[Tensor, " batch"]
    target: Float[Tensor, " batch"]


def _set_mean(attn: Tensor, positions: Sequence[int]) -> Tensor:
    """mean over heads and the keys `positions` of attn [layer, batch, head, keys] -> [layer, batch]; 0 if empty
    (the official torch mean of an empty set is NaN, which would poison the strength)."""
    idx = [p for p in positions if p < attn.shape[-1]]
    if not idx:
        return attn.new_zeros(attn.shape[:2])
    return attn[..., idx].mean((-1, -2))


def guidance_signal(
    attn: Float[Tensor, "layer batch head keys"],
    sink_sets: SinkSets,
    text_start: Int[Tensor, " batch"],
    method: "Guidance",
) -> GuidanceSignal:
    """The official target strength t of one step from the newest query's attention at the target layers.

    text_mass = mean over layers and heads of the attention on keys >= text_start (prompt text after the clip and
    generated tokens); cross = sum over layers of [mean(av) + mean(va)], uni = the same for aa and vv (means over
    heads and keys); w = cross / (cross + uni + 1e-8); t = min(clamp, base w); if text_mass > 0.4:
    t *= 0.5 (1 + cos(pi min(1, (text_mass - 0.4) / 0.2))); if w < 0.6: t *= (w / 0.6)^2.
    """
    keys = torch.arange(attn.shape[-1], device=attn.device)
    text = (keys[None, :] >= text_start.to(attn.device)[:, None]).float()  # [batch, keys]
    text_mass = (attn * text[None, :, None, :]).sum(-1).mean(-1).mean(0)
    cross = (_set_mean(attn, sink_sets.av) + _set_mean(attn, sink_sets.va)).sum(0)
    uni = (_set_mean(attn, sink_sets.aa) + _set_mean(attn, sink_sets.vv)).sum(0)
    w = cross / (cross + uni + SHARE_EPS)
    t = torch.clamp(method.strength * w, max=method.clamp)
    ramp = torch.clamp((text_mass - method.text_mass_threshold) / method.text_mass_ramp, max=1.0)
    t = torch.where(text_mass > method.text_mass_threshold, t * 0.5 * (1 + torch.cos(math.pi * ramp)), t)
    t = torch.where(w < method.adaptive_threshold, t * (w / method.adaptive_threshold) ** 2, t)
    return GuidanceSignal(text_mass, cross, uni, w, t)


class _GuidanceDecoder:
    def __init__(self, method: "Guidance", model: Any, sample: MitigationSample, use_cache: bool):
        av = model.as_inputs(sample.inputs)
        _one_sample(av, "Guidance")
        self.method, self.model, self.av, self.use_cache, self.sample = method, model, av, use_cache, sample
        self.sinks = sample.need_sinks("Guidance")
        n = model.cfg.n_layers
        given = method.target_layers, method.amplify_layers
        self.target_layers = official_target_layers(n) if given[0] is None else list(given[0])
        self.amplify_layers = amplify.official_layers(n) if given[1] is None else list(given[1])
        amplify.check_layers_and_heads(model, self.target_layers + self.amplify_layers)
        self.capture = LastQueryAttention(self.target_layers)
        self.text_start = torch.tensor([av.modality_map.av_end(b) for b in range(av.modality_map.batch_size)])
        self.s_prev = torch.zeros(av.input_ids.shape[0])
        self.strengths: list[list[float]] = []
        self.signals: list[GuidanceSignal] = []
        self.passes = 0

    def _runners(self) -> tuple[Runner, Runner]:
        embeds = self.sample.embeddings(self.model)  # the towers run once for both caches
        starts = amplify.query_starts(self.av.modality_map, self.method.queries)
        hooks = amplify.amplify_hooks([self.sinks.cross_modal], starts, self.method.alpha, self.amplify_layers)
        return (Runner(self.model, self.av, (), embeds, self.use_cache, self.capture),
                Runner(self.model, self.av, hooks, embeds, self.use_cache))

    def _strength(self) -> Tensor:
        signal = guidance_signal(self.capture.stacked(), self.sinks, self.text_start, self.method)
        m = self.method.momentum
        s = m * self.s_prev + (1 - m) * signal.target.cpu()
        self.s_prev = s
        self.signals.append(signal)
        return s

    def _mix(self, plain: Tensor, guided: Tensor, s: Tensor) -> Tensor:
        self.passes += 2
        self.strengths.append(s.tolist())
        lp, lg = F.log_softmax(plain, -1), F.log_softmax(guided, -1)
        return lp + s.to(lp.device)[:, None] * (lg - lp)

    def start(self) -> Tensor:
        self.plain, self.guided = self._runners()
        plain, guided = self.plain.start(), self.guided.start()
        s = self._strength() if self.method.first_step == "adaptive" else torch.zeros_like(self.s_prev)
        return self._mix(plain, guided, s)

    def step(self, token: Tensor) -> Tensor:
        plain = self.plain.step(token)
        s = self._strength()
        return self._mix(plain, self.guided.step(token), s)


@dataclass(frozen=True)
class Guidance(Method):
    """The official adaptive two-cache guidance (crossmodal-hub `GuidanceLogits`, METHOD.md §11.3), runnable.

    Two KV caches hold the same tokens: the plain model's, and the guiding model's, which amplifies attention to
    the sample's cross-modal sinks (av + va). At each step the plain model's attention of the newest query at the
    target layers gives the target strength t (`guidance_signal`), smoothed by momentum,
    s = momentum s_prev + (1 - momentum) t, and the scores are
    log_softmax(plain) + s (log_softmax(guided) - log_softmax(plain)): an interpolation toward the guiding model,
    s in [0, clamp]. strength = 0 gives the plain model.

    Discrepancies with the release, resolved here:
    - The released "masked" forward is a no-op (its intervention is commented out). The guiding model applies
      the paper's intended intervention instead: the commented-out PAI amplification (§11.2), alpha 0.2, layers
      > 5, text queries and every decoding step, on the cross-modal sinks (`alpha`, `amplify_layers`, `queries`).
    - The release runs three forwards per step (HF's own forward plus two); the plain forward gives both the
      logits and the attention here, so two passes per step.
    - First step: the official rule sets s = 0 there (the first token is the plain model's) and leaves the
      momentum state untouched; `first_step="adaptive"` instead computes t from the prefill's attention at the
      answer position (s = (1 - momentum) t), which one-token teacher-forced answers need to be affected at all.
    - Sink sets: `find_sink_sets` (global sinks, K = int(T / 3) as the official --k_divide 3, median split per
      modality); an empty set contributes 0 to cross / uni (the official mean of an empty set is NaN).
    - Strength, text mass and shares are computed per batch row (the official averages over the batch too; the
      same for a batch of one). The momentum weight generalises the official 0.5 / 0.5 to momentum / 1 - momentum.
    - Target layers for models without 28 layers: `official_target_layers` scales 18..25 of 28.
    """

    strength: float = OFFICIAL_GUIDANCE_STRENGTH
    adaptive_threshold: float = OFFICIAL_ADAPTIVE_THRESHOLD
    text_mass_threshold: float = OFFICIAL_TEXT_MASS_THRESHOLD
    text_mass_ramp: float = OFFICIAL_TEXT_MASS_RAMP
    momentum: float = OFFICIAL_MOMENTUM
    clamp: float = OFFICIAL_STRENGTH_CLAMP
    target_layers: tuple[int, ...] | None = None
    alpha: float = amplify.OFFICIAL_ALPHA
    amplify_layers: tuple[int, ...] | None = None
    queries: amplify.QueryRows = "text"
    first_step: Literal["official", "adaptive"] = "official"

    family = "guidance"
    knob_name = "strength"

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.adaptive_threshold <= 0 or self.text_mass_ramp <= 0:
            raise ValueError("adaptive_threshold and text_mass_ramp must be > 0")
        if self.first_step not in FIRST_STEPS:
            raise ValueError(f"first_step must be one of {FIRST_STEPS}, got {self.first_step!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    @property
    def knob(self) -> float:
        return self.strength

    @property
    def key(self) -> str:
        first = "" if self.first_step == "official" else f"[{self.first_step}]"
        return f"guidance{first}@{self.strength:g}"

    def decoder(self, model: Any, sample: MitigationSample, use_cache: bool = True) -> Decoder:
        return _GuidanceDecoder(self, model, sample, use_cache)


def method_from_dict(d: Mapping[str, Any]) -> Method:
    """The inverse of `Method.to_dict` (the `key` entry is ignored)."""
    kinds: dict[str, type[Method]] = {"plain": Plain, "amplify": Amplify, "contrastive": Contrastive,
                                      "guidance": Guidance}
    d = dict(d)
    kind = d.pop("method", None)
    d.pop("key", None)
    if kind not in kinds:
        raise ValueError(f"unknown method {kind!r}; known: {', '.join(kinds)}")
    for name in ("layers", "target_layers", "amplify_layers"):
        if d.get(name) is not None:
            d[name] = tuple(d[name])
    if d.get("head_rule") is not None:
        d["head_rule"] = HeadRule(**d["head_rule"])
    return kinds[kind](**d)


__all__ = [
    "Amplify", "Contrastive", "DecodeCost", "Decoder", "Guidance", "GuidanceSignal", "HeadRule", "HeadSelection",
    "HeadStats", "LastQueryAttention", "Method", "MitigatedGeneration", "MitigationSample", "Plain", "Runner",
    "SinkSets", "TOKEN_SETS", "contrastive_scores", "find_sink_sets", "greedy", "guidance_signal",
    "head_sink_mass", "method_from_dict", "official_target_layers", "random_av_tokens", "select_heads",
    "token_set",
]
