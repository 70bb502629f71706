"""What the benchmarks share: a timer and the mid-size random thinker they measure."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from model_zoo.tiny import tiny_hf_thinker

#: attention heads / key-value heads of the benchmark thinker
N_HEADS, N_KV_HEADS = 8, 2


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
