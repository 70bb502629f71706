"""Which model family a transformers `model_type` or model class belongs to, for errors that name both sides.

A checkpoint or in-memory model handed to the wrong family's loader must fail with a message that says what it
is and what was expected, not with a shape mismatch deep inside the conversion.
"""

from __future__ import annotations

#: family id -> display name
DISPLAY_NAMES: dict[str, str] = {
    "qwen2_5_omni": "Qwen2.5-Omni",
    "qwen3_omni": "Qwen3-Omni",
}

#: HF `model_type` values (full model and thinker) -> family id
MODEL_TYPES: dict[str, str] = {
    "qwen2_5_omni": "qwen2_5_omni",
    "qwen2_5_omni_thinker": "qwen2_5_omni",
    "qwen3_omni_moe": "qwen3_omni",
    "qwen3_omni_moe_thinker": "qwen3_omni",
}

#: transformers thinker classes -> family id
HF_CLASSES: dict[str, str] = {
    "Qwen2_5OmniThinkerForConditionalGeneration": "qwen2_5_omni",
    "Qwen3OmniMoeThinkerForConditionalGeneration": "qwen3_omni",
}


class FamilyMismatchError(ValueError):
    """A config, checkpoint or model of one family given to another family's loader."""


def describe_model_type(model_type: str | None) -> str:
    """'a Qwen2.5-Omni checkpoint (model_type 'qwen2_5_omni')' or 'a checkpoint of model_type ...' if unknown."""
    family = MODEL_TYPES.get(model_type or "")
    if family is None:
        return f"a checkpoint of model_type {model_type!r}, which no family of the zoo supports"
    return f"a {DISPLAY_NAMES[family]} checkpoint (model_type {model_type!r})"


def describe_class(class_name: str) -> str:
    family = HF_CLASSES.get(class_name)
    if family is None:
        return f"a {class_name}, which no family of the zoo converts"
    return f"a {DISPLAY_NAMES[family]} model ({class_name})"
