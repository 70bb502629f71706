"""Low-rank adapters on the decoder's linear layers, for training the organism on CPU.

`add_lora(model, targets=("q_proj", "v_proj"), rank=8)` wraps those nn.Linear modules of every block so that
y = W x + b + (alpha / rank) * B (A x); only A and B train. `merge_lora(model)` folds B A into W and removes the
wrappers, so the trained model is a plain checkpoint again; `lora_state(model)` gives the factors (a few MB) to
store as deltas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, seed: int):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        gen = torch.Generator().manual_seed(seed)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features).uniform_(
            -1 / math.sqrt(base.in_features), 1 / math.sqrt(base.in_features), generator=gen))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # starts as the identity edit

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a * self.scale).to(self.base.weight.dtype)
        return self.base


def add_lora(model: nn.Module, targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 8,
             alpha: float = 16.0, seed: int = 0, layers: Iterable[int] | None = None) -> list[nn.Parameter]:
    """Wrap the target linears of the decoder blocks in `layers` (default: every block); returns the new
    trainable parameters."""
    params = []
    chosen = range(len(model.blocks)) if layers is None else sorted(set(layers))
    for i in chosen:
        block = model.blocks[i]
        for j, name in enumerate(targets):
            base = getattr(block.attn, name)
            if isinstance(base, LoRALinear):
                raise ValueError(f"blocks.{i}.attn.{name} already has a LoRA adapter")
            lora = LoRALinear(base, rank, alpha, seed=seed * 1000 + i * len(targets) + j)
            setattr(block.attn, name, lora)
            params += [lora.lora_a, lora.lora_b]
    return params


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """{'blocks.{l}.attn.{name}.lora_a': ..., '.lora_b': ..., '.scale': ...} of every adapter."""
    out = {}
    for i, block in enumerate(model.blocks):
        for name, mod in block.attn.named_children():
            if isinstance(mod, LoRALinear):
                prefix = f"blocks.{i}.attn.{name}"
                out[f"{prefix}.lora_a"] = mod.lora_a.detach().clone()
                out[f"{prefix}.lora_b"] = mod.lora_b.detach().clone()
                out[f"{prefix}.scale"] = torch.tensor(mod.scale)
    return out


def merge_lora(model: nn.Module) -> None:
    for block in model.blocks:
        for name, mod in list(block.attn.named_children()):
            if isinstance(mod, LoRALinear):
                setattr(block.attn, name, mod.merged())


def apply_lora_state(state: dict[str, Tensor], weights: dict[str, Tensor]) -> None:
    """Fold stored factors into a dict of our parameter tensors (in place): W += scale * B A."""
    for key in [k for k in state if k.endswith(".lora_a")]:
        prefix = key[: -len(".lora_a")]
        w = weights[f"{prefix}.weight"]
        delta = state[f"{prefix}.lora_b"] @ state[key] * float(state[f"{prefix}.scale"])
        weights[f"{prefix}.weight"] = (w.float() + delta).to(w.dtype)
