"""nnsight interop: trace a HookedAVModel with nnsight, reaching every activation by its hook name.

Every activation of a `HookedAVModel` passes through a TransformerLens `HookPoint` module whose attribute path is
its hook name, so once the model is wrapped in `nnsight.NNsight` the nnsight envoy of a hook name is the same
path: `wrapped.blocks[1].hook_resid_pre`, `wrapped.blocks[0].attn.hook_pattern`, `wrapped.audio_tower.hook_out`.
Processor outputs go to `trace` as keyword tensors, exactly as to the model itself.

    >>> import torch
    >>> from hooked_av.integrations.nnsight import envoy, wrapped_model
    >>> with wrapped_model(model, eager_attention=True) as traced:
    ...     with traced.trace(**processor_outputs):
    ...         resid = traced.blocks[1].hook_resid_pre.output.save()
    ...         pattern = envoy(traced, "blocks.1.attn.hook_pattern").output.save()
    ...         traced.blocks[1].hook_attn_out.output = torch.zeros_like(traced.blocks[1].hook_attn_out.output)
    ...         logits = traced.output.save()

Read envoys in execution order (nnsight's rule): a block's sites run resid_pre, sink, ln1, attn (q, k, v, rot_q,
rot_k, attn_scores, pattern, z), attn_out, resid_mid, ln2, mlp, mlp_out, resid_post; the towers run before the
decoder (`hook_embed`). nnsight wraps one call per trace; several invokes (batching) are not supported by a plain
`NNsight` wrapper, so pass a batch the way the processor collates it.

Design. Some hook points only fire when something is listening through TransformerLens: attention runs through
sdpa unless a TL hook sits on `attn.hook_attn_scores` / `attn.hook_pattern`, and `blocks.{l}.hook_sink` is only
computed while hooked. nnsight does not use TL hooks, so `wrap` switches the model's own flags instead:

* `eager_attention=True` sets every `block.attn.force_eager`, so the attention maps are computed and their hook
  points fire (slower than sdpa, and one layer's [batch, head, query, key] map exists at a time). With
  `single_attention_block=True` (the default) the map of a layer is computed in one block, so
  `hook_pattern.output` is the whole map; memory grows with the square of the sequence length. With
  `single_attention_block=False` the model's configured query-row blocking stays (`cfg.eager_attn_block_rows` /
  `eager_attn_block_bytes`) and each block is a separate call of the hook point: `.output` is the first block, and
  `for _ in tracer.iter[:n_blocks]` reads them all (`hook.query_slice` says which query rows a block holds).
* `sink_hooks=True` sets every `block.always_run_sink_hook`, so `hook_sink` fires (cheap).

These flags live on the model, so they also affect plain calls of the model while it is wrapped. `unwrap` (or
leaving the `wrapped_model` context manager, the recommended form) puts back the values they had before `wrap`.
nnsight itself instruments the modules in place on wrapping; that instrumentation is inert outside a trace and
stays after `unwrap`.

nnsight is imported inside these functions only: importing it patches global state (a `.save` on every object,
`Tensor.backward`), so neither `hooked_av` nor this module imports it at import time.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import hook_names
from ..model import HookedAVModel

if TYPE_CHECKING:
    from nnsight import Envoy, NNsight

__all__ = ["envoy", "unwrap", "wrap", "wrapped_model"]

#: attribute of the NNsight wrapper holding the flags to restore on `unwrap`
_RESTORE_ATTR = "_hooked_av_restore"


@dataclass
class _SavedFlags:
    """The model flags `wrap` changed, with the values they had before."""

    force_eager: list[bool]
    always_run_sink_hook: list[bool]
    eager_attn_block_rows: int | None
    restored: bool = False


def wrap(
    model: HookedAVModel,
    eager_attention: bool = False,
    sink_hooks: bool = True,
    single_attention_block: bool = True,
) -> NNsight:
    """Wrap a HookedAVModel in `nnsight.NNsight`, with the model's hook names as envoy paths.

    The model is wrapped in place (nnsight shares its modules and weights). The flags below are set on the model
    until `unwrap`; prefer the `wrapped_model` context manager, which restores them on exit.

    Args:
        model: the hooked model to trace.
        eager_attention: compute attention eagerly so `blocks.{l}.attn.hook_attn_scores` and
            `blocks.{l}.attn.hook_pattern` fire (they never do under the default sdpa path). Slows the model down
            and materialises attention maps.
        sink_hooks: compute `blocks.{l}.hook_sink` on every forward so its envoy is reachable.
        single_attention_block: with `eager_attention`, compute each layer's attention map in one query block, so
            the pattern and score envoys see the whole [batch, head, query, key] map in one call. False keeps the
            model's query-row blocking (less memory; each block is a separate call, read with `tracer.iter`).

    Returns:
        The `nnsight.NNsight` wrapper: `with wrapped.trace(**processor_outputs): ...`.

    Raises:
        TypeError: `model` is not a HookedAVModel (e.g. it is already an nnsight wrapper).
    """
    if not isinstance(model, HookedAVModel):
        raise TypeError(f"wrap expects a HookedAVModel, got {type(model).__name__}")
    from nnsight import NNsight

    saved = _SavedFlags(
        force_eager=[block.attn.force_eager for block in model.blocks],
        always_run_sink_hook=[block.always_run_sink_hook for block in model.blocks],
        eager_attn_block_rows=model.cfg.eager_attn_block_rows,
    )
    for block in model.blocks:
        if eager_attention:
            block.attn.force_eager = True
        if sink_hooks:
            block.always_run_sink_hook = True
    if eager_attention and single_attention_block:
        model.cfg.eager_attn_block_rows = 1 << 40  # one block: all query rows (as run_with_cache with pos_slice)
    wrapped = NNsight(model)
    setattr(wrapped, _RESTORE_ATTR, saved)  # a plain value: stored on the envoy, not on the model
    return wrapped


def unwrap(wrapped: Envoy) -> HookedAVModel:
    """Restore the model flags that `wrap` set and return the underlying HookedAVModel.

    The wrapper can still trace afterwards, but with the model's own settings (sdpa attention, no sink hook
    unless TL-hooked). Unwrapping twice is harmless. Wrappers of one model should be unwrapped in the reverse order
    of wrapping.

    Args:
        wrapped: a wrapper returned by `wrap`.

    Returns:
        The wrapped HookedAVModel.

    Raises:
        TypeError: `wrapped` was not made by `wrap`.
    """
    model = _model_of(wrapped)
    saved = getattr(wrapped, _RESTORE_ATTR, None)
    if not isinstance(saved, _SavedFlags):
        raise TypeError("unwrap expects a wrapper made by hooked_av.integrations.nnsight.wrap")
    if not saved.restored:
        for block, eager, sink in zip(model.blocks, saved.force_eager, saved.always_run_sink_hook, strict=True):
            block.attn.force_eager = eager
            block.always_run_sink_hook = sink
        model.cfg.eager_attn_block_rows = saved.eager_attn_block_rows
        saved.restored = True
    return model


@contextlib.contextmanager
def wrapped_model(
    model: HookedAVModel,
    eager_attention: bool = False,
    sink_hooks: bool = True,
    single_attention_block: bool = True,
) -> Iterator[NNsight]:
    """`wrap` for the duration of a `with` block, then `unwrap` (also when the block raises).

    Args:
        model: the hooked model to trace.
        eager_attention: see `wrap`.
        sink_hooks: see `wrap`.
        single_attention_block: see `wrap`.

    Yields:
        The `nnsight.NNsight` wrapper.
    """
    wrapped = wrap(model, eager_attention=eager_attention, sink_hooks=sink_hooks,
                   single_attention_block=single_attention_block)
    try:
        yield wrapped
    finally:
        unwrap(wrapped)


def envoy(wrapped: Envoy, name: str) -> Envoy:
    """The envoy of a hook name, e.g. `envoy(wrapped, "blocks.1.attn.hook_pattern").output`.

    Args:
        wrapped: a wrapper of a HookedAVModel (from `wrap`, or any `nnsight.NNsight(model)`).
        name: a full hook name of the model (`hooked_av.hook_names` builds them).

    Returns:
        The envoy of that HookPoint; the same object as the attribute path (`wrapped.blocks[1].attn.hook_pattern`).

    Raises:
        hooked_av.hook_names.UnknownHookNameError: the model has no such hook; the message lists the closest names.
        TypeError: `wrapped` does not wrap a HookedAVModel.
    """
    model = _model_of(wrapped)
    hook_names.check_hook_name(name, model.hook_dict)
    node: Any = wrapped
    for part in name.split("."):
        # nnsight mounts a submodule whose name it already serves (`output`, `source`, ...) under a prefix
        if not part.startswith("_") and inspect.isdatadescriptor(getattr(type(node), part, None)):
            part = f"{node.OVERLOAD_PREFIX}{part}"
        node = getattr(node, part)
    return node


def _model_of(wrapped: Any) -> HookedAVModel:
    model = getattr(wrapped, "_module", None)  # nnsight's Envoy keeps the wrapped module here
    if not isinstance(model, HookedAVModel):
        raise TypeError(f"expected an nnsight wrapper of a HookedAVModel, got {type(wrapped).__name__}")
    return model
