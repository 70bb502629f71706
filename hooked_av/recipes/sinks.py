"""Attention sinks from massive activations.

A token is a sink at layer l when max over the model's sink dims of |resid_pre / rms(resid_pre)| (float32, no
learned gain; the model's `blocks.{l}.hook_sink`) exceeds tau. Global sinks rank tokens by the number of layers in
which they are sinks and keep the top K = int(T / N) (the official rule: every token competes for K, text
included, and ties keep first-seen order, i.e. by first sink layer, then position); the `min_layers` variant keeps
tokens that are sinks in at least that many layers. A model without known constants gets them from
`calibrate_sinks`, which returns its evidence.

All functions take one sample's values where a [layer, pos] tensor is involved; `sink_values` works on a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .. import hook_names
from ..config import SinkConstants
from ..inputs import Modality, ModalityMap

#: the official constants (Qwen2.5-Omni-7B, hidden size 3584): tau 25 on dims [458, 2570] (logic/sink.py)
REFERENCE_TAU = 25.0
REFERENCE_D_MODEL = 3584
#: the official analysis uses N = 2 (K = int(T / 2)); the paper's table also uses 3 and 4
OFFICIAL_K_DIVIDE = 2


class SinkRecorder:
    """phi per layer (max over the sink dims of |resid_pre / rms|, `blocks.{l}.hook_sink`) collected during a pass
    the caller runs, so sink statistics come with a pass made for something else (scoring, K/V capture) instead of
    costing one of their own. Only the first call per layer is kept: inside `generate` that is the prompt.

    Usage: `rec = SinkRecorder(model); with model.hooks(fwd_hooks=rec.hooks()): model(inputs)`; `rec.values()`.
    """

    def __init__(self, model: Any, layers: Iterable[int] | None = None):
        if not model.cfg.sinks.dims:
            raise ValueError(f"{model.cfg.model_name} has no sink dims; calibrate them first (calibrate_sinks) "
                             "and apply them with model.set_sinks(...)")
        self.layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
        self._store: dict[int, Tensor] = {}

    def _keep(self, values: Tensor, hook: Any) -> None:
        if hook.layer() not in self._store:  # the prefill only, if run inside generate
            self._store[hook.layer()] = values.amax(dim=-1).detach()  # [batch, pos]

    def hooks(self) -> list[tuple[str, Any]]:
        return [(hook_names.sink(layer), self._keep) for layer in self.layers]

    def values(self) -> Float[Tensor, "layer batch pos"]:
        missing = [layer for layer in self.layers if layer not in self._store]
        if missing:
            raise RuntimeError(f"no sink values recorded for layers {missing[:5]}: run a pass with rec.hooks()")
        return torch.stack([self._store[layer] for layer in self.layers])


def sink_values(model: Any, inputs: Any, layers: Iterable[int] | None = None) -> Float[Tensor, "layer batch pos"]:
    """phi = max over the sink dims of the |RMS-normalised| residual at each layer's input, for a batch.

    Caches only these numbers (one per token per layer), never the residual stream; attention stays sdpa.
    To get them from a pass that runs anyway, attach a `SinkRecorder`'s hooks to it instead.
    """
    from ..model import AVInputs

    rec = SinkRecorder(model, layers)
    av = inputs if isinstance(inputs, AVInputs) else model.prepare_inputs(**inputs)
    with torch.no_grad():
        model.run_with_hooks(av, return_type="none", fwd_hooks=rec.hooks())
    return rec.values()


def layer_sinks(values: Float[Tensor, "layer ... pos"], tau: float) -> Bool[Tensor, "layer ... pos"]:
    """Per-layer sink sets: phi > tau."""
    return values > tau


@dataclass
class GlobalSinks:
    """One sample's global sinks, in frequency order (most frequent first; official tie order)."""

    positions: list[int]
    video: list[int]
    audio: list[int]
    frequency: dict[int, int]  # position -> number of layers in which it is a sink
    k: int | None
    k_divide: int | None
    min_layers: int | None

    def of(self, modality: str) -> list[int]:
        return {"video": self.video, "audio": self.audio}[Modality.parse(modality).name.lower()]


def rank_by_frequency(is_sink: Bool[Tensor, "layer pos"]) -> list[tuple[int, int]]:
    """(position, frequency) of every token that is a sink somewhere, ordered like `Counter.most_common` over
    the per-layer sink lists visited layer by layer (frequency descending, ties by first layer, then position)."""
    freq = is_sink.sum(0)
    n_layers = is_sink.shape[0]
    first = torch.where(is_sink.any(0), is_sink.float().argmax(0), torch.full_like(freq, n_layers))
    pos = torch.arange(is_sink.shape[1], device=is_sink.device)
    keep = freq > 0
    f, fl, p = freq[keep].tolist(), first[keep].tolist(), pos[keep].tolist()
    order = sorted(range(len(p)), key=lambda i: (-f[i], fl[i], p[i]))
    return [(p[i], f[i]) for i in order]


def global_sinks(
    is_sink: Bool[Tensor, "layer pos"],
    modality_map: ModalityMap,
    batch: int = 0,
    k_divide: int | None = OFFICIAL_K_DIVIDE,
    min_layers: int | None = None,
    seq_len: int | None = None,
) -> GlobalSinks:
    """Global sinks of sample `batch`: the top K = int(T / k_divide) tokens by sink frequency (official), or,
    with `min_layers`, every token that is a sink in at least that many layers (then `k_divide` is ignored).

    T is the sample's number of valid tokens unless `seq_len` is given. Only tokens that are sinks in at least
    one layer are ever chosen, so K may not be reached.
    """
    valid = modality_map.modality[batch].to(is_sink.device) != int(Modality.PAD)
    ranked = rank_by_frequency(is_sink & valid[None])  # a padding query sees only itself: never a sink
    k = None
    if min_layers is not None:
        ranked = [(p, f) for p, f in ranked if f >= min_layers]
        k_divide = None
    elif k_divide is not None:
        if k_divide < 1:
            raise ValueError(f"k_divide must be >= 1, got {k_divide}")
        t = seq_len if seq_len is not None else int((modality_map.modality[batch] != int(Modality.PAD)).sum())
        k = int(t / k_divide)
        ranked = ranked[:k]
    modality = modality_map.modality[batch].tolist()
    positions = [p for p, _ in ranked]
    return GlobalSinks(
        positions=positions,
        video=[p for p in positions if modality[p] == Modality.VIDEO],
        audio=[p for p in positions if modality[p] == Modality.AUDIO],
        frequency=dict(ranked), k=k, k_divide=k_divide, min_layers=min_layers,
    )


# ---------------------------------------------------------------------------------------------- calibration
@dataclass
class SinkCalibration:
    """Sink constants found for a model, with the evidence behind them.

    dim_scores: per candidate dim, the median over layers (after the first `skip_layers`) of the max over tokens
        of |x / rms(x)|; massive-activation dims stand out by an order of magnitude.
    tau_scaled: the reference tau scaled to this width, tau_ref * sqrt(d_model / d_ref) (an RMS-normalised
        coordinate is at most sqrt(d_model), so a fixed tau cannot carry over between widths).
    tau_gap: the threshold at the widest gap of log(phi) among the tokens (a data-driven cut between sinks
        and the rest).
    tau_midpoint: halfway between the `ordinary_quantile` of phi over all (layer, token) entries and the
        largest phi (the sink tokens' level): a cut that works when the sink dims are large for every token
        but largest on the sinks (SmolLM2's dim 507).
    sink_fraction: fraction of (layer, token) entries above each candidate tau.
    """

    sinks: SinkConstants
    dim_scores: dict[int, float]
    tau_scaled: float
    tau_gap: float
    tau_midpoint: float
    tau_rule: str
    sink_fraction: dict[str, float]
    max_possible: float
    n_tokens: int
    skip_layers: int
    phi_quantiles: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sinks"] = self.sinks.to_dict()
        d["dim_scores"] = {str(k): v for k, v in self.dim_scores.items()}
        return d


def _normalised_resid(model: Any, inputs: Any, layers: list[int]) -> dict[int, Tensor]:
    """|x / rms(x)| in float32 for each layer's resid_pre, valid tokens only, [n_tokens, d_model] per layer."""
    from ..model import AVInputs

    av = inputs if isinstance(inputs, AVInputs) else model.prepare_inputs(**inputs)
    valid = av.attention_mask.bool()
    eps = model.cfg.sinks.eps
    out: dict[int, Tensor] = {}

    def keep(resid: Tensor, hook: Any) -> None:
        x = resid.float()
        r = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)).abs()
        out[hook.layer()] = r[valid.to(r.device)].cpu()

    with torch.no_grad():
        model.run_with_hooks(av, return_type="none",
                             fwd_hooks=[(hook_names.resid_pre(layer), keep) for layer in layers])
    return out


def calibrate_sinks(
    model: Any,
    samples: Iterable[Any],
    n_dims: int = 2,
    tau_rule: Literal["midpoint", "scaled", "gap"] = "midpoint",
    skip_layers: int = 1,
    ordinary_quantile: float = 0.99,
    reference_tau: float = REFERENCE_TAU,
    reference_d_model: int = REFERENCE_D_MODEL,
) -> SinkCalibration:
    """Find sink dims and tau for a model without known constants, from a few samples (processor outputs).

    Dims: rank each residual dimension by the median over layers (skipping the first `skip_layers`, where the
    embedding has no massive activations yet) of its largest |RMS-normalised| value; keep the top `n_dims`.
    Tau: `tau_rule="midpoint"` (default) halfway between the `ordinary_quantile` of phi and its maximum;
    `"scaled"` scales the reference tau by sqrt(d_model / d_ref) (right only if the model's activations scale
    like Qwen2.5-7B's); `"gap"` cuts at the widest gap in log(phi). All three values and the fraction of entries
    each flags are returned as evidence; check that the chosen one flags a small fraction.
    """
    d_model, n_layers = model.cfg.d_model, model.cfg.n_layers
    layers = list(range(min(skip_layers, n_layers - 1), n_layers))
    per_sample = [_normalised_resid(model, s, layers) for s in samples]
    if not per_sample:
        raise ValueError("calibrate_sinks needs at least one sample")
    layer_max = torch.stack([torch.stack([r[layer].amax(0) for r in per_sample]).amax(0) for layer in layers])
    score = layer_max.median(dim=0).values  # [d_model]
    top = torch.topk(score, k=min(d_model, max(n_dims, 8)))
    dims = tuple(sorted(int(i) for i in top.indices[:n_dims]))
    phi = torch.cat([torch.cat([r[layer][:, list(dims)].amax(-1) for layer in layers]) for r in per_sample])

    max_possible = math.sqrt(d_model)
    tau_scaled = reference_tau * math.sqrt(d_model / reference_d_model)
    log_phi = torch.sort(torch.log(phi.clamp_min(1e-6))).values
    gaps = log_phi[1:] - log_phi[:-1]
    i = int(gaps.argmax())
    tau_gap = float(torch.exp((log_phi[i] + log_phi[i + 1]) / 2))
    tau_midpoint = float((torch.quantile(phi, ordinary_quantile) + phi.max()) / 2)
    tau = {"midpoint": tau_midpoint, "scaled": tau_scaled, "gap": tau_gap}.get(tau_rule)
    if tau is None:
        raise ValueError(f"tau_rule must be 'midpoint', 'scaled' or 'gap', got {tau_rule!r}")
    qs = {"q50": 0.5, "q90": 0.9, "q99": 0.99, "q999": 0.999, "max": 1.0}
    return SinkCalibration(
        sinks=SinkConstants(dims=dims, tau=float(tau), eps=model.cfg.sinks.eps, calibrated=True,
                            provenance=f"calibrate_sinks(tau_rule={tau_rule!r}, n_samples={len(per_sample)}, "
                                       f"n_dims={n_dims}, skip_layers={skip_layers})"),
        dim_scores={int(i): float(v) for i, v in zip(top.indices, top.values)},
        tau_scaled=tau_scaled, tau_gap=tau_gap, tau_midpoint=tau_midpoint, tau_rule=tau_rule,
        sink_fraction={"midpoint": float((phi > tau_midpoint).float().mean()),
                       "scaled": float((phi > tau_scaled).float().mean()),
                       "gap": float((phi > tau_gap).float().mean())},
        max_possible=max_possible, n_tokens=int(phi.numel() // len(layers)), skip_layers=skip_layers,
        phi_quantiles={k: float(torch.quantile(phi, q)) for k, q in qs.items()},
    )
