"""Which model family a transformers `model_type` or model class belongs to, for errors that name both sides.

A checkpoint or in-memory model handed to the wrong family's loader must fail with a message that says what it
is and what was expected, not with a shape mismatch deep inside the conversion.
"""

from __future__ import annotations

#: family id -> display name
DISPLAY_NAMES: dict[str, str] = {
    "qwen2_5_omni": "Qwen2.5-Omni",
    "qwen3_omni": "Qwen3-Omni",
    "video_salmonn2": "video-SALMONN 2+",
    "video_salmonn_o1": "video-SALMONN-o1",
}

#: HF `model_type` values (full model and thinker) -> family id
MODEL_TYPES: dict[str, str] = {
    "qwen2_5_omni": "qwen2_5_omni",
    "qwen2_5_omni_thinker": "qwen2_5_omni",
    "qwen3_omni_moe": "qwen3_omni",
    "qwen3_omni_moe_thinker": "qwen3_omni",
    # video-SALMONN-o1's config class rewrites model_type (videosalmonno1.py); "qwen2_5_vl" is shared by
    # video-SALMONN 2+ and plain Qwen2.5-VL and is resolved by `family_of_config`
    "videosalmonno1": "video_salmonn_o1",
}

#: model_types of checkpoints the zoo recognises but does not load, for error messages
OTHER_MODEL_TYPES: dict[str, str] = {
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen2_vl": "Qwen2-VL",
    "qwen2": "Qwen2 (text only)",
    "llava": "LLaVA",
    "llava_onevision": "LLaVA-OneVision",
}

#: transformers thinker classes -> family id
HF_CLASSES: dict[str, str] = {
    "Qwen2_5OmniThinkerForConditionalGeneration": "qwen2_5_omni",
    "Qwen3OmniMoeThinkerForConditionalGeneration": "qwen3_omni",
    # the public repositories' classes (no transformers class exists for these families)
    "video_SALMONN2_plus": "video_salmonn2",
    "videoSALMONNo1ForCausalLM": "video_salmonn_o1",
}


class FamilyMismatchError(ValueError):
    """A config, checkpoint or model of one family given to another family's loader."""


def describe_model_type(model_type: str | None) -> str:
    """'a Qwen2.5-Omni checkpoint (model_type 'qwen2_5_omni')' or 'a checkpoint of model_type ...' if unknown."""
    family = MODEL_TYPES.get(model_type or "")
    if family is None:
        other = OTHER_MODEL_TYPES.get(model_type or "")
        if other is not None:
            return f"a {other} checkpoint (model_type {model_type!r}), which no family of the zoo supports"
        return f"a checkpoint of model_type {model_type!r}, which no family of the zoo supports"
    return f"a {DISPLAY_NAMES[family]} checkpoint (model_type {model_type!r})"


def family_of_config(config: dict) -> str | None:
    """The family of a checkpoint's config.json, or None. Unlike `MODEL_TYPES` this looks beyond model_type where
    it is ambiguous: video-SALMONN 2+ keeps Qwen2.5-VL's model_type 'qwen2_5_vl' and adds an `audio_config`
    (Whisper encoder + window-level Q-Former); a 'qwen2_5_vl' config without it is plain Qwen2.5-VL."""
    model_type = config.get("model_type")
    if model_type == "qwen2_5_vl":
        return "video_salmonn2" if isinstance(config.get("audio_config"), dict) else None
    return MODEL_TYPES.get(model_type or "")


def describe_config(config: dict) -> str:
    """What a checkpoint's config.json holds, for errors: 'a video-SALMONN 2+ checkpoint (model_type ...)'."""
    family = family_of_config(config)
    model_type = config.get("model_type")
    if family is not None:
        return f"a {DISPLAY_NAMES[family]} checkpoint (model_type {model_type!r})"
    if model_type == "qwen2_5_vl":
        return ("a Qwen2.5-VL checkpoint (model_type 'qwen2_5_vl' without the audio_config of video-SALMONN 2+), "
                "which no family of the zoo supports")
    return describe_model_type(model_type)


def describe_class(class_name: str) -> str:
    family = HF_CLASSES.get(class_name)
    if family is None:
        return f"a {class_name}, which no family of the zoo converts"
    return f"a {DISPLAY_NAMES[family]} model ({class_name})"
