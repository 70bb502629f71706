"""hooked-av: TransformerLens-style interpretability for audio-visual LLMs.

    >>> from hooked_av import HookedAVModel
    >>> model = HookedAVModel.from_pretrained("qwen2.5-omni-7b", checkpoint="/models/Qwen2.5-Omni-7B")
    >>> logits, cache = model.run_with_cache(**processor_outputs)
    >>> cache["pattern", 0].shape  # [batch, head, query_pos, key_pos]

nnsight interop lives in `hooked_av.integrations.nnsight` and is never imported from here (nnsight patches global
state on import).
"""

from . import hook_names
from .config import AVModelConfig, SinkConstants, TokenIds
from .inputs import LayoutError, Modality, ModalityMap
from .model import AVInputs, DecodeState, GenerateOutput, HookedAVModel

__all__ = [
    "AVInputs", "AVModelConfig", "DecodeState", "GenerateOutput", "HookedAVModel", "LayoutError", "Modality",
    "ModalityMap", "SinkConstants", "TokenIds", "hook_names",
]
__version__ = "0.1.0"
