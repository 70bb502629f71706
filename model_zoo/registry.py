"""Model registry: preset names and checkpoint families -> HookedAVModel builders.

`HookedAVModel.from_pretrained(name, checkpoint=...)` comes here. A preset fixes the expected architecture and
carries constants a checkpoint does not (sink dimensions and threshold, with provenance); the checkpoint directory
supplies the weights and the exact configuration. A checkpoint of one family given to another family's preset
fails with an error that names both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hooked_av.checkpoint import CheckpointError, load_into, read_config
from hooked_av.config import SinkConstants

from . import qwen2_5_omni, qwen3_omni, video_salmonn2, video_salmonn_o1
from .families import DISPLAY_NAMES, describe_class, describe_config


def _qwen25_hf_thinker_config(config: dict, path: str | os.PathLike) -> Any:
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig

    if config.get("model_type") == "qwen2_5_omni":
        return Qwen2_5OmniConfig.from_pretrained(str(path)).thinker_config
    return Qwen2_5OmniThinkerConfig.from_pretrained(str(path))


def _qwen3_hf_thinker_config(config: dict, path: str | os.PathLike) -> Any:
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig

    if config.get("model_type") == "qwen3_omni_moe":
        return Qwen3OmniMoeConfig.from_pretrained(str(path)).thinker_config
    return Qwen3OmniMoeThinkerConfig.from_pretrained(str(path))


@dataclass(frozen=True)
class Family:
    """What the registry needs of a model family module."""

    name: str
    model_types: tuple[str, ...]
    hf_thinker_class: str
    presets: dict[str, dict[str, Any]]
    #: preset fields compared with the checkpoint's config on loading
    checked_fields: tuple[str, ...]
    hf_thinker_config: Callable[[dict, str | os.PathLike], Any]
    config_from_hf: Callable[..., Any]
    build: Callable[..., Any]
    #: checkpoint key -> our parameter (or slice of one), given the model's config
    key_mapper: Callable[[Any], Callable[[str], Any]]
    from_hf_model: Callable[..., Any]
    #: whether a checkpoint's config.json belongs to the family (default: its model_type is in `model_types`)
    accepts: Callable[[dict], bool] | None = None
    #: weight loading replacing `load_into` (families whose weights come from several directories);
    #: called as load_weights(model, checkpoint, dtype=..., device=..., tied=..., **options)
    load_weights: Callable[..., None] | None = None
    #: keyword options of `load_pretrained` this family takes (passed to `load_weights`)
    options: tuple[str, ...] = ()

    @property
    def display_name(self) -> str:
        return DISPLAY_NAMES[self.name]

    def accepts_config(self, config: dict) -> bool:
        if self.accepts is not None:
            return self.accepts(config)
        return config.get("model_type") in self.model_types


FAMILIES: dict[str, Family] = {
    qwen2_5_omni.FAMILY: Family(
        name=qwen2_5_omni.FAMILY,
        model_types=("qwen2_5_omni", "qwen2_5_omni_thinker"),
        hf_thinker_class=qwen2_5_omni.HF_THINKER_CLASS,
        presets=qwen2_5_omni.PRESETS,
        checked_fields=("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_mlp"),
        hf_thinker_config=_qwen25_hf_thinker_config,
        config_from_hf=qwen2_5_omni.config_from_hf,
        build=qwen2_5_omni.build,
        key_mapper=lambda cfg: qwen2_5_omni.from_hf_key,
        from_hf_model=qwen2_5_omni.from_hf_model,
    ),
    qwen3_omni.FAMILY: Family(
        name=qwen3_omni.FAMILY,
        model_types=qwen3_omni.MODEL_TYPES,
        hf_thinker_class=qwen3_omni.HF_THINKER_CLASS,
        presets=qwen3_omni.PRESETS,
        checked_fields=qwen3_omni.PRESET_CHECKED,
        hf_thinker_config=_qwen3_hf_thinker_config,
        config_from_hf=qwen3_omni.config_from_hf,
        build=qwen3_omni.build,
        key_mapper=qwen3_omni.key_mapper,
        from_hf_model=qwen3_omni.from_hf_model,
    ),
    video_salmonn2.FAMILY: video_salmonn2.registry_family(Family),
    video_salmonn_o1.FAMILY: video_salmonn_o1.registry_family(Family),
}

#: HF `model_type` values per family
FAMILY_MODEL_TYPES = {name: fam.model_types for name, fam in FAMILIES.items()}


def preset_names() -> list[str]:
    return sorted(name for fam in FAMILIES.values() for name in fam.presets)


def find_preset(name: str) -> tuple[Family, dict[str, Any]] | None:
    """(family, preset) of a preset name (case-insensitive), or None."""
    for fam in FAMILIES.values():
        preset = fam.presets.get(name.lower())
        if preset is not None:
            return fam, preset
    return None


def _family_of(config: dict, path: str | os.PathLike) -> Family:
    model_type = config.get("model_type")
    for fam in FAMILIES.values():
        if fam.accepts_config(config):
            return fam
    raise CheckpointError(
        f"{path}: model_type {model_type!r} is not a supported family "
        f"(supported: {', '.join(t for ts in FAMILY_MODEL_TYPES.values() for t in ts)}): {describe_config(config)}"
    )


def _resolve_dtype(dtype: torch.dtype | str | None, config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        thinker = config.get("thinker_config", config)
        name = thinker.get("dtype") or thinker.get("torch_dtype") or config.get("torch_dtype")
        if dtype is None or name is None:
            return torch.float32
        dtype = name
    try:
        value = getattr(torch, str(dtype).replace("torch.", ""))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def load_pretrained(
    name_or_path: str,
    checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    sinks: SinkConstants | None = None,
    device_map: Any = None,
    max_memory: Any = None,
    offload_folder: str | os.PathLike | None = None,
    **options: Any,
) -> Any:
    """Build a HookedAVModel from a preset name plus checkpoint directory, or from a checkpoint directory.

    `options` are family-specific loading options (`Family.options`, e.g. video-SALMONN-o1's
    `vision_checkpoint` / `whisper_checkpoint` for encoder weights kept outside its checkpoint).
    `device_map` (with `max_memory`, `offload_folder`) dispatches the model over several devices
    (`hooked_av.dispatch`) instead of placing it on `device`."""
    from accelerate import init_empty_weights

    found = find_preset(name_or_path) if isinstance(name_or_path, str) else None
    preset_family, preset = found if found is not None else (None, None)
    if preset is None and checkpoint is None and Path(name_or_path).is_dir():
        checkpoint = name_or_path
    if preset is None and checkpoint is None:
        raise ValueError(
            f"unknown model {name_or_path!r}: expected a preset ({', '.join(preset_names())}) with "
            f"checkpoint=<local HF directory>, or a checkpoint directory"
        )
    if checkpoint is None:
        raise ValueError(
            f"preset {name_or_path!r} needs checkpoint=<local directory of the released weights>; "
            "nothing is downloaded at run time"
        )
    config = read_config(checkpoint)
    if preset_family is not None and not preset_family.accepts_config(config):
        raise CheckpointError(f"preset {name_or_path!r} is a {preset_family.display_name} model but {checkpoint} "
                              f"holds {describe_config(config)}")
    family = _family_of(config, checkpoint)
    unknown = sorted(set(options) - set(family.options))
    if unknown:
        accepted = ", ".join(family.options) or "none"
        raise TypeError(f"unknown loading option(s) {unknown} for a {family.display_name} checkpoint "
                        f"(accepted: {accepted})")
    hf_config = family.hf_thinker_config(config, checkpoint)
    torch_dtype = _resolve_dtype(dtype, config)
    stored = config.get("hooked_av", {}).get("sinks")
    stored = SinkConstants(**{**stored, "dims": tuple(stored.get("dims", ()))}) if stored else None
    if sinks is None:
        # calibrated constants win: a checkpoint's own calibration over an uncalibrated preset placeholder
        candidates = [c for c in (preset["sinks"] if preset is not None else None, stored) if c is not None]
        sinks = next((c for c in candidates if c.calibrated), candidates[0] if candidates else None)
    model_name = name_or_path if preset is not None else config.get("hooked_av", {}).get("model_name", "custom")
    if preset is not None:
        shape = family.config_from_hf(hf_config)
        mismatch = {k: (v, getattr(shape, k)) for k, v in preset.items()
                    if k in family.checked_fields and _normalised(getattr(shape, k)) != _normalised(v)}
        if mismatch:
            detail = ", ".join(f"{k}: preset {a}, checkpoint {b}" for k, (a, b) in mismatch.items())
            raise CheckpointError(f"{checkpoint} does not match preset {name_or_path!r} ({detail})")
    with init_empty_weights(include_buffers=False):
        model = family.build(hf_config, model_name=model_name, sinks=sinks, dtype=torch_dtype)
    tied = {"unembed.weight": "embed.weight"} if model.cfg.tie_word_embeddings else None
    if device_map is not None:
        return _load_dispatched(model, family, checkpoint, torch_dtype, tied, options, device, device_map,
                                max_memory, offload_folder)
    if family.load_weights is not None:
        family.load_weights(model, checkpoint, dtype=torch_dtype, device=device, tied=tied, **options)
    else:
        load_into(model, checkpoint, family.key_mapper(model.cfg), torch_dtype, device, tied=tied)
    model.cfg.device = str(device)
    return model.to(device).eval()


def _load_dispatched(model: Any, family: Family, checkpoint: str | os.PathLike, dtype: torch.dtype,
                     tied: dict[str, str] | None, options: dict[str, Any], device: Any, device_map: Any,
                     max_memory: Any, offload_folder: str | os.PathLike | None) -> Any:
    """Load the weights of an empty model straight onto the devices of a device_map, then dispatch it."""
    from hooked_av import dispatch

    if str(device) != "cpu":
        raise ValueError(f"pass device= or device_map=, not both (device={device!r}, device_map={device_map!r})")
    resolved = dispatch.resolve_device_map(model, device_map, max_memory=max_memory, dtype=dtype)
    if family.load_weights is not None:  # family loaders take one device: stage on the CPU, dispatch moves them
        family.load_weights(model, checkpoint, dtype=dtype, device="cpu", tied=tied, **options)
    else:
        load_into(model, checkpoint, family.key_mapper(model.cfg), dtype,
                  lambda name: dispatch.loading_device(resolved, name), tied=tied)
    dispatch.dispatch(model.eval(), resolved, offload_folder=offload_folder)
    model.cfg.device = str(model.device)
    return model


def _normalised(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def from_hf_model(hf_model: Any, **overrides: Any) -> Any:
    name = type(getattr(hf_model, "thinker", hf_model)).__name__
    for fam in FAMILIES.values():
        if name == fam.hf_thinker_class:
            return fam.from_hf_model(hf_model, **overrides)
    supported = ", ".join(fam.hf_thinker_class for fam in FAMILIES.values())
    raise TypeError(f"no HookedAVModel family converts {describe_class(name)}; supported: {supported}")
