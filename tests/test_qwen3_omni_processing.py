"""Qwen3-Omni processor glue against transformers' Qwen3OmniMoeProcessor pieces, and end to end through the model.

transformers' processor cannot be constructed without torchvision (its video processor class check), so the test
builds it around that check for text, audio and images, and calls its audio-in-video interleaving directly.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hooked_av import HookedAVModel
from hooked_av.config import TokenIds
from hooked_av.media import RawAV
from model_zoo.qwen3_omni_processing import Qwen3OmniMediaProcessor, audio_in_video_ids
from model_zoo.tiny_qwen3_omni import MEL, TOK, tiny_hf_thinker

#: video pixel bounds small enough for the tiny ViT (the released ones upscale every frame to >= 128 x 32²)
SMALL_VIDEO = dict(video_min_pixels=32 * 32 * 4, video_max_pixels=32 * 32 * 12)


@pytest.fixture(scope="module")
def hf3():
    return tiny_hf_thinker(seed=0, attn="eager")


@pytest.fixture(scope="module")
def model3(hf3):
    return HookedAVModel.from_hf_model(hf3)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(400)}
    names = dict(audio_token="<|audio_pad|>", image_token="<|image_pad|>", video_token="<|video_pad|>",
                 audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>",
                 vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>")
    ids = dict(audio_token=TOK["audio"], image_token=TOK["image"], video_token=TOK["video"],
               audio_bos_token=TOK["audio_start"], audio_eos_token=TOK["audio_end"],
               vision_bos_token=TOK["vision_start"], vision_eos_token=TOK["vision_end"])
    vocab.update({names[k]: ids[k] for k in names})
    vocab.update({"<|endoftext|>": TOK["pad"], "[UNK]": 510})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   extra_special_tokens=names)


def hf_processor(proc: Qwen3OmniMediaProcessor, tokenizer):
    """transformers' Qwen3OmniMoeProcessor around our feature extractor and image processor (no video processor:
    its constructor's class check needs torchvision, so the attributes are set as __init__ would set them)."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    hf = Qwen3OmniMoeProcessor.__new__(Qwen3OmniMoeProcessor)
    hf.image_processor, hf.video_processor = proc.image_processor, None
    hf.feature_extractor, hf.tokenizer, hf.chat_template = proc.feature_extractor, tokenizer, None
    for name in ("image", "audio", "video"):
        setattr(hf, f"{name}_token", getattr(tokenizer, f"{name}_token"))
        setattr(hf, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    for name in ("vision_bos", "vision_eos", "audio_bos", "audio_eos"):
        setattr(hf, f"{name}_token", getattr(tokenizer, f"{name}_token"))
    return hf


def clip(seconds=2.5, n_frames=6, fps=2.0, seed=0, audio=True, video=True):
    rng = np.random.default_rng(seed)
    wav = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32) if audio else None
    frames = rng.integers(0, 256, (n_frames, 70, 100, 3), dtype=np.uint8) if video else None
    return RawAV(waveform=wav, frames=frames, sample_rate=16000, fps=fps)


def test_audio_and_image_equal_transformers_processor(model3, tokenizer):
    proc = Qwen3OmniMediaProcessor.from_model(model3, tokenizer=tokenizer)
    raw = clip(seconds=3.077, video=False)
    image = np.random.default_rng(1).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    ours = proc(raw, "w1 w2", "w3", images=[image])
    text = ("w1 w2 <|vision_start|><|image_pad|><|vision_end|><|audio_start|><|audio_pad|><|audio_end|> w3")
    ref = hf_processor(proc, tokenizer)(text=[text], images=[image], audio=[raw.waveform], return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    for key in ("attention_mask", "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw"):
        assert ours[key].dtype == ref[key].dtype, key
        assert torch.equal(ours[key], ref[key]), key
    assert ours["input_features"].shape[1] == MEL
    assert int((ours["input_ids"] == TOK["audio"]).sum()) == 3 * 13 + 1  # 307 mel frames
    assert ours["use_audio_in_video"] is False


@pytest.mark.parametrize("grid, spg, n_audio", [
    ((5, 4, 4), 1.0, 95),      # 13 positions per grid: ties between video grid g and audio token 13 g
    ((8, 4, 4), 0.5, 25),      # 6.5 positions per grid, video outlasts audio
    ((3, 6, 8), 2 / 3, 40),    # 3 fps: fractional positions, float rounding near ties
    ((1, 4, 4), 1.0, 0),       # no audio tokens
    ((4, 2, 2), 2.0, 3),
])
def test_interleave_equals_transformers(grid, spg, n_audio):
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    stub = SimpleNamespace(audio_bos_token="A", audio_eos_token="E", video_token="v", audio_token="a",
                           video_processor=SimpleNamespace(merge_size=2))
    ref = Qwen3OmniMoeProcessor.replace_video_with_audio_token(
        stub, {"video_grid_thw": torch.tensor([grid]), "video_second_per_grid": [spg]}, 0,
        {"num_audio_tokens": [n_audio]}, 0, position_id_per_seconds=13.0)
    ids = audio_in_video_ids(grid, spg, n_audio, TokenIds(**TOK), merge_size=2, position_id_per_seconds=13)
    letters = {TOK["audio_start"]: "A", TOK["audio_end"]: "E", TOK["video"]: "v", TOK["audio"]: "a"}
    assert "".join(letters[i] for i in ids) == ref


@pytest.mark.parametrize("fps, use_audio_in_video", [(2.0, True), (4.0, True), (2.0, False)])
def test_clip_end_to_end_equals_transformers_thinker(hf3, model3, fps, use_audio_in_video):
    """Processor outputs run through our model and transformers' thinker alike, with the same positions."""
    proc = Qwen3OmniMediaProcessor.from_model(model3, **SMALL_VIDEO)
    inputs = proc(clip(fps=fps), [1, 2, 3], [4, 5], use_audio_in_video=use_audio_in_video)
    assert inputs["use_audio_in_video"] is use_audio_in_video
    assert float(inputs["video_second_per_grid"][0]) == 2 / fps  # the clip's own fps
    with torch.no_grad():
        ref = hf3(**inputs)
        ours = model3(**inputs)
    assert (ours - ref.logits).abs().max().item() <= 1e-5
    mm = model3.modality_map(**inputs)
    n_audio = 2 * 13 + 7  # 2.5 s: two full 1-s chunks and a 50-frame tail
    assert mm.counts()["audio"] == n_audio
    if use_audio_in_video:
        video_times = mm.time[0, mm.positions("video")].unique().tolist()
        assert video_times == pytest.approx([g * 2 / fps for g in range(3)])
    else:
        assert mm.ranges("audio")[0][0] > mm.ranges("video")[0][1]  # separate audio block after the video


def test_processor_needs_a_qwen3_model(model):
    """`model` is conftest's tiny Qwen2.5-Omni."""
    with pytest.raises(ValueError, match="Qwen3-Omni model.*qwen2_5_omni"):
        Qwen3OmniMediaProcessor.from_model(model)
