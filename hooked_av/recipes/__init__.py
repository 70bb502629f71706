"""Generic recipes over the uniform hook names: they work on any `HookedAVModel`, never on model-specific code.

- `scoring`: answer probabilities (teacher-forced first token; the official max-over-generated-steps mode).
- `patching`: restore clean activations of a position set inside a corrupted run; indirect effects.
- `fast_patching`: the same restored runs at the cost of a few prefills (one clean pass shared by all, prefix
  reuse, only the changed positions recomputed, clean K/V substituted for the restored ones).
- `sinks`: sink values, per-layer and global sinks, sink-dimension calibration.
- `roles`: how much later video / audio queries attend each sink (MDS), unimodal vs cross-modal split.
- `amplify`: attention amplification on chosen keys (PAI-style), as a context manager.
- `mitigate`: decoding-time hallucination mitigation (amplification, AVCD-style contrastive decoding, the
  official adaptive two-cache guidance) for teacher-forced scoring and greedy generation.
"""

from . import amplify, fast_patching, mitigate, patching, roles, scoring, sinks

__all__ = ["amplify", "fast_patching", "mitigate", "patching", "roles", "scoring", "sinks"]
