"""What the CLI loads: a model, its tokenizer, its family's processor and clip reader, from `--model` /
`--checkpoint` (the processors of `model_zoo.processing`)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hooked_av import HookedAVModel, SinkConstants, media

TINY = "tiny"
#: sink constants for the tiny random thinker: its values are plain noise, so these only exercise the machinery
TINY_SINKS = SinkConstants(dims=(7, 11), tau=1.5, provenance="arbitrary (tiny random model)", calibrated=False)


@dataclass
class Runtime:
    model: Any
    tokenizer: Any
    process: Any  # (RawAV, prompt) -> processor outputs
    info: dict[str, Any]
    #: (video, audio=None) -> RawAV, with the frame sampling of the model family's public pipeline
    load: Any = field(default=functools.partial(media.load_av, fps=media.DEFAULT_FPS))


def load_runtime(model: str, checkpoint: str | None = None, dtype: str | None = None, device: str = "cpu",
                 seed: int = 0, sink_dims: tuple[int, ...] | None = None, tau: float | None = None,
                 device_map: Any = None, offload_folder: str | None = None) -> Runtime:
    """`model` is a preset name (with `checkpoint`), a checkpoint directory, or "tiny" (random, for tests). The
    processor and clip reader are the model family's (`model_zoo.processing.processing_for`)."""
    from model_zoo.processing import processing_for

    torch.manual_seed(seed)
    if model == TINY:
        from model_zoo.tiny import TinyTokenizer, tiny_hf_thinker

        hooked = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=seed), sinks=TINY_SINKS)
        tokenizer = TinyTokenizer()
        if device_map is not None:  # one model over several devices (hooked_av.dispatch)
            from hooked_av import dispatch

            dispatch.dispatch(hooked.eval(), dispatch.resolve_device_map(hooked, device_map), offload_folder)
    else:
        hooked = HookedAVModel.from_pretrained(model, checkpoint=checkpoint, dtype=dtype, device=device,
                                               device_map=device_map, offload_folder=offload_folder)
        tokenizer = _local_tokenizer(Path(checkpoint or model))
    if sink_dims is not None or tau is not None:
        s = hooked.cfg.sinks
        hooked.set_sinks(SinkConstants(dims=tuple(sink_dims) if sink_dims is not None else s.dims,
                                       tau=tau if tau is not None else s.tau, eps=s.eps,
                                       provenance="given on the command line", calibrated=True))
    hooked.eval()
    folder = Path(checkpoint or model)
    overrides = processor_overrides(folder) if model != TINY else {}
    processing = processing_for(hooked, tokenizer, **overrides)
    info = {"model": model, "checkpoint": checkpoint, "dtype": str(hooked.dtype), "device": str(hooked.device),
            "model_seed": seed if model == TINY else None,
            "weights": checkpoint_fingerprint(folder) if model != TINY else None,
            "sinks": hooked.cfg.sinks.to_dict(),
            "n_layers": hooked.cfg.n_layers, "torch": torch.__version__, "processor": overrides}
    return Runtime(hooked, tokenizer, processing.chat, info, load=processing.load_av)


#: weight files whose names and sizes enter a checkpoint's fingerprint
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def checkpoint_fingerprint(path: Path) -> str | None:
    """A cheap identity of a local checkpoint, recorded in every run's settings so that a resumed run never mixes
    records of two checkpoints: sha256 over config.json and the names and sizes of its weight files (an
    assembled organism's config carries the sha256 of its deltas). None for a preset name without a folder."""
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    config = path / "config.json"
    h.update(config.read_bytes() if config.exists() else b"-")
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _local_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint directory to read the tokenizer from (pass --checkpoint)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: no tokenizer files there ({e})") from None


def processor_overrides(path: Path) -> dict[str, Any]:
    """Processor settings stored with a checkpoint (`config.json` -> `hooked_av.processor`), e.g. the organism's
    small frame size; {} for checkpoints that use the released processor's defaults."""
    import json

    config = path / "config.json"
    if not config.is_file():
        return {}
    return dict(json.loads(config.read_text(encoding="utf-8")).get("hooked_av", {}).get("processor", {}))
