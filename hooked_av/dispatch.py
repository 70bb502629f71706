"""One model over several devices: accelerate's big-model dispatch on a HookedAVModel.

`HookedAVModel.from_pretrained(..., device_map=...)` builds the model empty, resolves the map (accelerate's
`infer_auto_device_map` for "auto" / "balanced" / "balanced_low_0" / "sequential", or a given
{module name: device} dict, or one device), streams each checkpoint tensor straight onto the device of its module
and then calls `accelerate.dispatch_model`. accelerate's hooks move each module's inputs to its execution device;
modules mapped to "cpu" (with an accelerator as main device) or "disk" keep their weights there and load them for
the duration of their forward. Decoder blocks and the modality encoders are never split.

TransformerLens hook points are plain modules inside the blocks, so hooks fire on the device of the block that
computes the activation; `run_with_cache` keeps each activation where it was computed (pass `device=` to gather
them). Recipes that read activations of several layers move what they combine to the device of the layer at hand
(`execution_device`), and read weights of offloaded modules through `parameter`.

Nothing here imports accelerate until a map is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

#: device_map strings resolved by accelerate's `infer_auto_device_map`
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: our decoder block class: one block is always on one device
BLOCK_CLASSES = ("TransformerBlock",)

DeviceMap = dict[str, "str | int | torch.device"]


class DeviceMapError(ValueError):
    """A device_map that does not fit the model (unknown module, parameters left out, disk without a folder)."""


def no_split_module_classes(model: nn.Module) -> list[str]:
    """Classes kept whole on one device: the decoder block, and each transformers encoder the model holds
    (their forward reads their own weights directly in places, e.g. a dtype or a positional table)."""
    from transformers import PreTrainedModel

    names = list(BLOCK_CLASSES)
    for child in model.children():
        if isinstance(child, PreTrainedModel) and type(child).__name__ not in names:
            names.append(type(child).__name__)
    return names


def resolve_device_map(
    model: nn.Module,
    device_map: str | int | torch.device | Mapping[str, Any],
    max_memory: Mapping[Any, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> DeviceMap:
    """{module name: device} for `model` (whose parameters may be on the meta device)."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = no_split_module_classes(model)
        memory = dict(max_memory) if max_memory is not None else None
        if device_map != "sequential":
            memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=device_map == "balanced_low_0")
        return dict(infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype))
    if isinstance(device_map, (str, int, torch.device)):
        return {"": device_map if not isinstance(device_map, torch.device) else str(device_map)}
    if not isinstance(device_map, Mapping):
        raise DeviceMapError(f"device_map must be one of {', '.join(STRATEGIES)}, a device, or a "
                             f"{{module name: device}} dict; got {type(device_map).__name__}")
    resolved = dict(device_map)
    modules = dict(model.named_modules())
    unknown = [k for k in resolved if k not in modules]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], [n for n in modules if n], n=3)
        raise DeviceMapError(f"device_map names {unknown[0]!r}, which is not a module of the model"
                             + (f" (closest: {', '.join(close)})" if close else ""))
    left = [n for n, _ in model.named_parameters() if _device_entry(resolved, n) is None]
    if left:
        raise DeviceMapError(f"device_map leaves {len(left)} parameter(s) without a device, e.g. {left[:3]}; "
                             "map their modules too (or '' for the rest)")
    if "" in resolved and len(resolved) > 1:
        return _partition(model, resolved)
    return resolved


def _partition(model: nn.Module, device_map: Mapping[str, Any]) -> DeviceMap:
    """A map with '' for "the rest" as accelerate's dispatch needs it: disjoint entries covering every
    parameter and buffer ('' itself would put the whole model on its device, over the named modules)."""
    rest = device_map[""]
    named = {k: v for k, v in device_map.items() if k}
    out: DeviceMap = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full in named:
                out[full] = named[full]
            elif any(k.startswith(full + ".") for k in named):
                visit(full + ".", child)
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out[full] = rest
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            out[f"{prefix}{name}"] = named.get(f"{prefix}{name}", rest)

    visit("", model)
    return out


def _device_entry(device_map: Mapping[str, Any], name: str) -> Any:
    """The map's device for parameter / module `name`: the entry of the longest module prefix."""
    best, found = -1, None
    for key, dev in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if len(key) > best:
                best, found = len(key), dev
    return found


def loading_device(device_map: Mapping[str, Any], name: str) -> torch.device:
    """Where a parameter is loaded before dispatch: its mapped device; "disk" loads to the CPU (dispatch then
    writes it to the offload folder and frees it)."""
    dev = _device_entry(device_map, name)
    if dev is None:
        raise DeviceMapError(f"device_map gives no device for {name!r}")
    return torch.device("cpu") if dev == "disk" else _as_device(dev)


def _as_device(dev: Any) -> torch.device:
    return torch.device(f"cuda:{dev}") if isinstance(dev, int) else torch.device(dev)


def dispatch(
    model: nn.Module,
    device_map: Mapping[str, Any],
    offload_folder: str | os.PathLike | None = None,
    main_device: str | torch.device | None = None,
) -> nn.Module:
    """accelerate's `dispatch_model` on a model whose weights are loaded (on their mapped devices or the CPU).
    Sets `model.hf_device_map`; `model.device` is then the execution device of the token embedding."""
    from accelerate import dispatch_model

    if "disk" in set(device_map.values()) and offload_folder is None:
        disk = [k for k, v in device_map.items() if v == "disk"]
        raise DeviceMapError(f"device_map puts {disk[:3]} on 'disk': pass offload_folder=<a folder for their "
                             "weights>")
    if offload_folder is not None:
        os.makedirs(offload_folder, exist_ok=True)
    dispatch_model(model, device_map=dict(device_map), main_device=main_device,
                   offload_dir=str(offload_folder) if offload_folder is not None else None)
    model.hf_device_map = dict(device_map)
    return model


def execution_device(module: nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device a module computes on: its accelerate hook's execution device when dispatched, else the device
    of its first materialised parameter (or buffer), else `default`."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return default


def parameter(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A parameter's value on the module's execution device, also when accelerate keeps it offloaded (on the meta
    device outside the module's forward)."""
    value = getattr(module, name)
    if value.device.type != "meta" or not hasattr(module, "_hf_hook"):
        return value
    from accelerate.utils import align_module_device

    with align_module_device(module):
        return getattr(module, name).detach().clone()


def on_device(device: torch.device | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`t -> t.to(device)` (identity when `device` is None or already right)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t if device is None or t.device == device else t.to(device)

    return move
