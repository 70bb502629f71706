"""Reading and writing HF-format checkpoints without ever holding two copies of the weights.

Loading builds the model with empty (meta) parameters, then streams tensors one at a time from the safetensors
shards straight into their final dtype and device. Saving writes transformers-compatible shards plus an index.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write, atomic_write_text

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (missing files, missing or unexpected weights)."""


def rename(key: str, rules: Sequence[tuple[str, str]]) -> str | None:
    """`key` renamed by the first (regex, replacement) rule that matches all of it; None when none does. The one
    place checkpoint-layout converters turn a parameter name from one naming scheme into another."""
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def read_config(path: str | os.PathLike) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF checkpoint directory)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (index order, or the single file)."""
    root = Path(path)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are absent: {missing}")
        return [root / f for f in files]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    found = sorted(p.name for p in root.glob("*.safetensors"))
    if found:
        return [root / f for f in found]
    raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")


def iter_checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, loader) for every tensor of every shard; each loader reads one tensor when called."""
    from safetensors import safe_open

    for shard in shard_files(path):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                yield key, (lambda f=f, key=key: f.get_tensor(key))


#: Where a checkpoint tensor goes: a parameter name, or (name, index) for a slice of a stacked parameter
#: (e.g. one expert's gate_proj inside [n_experts, 2 * d_expert, d_model]); None to skip the tensor.
Target = str | tuple[str, tuple] | None


def load_into(
    model: nn.Module,
    path: str | os.PathLike,
    map_key: Callable[[str], Target],
    dtype: torch.dtype,
    device: torch.device | str | Callable[[str], torch.device | str],
    tied: dict[str, str] | None = None,
    extra_sources: Sequence[tuple[str | os.PathLike, Callable[[str], Target]]] = (),
) -> None:
    """Stream the checkpoint at `path` into `model`, whose parameters may be on the meta device.

    `map_key` gives our parameter name for a checkpoint key (None to skip it), or (name, index) when the tensor
    fills `param[index]` of a stacked parameter; such a parameter is complete when its slices cover all of it.
    `tied` maps a parameter to the one it shares storage with when the checkpoint omits it (e.g. a tied lm_head).
    `extra_sources` are further (directory, map_key) pairs read after `path`; they fill only the (non-stacked)
    parameters still missing (e.g. encoder weights a family's checkpoint leaves to the encoder's own release).
    `device` is one device, or a function of the parameter name (a device_map: each weight goes straight to the
    device of its module).
    """
    device_of = device if callable(device) else (lambda name: device)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    unexpected: list[str] = []
    stacked: dict[str, torch.Tensor] = {}  # name -> buffer being filled slice by slice
    covered: dict[str, int] = {}  # name -> elements filled so far
    slices: dict[str, set[str]] = {}  # name -> the slices filled so far

    def tensors() -> Iterator[tuple[str | os.PathLike, Callable[[str], Target], bool, str, Callable]]:
        for source, mapper, extra in [(path, map_key, False), *((p, m, True) for p, m in extra_sources)]:
            for key, load in iter_checkpoint_tensors(source):
                yield source, mapper, extra, key, load

    for source, mapper, extra, key, load in tensors():
        try:
            target = mapper(key)
        except KeyError as e:
            unexpected.append(f"{key} ({e})")
            continue
        if target is None:
            continue
        name, index = (target, None) if isinstance(target, str) else target
        if name not in params:
            unexpected.append(key if not extra else f"{source}: {key}")
            continue
        if extra and (index is not None or name in loaded):
            continue
        tensor = load()
        if index is None:
            expected = tuple(params[name].shape)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {expected}")
            _set_parameter(model, name, tensor.to(device=device_of(name), dtype=dtype))
            loaded.add(name)
            continue
        if name not in stacked:
            stacked[name] = torch.empty(params[name].shape, dtype=dtype, device=device_of(name))
            covered[name] = 0
            slices[name] = set()
        if repr(index) in slices[name]:
            raise CheckpointError(f"{path}: {key} fills a slice of {name} that another tensor already filled")
        slices[name].add(repr(index))
        try:
            view = stacked[name][index]
        except IndexError as e:
            shape = tuple(params[name].shape)
            raise CheckpointError(f"{path}: {key} maps outside {name} of shape {shape} ({e})") from None
        if tuple(tensor.shape) != tuple(view.shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, its slice of {name} expects "
                                  f"{tuple(view.shape)}")
        view.copy_(tensor)
        covered[name] += tensor.numel()
    for name, buffer in stacked.items():
        if covered[name] > buffer.numel():
            raise CheckpointError(f"{path}: the checkpoint slices of {name} overlap")
        if covered[name] == buffer.numel():
            _set_parameter(model, name, buffer)
            loaded.add(name)
    for name, source in (tied or {}).items():
        if name not in loaded and source in loaded:
            owner, attr = _owner(model, name)
            src_owner, src_attr = _owner(model, source)
            setattr(owner, attr, getattr(src_owner, src_attr))
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected weight(s), e.g. {unexpected[:5]}")
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weight(s) missing from the checkpoint, e.g. {missing[:5]}")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attr


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, attr = _owner(model, name)
    owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def save_hf_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    to_hf_key: Callable[[str], str],
    max_shard_bytes: int = 2 * 2**30,
    to_hf_tensors: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None,
    architecture: str = "Qwen2_5OmniThinkerForConditionalGeneration",
) -> None:
    """Write config.json and safetensors shards (+ index) in the family's HF layout, atomically per file.

    `to_hf_tensors(name, tensor)`, when given, replaces `to_hf_key` and may split one parameter into several
    checkpoint tensors (e.g. stacked experts into per-expert weights). `architecture` is written to config.json
    when the model's HF config names none.
    """
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():  # remove_duplicate=True: tied weights once
        if id(param) in seen:
            continue
        seen.add(id(param))
        tensor = param.detach()
        items = to_hf_tensors(name, tensor) if to_hf_tensors is not None else [(to_hf_key(name), tensor)]
        for key, value in items:
            state[key] = value.contiguous().cpu()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for shard, fname in zip(shards, names):
        atomic_write(root / fname, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: names[i] for i, s in enumerate(shards) for k in s}}
        atomic_write_text(root / INDEX_FILE, json.dumps(index, indent=2))
    hf_config = getattr(model, "hf_config", None)
    if hf_config is not None:
        config = hf_config.to_dict()
        config["architectures"] = config.get("architectures") or [architecture]
        config["hooked_av"] = {"model_name": model.cfg.model_name, "sinks": model.cfg.sinks.to_dict()}
        atomic_write_text(root / "config.json", json.dumps(config, indent=2, default=str))
