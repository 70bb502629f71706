"""Modality towers: a transformers encoder exposed under the uniform tower hook names.

The encoder itself is the model family's transformers class, unchanged (so its numerics are the reference's by
construction). A `HookedTower` adds `hook_in` (the features entering the encoder), `blocks.{l}.hook_resid_post`
(each encoder layer's output, through temporary forward hooks installed for the duration of the call) and
`hook_out` (the projected embeddings placed into the LLM sequence). One encoder can serve two towers (Qwen's
ViT encodes both images and videos); the towers then hold hooks only, and the model owns the encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class TowerBlockHooks(nn.Module):
    """Hook points of one encoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_post = HookPoint()


class HookedTower(nn.Module):
    """Hook points around a modality encoder owned elsewhere.

    Args:
        n_layers: number of encoder layers (one `blocks.{l}` entry each).
        order_note: how the per-layer hidden states are ordered (e.g. window order inside Qwen's ViT).
    """

    def __init__(self, n_layers: int, order_note: str = ""):
        super().__init__()
        self.hook_in = HookPoint()
        self.blocks = nn.ModuleList(TowerBlockHooks() for _ in range(n_layers))
        self.hook_out = HookPoint()
        self.order_note = order_note

    def run(self, encode: Callable[[Tensor], Tensor], features: Tensor, layers: list[nn.Module]) -> Tensor:
        """Run `encode(features)` with the tower's hooks firing; returns the hooked output embeddings.

        `layers` are the encoder's layer modules, in order (one `blocks.{l}.hook_resid_post` each).
        """
        features = self.hook_in(features)
        handles = []
        for block_hooks, layer in zip(self.blocks, layers, strict=True):
            handles.append(layer.register_forward_hook(_layer_hook(block_hooks.hook_resid_post)))
        try:
            out = encode(features)
        finally:
            for h in handles:
                h.remove()
        return self.hook_out(out)


def _layer_hook(hook_point: HookPoint) -> Callable[[nn.Module, Any, Any], Any]:
    def fire(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (hook_point(output[0]), *output[1:])
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = hook_point(output.last_hidden_state)
            return output
        return hook_point(output)

    return fire
