"""What the benchmarks share: a timer, the mid-size random thinker they measure, clip-shaped inputs, and peak
resident memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from model_zoo.tiny import build_inputs, tiny_hf_thinker

#: attention heads / key-value heads of the benchmark thinker
N_HEADS, N_KV_HEADS = 8, 2
#: the paper's clips: 2 temporal grids of 9 x 16 merged tokens per 2-s chunk (V = 288), 25 audio tokens per second
GRID_H, GRID_W = 18, 32
#: prompt text after the audio-visual block in the official clips (METHOD §2.5: about 130 tokens)
PROMPT_TOKENS = 130


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_thinker(layers: int, d_model: int, seed: int, attn: str = "sdpa") -> Any:
    """A transformers Qwen2.5-Omni thinker with random weights and a decoder of the given size (mrope sections
    scaled to the head dim)."""
    d = d_model
    return tiny_hf_thinker(seed=seed, attn=attn, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                           num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
                           rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                mrope_section=[d // 64, 3 * d // 128, 3 * d // 128]))


def clip_inputs(seconds: int, prompt_tokens: int = PROMPT_TOKENS, seed: int = 0) -> dict[str, Any]:
    """Processor-shaped inputs of an audio-in-video clip laid out like the paper's: `seconds` temporal grids of
    GRID_H x GRID_W patches (144 merged tokens each, 2 per 2-s chunk), 100 mel frames per second (25 audio tokens
    per second), then `prompt_tokens` of prompt text. 10 s give about 1.85k tokens (1440 video, 250 audio)."""
    raw = build_inputs(kind="av", grid=(seconds, GRID_H, GRID_W), frames=100 * seconds, seed=seed)
    ids = raw["input_ids"][0]
    gen = torch.Generator().manual_seed(seed + 1)
    extra = torch.randint(0, 400, (max(0, prompt_tokens - 7),), generator=gen)
    ids = torch.cat([ids[:-7], extra, ids[-7:]])[None]
    return dict(raw, input_ids=ids, attention_mask=torch.ones_like(ids))


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since the process started or the last `reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
