"""Model registry: preset names and checkpoint families -> HookedAVModel builders.

`HookedAVModel.from_pretrained(name, checkpoint=...)` comes here. A preset fixes the expected architecture and
carries constants a checkpoint does not (sink dimensions and threshold, with provenance); the checkpoint directory
supplies the weights and the exact configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hooked_av.checkpoint import CheckpointError, load_into, read_config
from hooked_av.config import SinkConstants

from . import qwen2_5_omni

#: HF `model_type` values per family
FAMILY_MODEL_TYPES = {
    qwen2_5_omni.FAMILY: ("qwen2_5_omni", "qwen2_5_omni_thinker"),
}


def preset_names() -> list[str]:
    return sorted(qwen2_5_omni.PRESETS)


def _family_of(config: dict, path: str | os.PathLike) -> str:
    model_type = config.get("model_type")
    for family, types in FAMILY_MODEL_TYPES.items():
        if model_type in types:
            return family
    raise CheckpointError(
        f"{path}: model_type {model_type!r} is not a supported family "
        f"(supported: {', '.join(t for ts in FAMILY_MODEL_TYPES.values() for t in ts)})"
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


def _hf_thinker_config(config: dict, path: str | os.PathLike) -> Any:
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig

    if config.get("model_type") == "qwen2_5_omni":
        return Qwen2_5OmniConfig.from_pretrained(str(path)).thinker_config
    return Qwen2_5OmniThinkerConfig.from_pretrained(str(path))


def load_pretrained(
    name_or_path: str,
    checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    sinks: SinkConstants | None = None,
) -> Any:
    """Build a HookedAVModel from a preset name plus checkpoint directory, or from a checkpoint directory."""
    from accelerate import init_empty_weights

    preset = qwen2_5_omni.PRESETS.get(name_or_path.lower()) if isinstance(name_or_path, str) else None
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
    family = _family_of(config, checkpoint)
    if preset is not None and family != qwen2_5_omni.FAMILY:
        raise CheckpointError(f"preset {name_or_path!r} is a Qwen2.5-Omni model but {checkpoint} holds a "
                              f"{config.get('model_type')!r} checkpoint")
    hf_config = _hf_thinker_config(config, checkpoint)
    torch_dtype = _resolve_dtype(dtype, config)
    stored = config.get("hooked_av", {}).get("sinks")
    stored = SinkConstants(**{**stored, "dims": tuple(stored.get("dims", ()))}) if stored else None
    if sinks is None:
        # calibrated constants win: a checkpoint's own calibration over an uncalibrated preset placeholder
        candidates = [c for c in (preset["sinks"] if preset is not None else None, stored) if c is not None]
        sinks = next((c for c in candidates if c.calibrated), candidates[0] if candidates else None)
    model_name = name_or_path if preset is not None else config.get("hooked_av", {}).get("model_name", "custom")
    if preset is not None:
        shape = qwen2_5_omni.config_from_hf(hf_config)
        mismatch = {k: (v, getattr(shape, k)) for k, v in preset.items()
                    if k in ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_mlp")
                    and getattr(shape, k) != v}
        if mismatch:
            detail = ", ".join(f"{k}: preset {a}, checkpoint {b}" for k, (a, b) in mismatch.items())
            raise CheckpointError(f"{checkpoint} does not match preset {name_or_path!r} ({detail})")
    with init_empty_weights(include_buffers=False):
        model = qwen2_5_omni.build(hf_config, model_name=model_name, sinks=sinks, dtype=torch_dtype)
    tied = {"unembed.weight": "embed.weight"} if model.cfg.tie_word_embeddings else None
    load_into(model, checkpoint, qwen2_5_omni.from_hf_key, torch_dtype, device, tied=tied)
    model.cfg.device = str(device)
    return model.to(device).eval()


def from_hf_model(hf_model: Any, **overrides: Any) -> Any:
    name = type(getattr(hf_model, "thinker", hf_model)).__name__
    if name == qwen2_5_omni.HF_THINKER_CLASS:
        return qwen2_5_omni.from_hf_model(hf_model, **overrides)
    raise TypeError(f"no HookedAVModel family converts a {name}; supported: {qwen2_5_omni.HF_THINKER_CLASS}")
