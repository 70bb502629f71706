"""Tiny random video-SALMONN 2+ / -o1 models, their transformers reference parts, and inputs, for tests.

No transformers class exists for these families, so a tiny "release" is assembled from transformers' own modules
with random weights (norms and biases perturbed, so a missing gain or bias shows): for video-SALMONN 2+ a
`Qwen2_5_VLForConditionalGeneration` (LLM + ViT), a `WhisperEncoder`, a `Blip2QFormerModel`, query tokens and the
projection; for video-SALMONN-o1 a `Qwen2ForCausalLM`, a `SiglipVisionModel` (with the layer the public tower
deletes), the projector, the newline vector, a `WhisperEncoder`, `ln_speech`, a `Blip2QFormerModel`, query tokens,
the projection and `final_linear`. `released_state()` writes them under the public checkpoints' key names, so the
tests load them through the same conversion as the released weights, and compare each part against the module it
came from.

Sizes: LLM 3 layers, d 64, 4 heads / 2 kv heads, vocab 512. Whisper: 16 mel bins, 2 layers, d 16,
max_source_positions 50, i.e. 1-s segments of 100 mel frames. video-SALMONN 2+: 0.5-s windows (2 audio tokens per
second, as released), ViT of 2 blocks (one windowed, one full) with 14-px patches. o1: 0.2-s windows (5 tokens per
second, as released), SigLIP 70 px / 14-px patches (5 x 5 patches, max-pooled to 2 x 2: the floor matters),
3 released layers of which 2 are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .salmonn_audio import qformer_released_key

VOCAB = 512
TOK = dict(audio=500, image=501, video=502, vision_start=505, vision_end=506, bos=507, eos=508, pad=509)
MEL = 16
PATCH_DIM = 3 * 2 * 14 * 14
D_MODEL = 64


def _text(d_model: int = D_MODEL) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=d_model, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_theta=1e6, tie_word_embeddings=False, hidden_act="silu")


WHISPER = dict(num_mel_bins=MEL, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
               max_source_positions=50)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, encoder_width=16,
               cross_attention_freq=1, layer_norm_eps=1e-12, hidden_act="gelu")


def tiny_vs2_config(query_length: int = 1, **text_overrides: Any) -> dict[str, Any]:
    """config.json of a tiny video-SALMONN 2+ (the public `Qwen2_5_VLConfig` layout with its `audio_config`)."""
    text = {**_text(), **text_overrides}
    return dict(
        model_type="qwen2_5_vl", architectures=["video_SALMONN2_plus"], **text,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        image_token_id=TOK["image"], video_token_id=TOK["video"], audio_token_id=TOK["audio"],
        vision_start_token_id=TOK["vision_start"], vision_end_token_id=TOK["vision_end"],
        bos_token_id=TOK["bos"], eos_token_id=TOK["eos"], pad_token_id=TOK["pad"],
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text["hidden_size"],
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3, hidden_act="silu", tokens_per_second=2),
        audio_config=dict(**WHISPER, second_per_window=0.5, second_stride=0.5,
                          qformer_config=dict(**QFORMER, query_length=query_length)),
    )


def tiny_o1_config(vision_in_checkpoint: bool = True, **settings: Any) -> dict[str, Any]:
    """config.json of a tiny video-SALMONN-o1 (Qwen2Config + LLaVA fields), with the `video_salmonn_o1` entry
    giving the tiny encoders (the released config leaves them to the public code's defaults)."""
    return dict(
        model_type="videosalmonno1", architectures=["videoSALMONNo1ForCausalLM"], **_text(),
        bos_token_id=TOK["bos"], eos_token_id=TOK["eos"], pad_token_id=TOK["pad"],
        mm_hidden_size=16, mm_projector_type="mlp2x_gelu", mm_vision_tower="google/siglip-so400m-patch14-384",
        mm_patch_merge_type="spatial_unpad", mm_spatial_pool_mode="bilinear",  # overwritten by inference settings
        unfreeze_mm_vision_tower=vision_in_checkpoint,
        video_salmonn_o1=dict(
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                               image_size=70, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                               num_channels=3),
            whisper_config=WHISPER, qformer_config=QFORMER,
            settings=dict(second_per_window=0.2, second_stride=0.2, **settings)),
    )


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))


def _whisper_and_qformer(seed: int, query_length: int, d_model: int) -> dict[str, Any]:
    from transformers import Blip2QFormerModel, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from .salmonn_audio import qformer_config

    torch.manual_seed(seed + 1)
    whisper = WhisperEncoder(WhisperConfig(**WHISPER)).eval()
    qformer = Blip2QFormerModel(qformer_config(QFORMER, encoder_width=WHISPER["d_model"])).eval()
    parts = dict(whisper=whisper, qformer=qformer,
                 query_tokens=nn.Parameter(0.02 * torch.randn(1, query_length, QFORMER["hidden_size"])),
                 proj=nn.Linear(QFORMER["hidden_size"], d_model))
    for m in (whisper, qformer, parts["proj"]):
        _perturb(m)
    return parts


def tiny_vs2_reference(seed: int = 0, query_length: int = 1, attn: str = "eager") -> dict[str, Any]:
    """transformers parts of a tiny video-SALMONN 2+: `qwen` (Qwen2_5_VLForConditionalGeneration: LLM + ViT),
    `whisper`, `qformer`, `query_tokens`, `proj`; `config` is the matching config.json."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = tiny_vs2_config(query_length)
    text = {k: config[k] for k in _text()}
    text["rope_parameters"] = dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])
    text.pop("rope_theta")
    torch.manual_seed(seed)
    hf_cfg = Qwen2_5_VLConfig(text_config=text, vision_config=config["vision_config"],
                              image_token_id=TOK["image"], video_token_id=TOK["video"],
                              vision_start_token_id=TOK["vision_start"], vision_end_token_id=TOK["vision_end"],
                              bos_token_id=TOK["bos"], eos_token_id=TOK["eos"], pad_token_id=TOK["pad"])
    hf_cfg._attn_implementation = attn
    qwen = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    _perturb(qwen)
    return dict(config=config, qwen=qwen, **_whisper_and_qformer(seed, query_length, config["hidden_size"]))


def vs2_released_state(ref: dict[str, Any]) -> dict[str, Tensor]:
    """The reference parts under the released video-SALMONN 2+ key names (transformers 4.51 layout)."""
    state: dict[str, Tensor] = {}
    for key, t in ref["qwen"].state_dict().items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        state[key] = t
    for key, t in ref["whisper"].state_dict().items():
        state[f"audio.{key}"] = t
    for key, t in ref["qformer"].state_dict().items():
        state[f"audio.qformer.bert.{qformer_released_key(key)}"] = t
    state["audio.qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]  # a persistent buffer upstream
    state["audio.q_tokens"] = ref["query_tokens"].data
    state["audio.audio_proj.weight"] = ref["proj"].weight.data
    state["audio.audio_proj.bias"] = ref["proj"].bias.data
    return state


def tiny_o1_reference(seed: int = 0, attn: str = "eager") -> dict[str, Any]:
    """transformers parts of a tiny video-SALMONN-o1: `lm` (Qwen2ForCausalLM), `siglip` (SiglipVisionModel with
    all released layers, the last one included), `projector`, `image_newline`, `whisper`, `ln_speech`, `qformer`,
    `query_tokens`, `proj`, `final_linear`; `config` is the matching config.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    config = tiny_o1_config()
    torch.manual_seed(seed)
    lm_cfg = Qwen2Config(**{k: config[k] for k in _text()}, bos_token_id=TOK["bos"], eos_token_id=TOK["eos"],
                         pad_token_id=TOK["pad"])
    lm_cfg._attn_implementation = attn
    lm = Qwen2ForCausalLM(lm_cfg).eval()
    siglip = SiglipVisionModel(SiglipVisionConfig(**config["video_salmonn_o1"]["vision_config"],
                                                  vision_use_head=False)).eval()
    d = config["hidden_size"]
    projector = nn.Sequential(nn.Linear(16, d), nn.GELU(), nn.Linear(d, d))
    final_linear = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
    ln_speech = nn.LayerNorm(WHISPER["d_model"])
    for m in (lm, siglip, projector, final_linear, ln_speech):
        _perturb(m)
    parts = _whisper_and_qformer(seed, 1, d)
    return dict(config=config, lm=lm, siglip=siglip, projector=projector, final_linear=final_linear,
                ln_speech=ln_speech, image_newline=nn.Parameter(torch.randn(d) / d**0.5), **parts)


def o1_released_state(ref: dict[str, Any], with_vision: bool = True, with_whisper: bool = True,
                      ) -> dict[str, Tensor]:
    """The reference parts under the released video-SALMONN-o1 key names. The vision tower is stored as the public
    model holds it (last layer deleted, no head)."""
    state: dict[str, Tensor] = dict(ref["lm"].state_dict())
    if with_vision:
        kept = ref["siglip"].config.num_hidden_layers - 1
        for key, t in ref["siglip"].state_dict().items():
            if key.startswith(f"encoder.layers.{kept}."):
                continue
            state[f"model.vision_tower.vision_tower.vision_model.{key}"] = t
    for i in (0, 2):
        state[f"model.mm_projector.{i}.weight"] = ref["projector"][i].weight.data
        state[f"model.mm_projector.{i}.bias"] = ref["projector"][i].bias.data
        state[f"final_linear.{i}.weight"] = ref["final_linear"][i].weight.data
        state[f"final_linear.{i}.bias"] = ref["final_linear"][i].bias.data
    state["model.image_newline"] = ref["image_newline"].data
    if with_whisper:
        for key, t in ref["whisper"].state_dict().items():
            state[f"speech_encoder.{key}"] = t
    state["ln_speech.weight"], state["ln_speech.bias"] = ref["ln_speech"].weight.data, ref["ln_speech"].bias.data
    for key, t in ref["qformer"].state_dict().items():
        state[f"speech_Qformer.bert.{qformer_released_key(key)}"] = t
    state["speech_query_tokens"] = ref["query_tokens"].data
    state["speech_llama_proj.weight"] = ref["proj"].weight.data
    state["speech_llama_proj.bias"] = ref["proj"].bias.data
    return state


def save_checkpoint(path: str | Path, config: dict[str, Any], state: dict[str, Tensor]) -> Path:
    """config.json + model.safetensors in `path`."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


# ---------------------------------------------------------------------------------------------------- inputs
def _ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 400, (n,), generator=gen).tolist()


def vs2_inputs(kind: str, seed: int = 0, grid: tuple[int, int, int] = (3, 4, 4), spg: float = 1.0,
               segments: int = 4, tokens_per_segment: int = 2, image_grid: tuple[int, int, int] = (1, 4, 6),
               ) -> dict[str, Any]:
    """Inputs in the public dataset's shapes: kind in text, image, video (no audio), audio (alone), av (a video
    with its audio interleaved per temporal grid). `segments` 1-s audio segments of `tokens_per_segment` tokens."""
    from hooked_av.config import TokenIds

    from .video_salmonn2 import audio_block_ids, av_block_ids, image_block_ids, video_block_ids

    tok = TokenIds(**{k: TOK[k] for k in ("audio", "image", "video", "vision_start", "vision_end")})
    gen = torch.Generator().manual_seed(seed)
    ids = [TOK["bos"]] + _ids(gen, 5)
    out: dict[str, Any] = {}
    n_audio = segments * tokens_per_segment
    if kind in ("video", "av"):
        t, h, w = grid
        out["pixel_values_videos"] = torch.randn(t * h * w, PATCH_DIM, generator=gen)
        out["video_grid_thw"] = torch.tensor([grid])
        out["second_per_grid_ts"] = torch.tensor([spg])
        ids += av_block_ids(tok, grid, spg, n_audio) if kind == "av" else video_block_ids(tok, grid)
    if kind == "image":
        t, h, w = image_grid
        out["pixel_values"] = torch.randn(t * h * w, PATCH_DIM, generator=gen)
        out["image_grid_thw"] = torch.tensor([image_grid])
        ids += image_block_ids(tok, image_grid)
    if kind == "audio":
        ids += audio_block_ids(tok, n_audio)
    if kind in ("audio", "av"):
        out["audio_feature"] = torch.randn(segments, MEL, 2 * WHISPER["max_source_positions"], generator=gen)
        out["audio_lengths"] = [n_audio]
    if kind not in ("text", "image", "video", "audio", "av"):
        raise ValueError(f"unknown input kind {kind!r}")
    ids += _ids(gen, 7)
    out["input_ids"] = torch.tensor([ids])
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def o1_inputs(kind: str = "av", seed: int = 0, frames: int = 4, real_time: float = 2.5, segments: int = 3,
              ) -> dict[str, Any]:
    """Inputs in the public test dataset's shapes: one `<image>` placeholder (-200) in the prompt; kind "av"
    (frames and audio), "audio" (audio alone) or "text"."""
    from .video_salmonn_o1 import IMAGE_TOKEN_INDEX

    gen = torch.Generator().manual_seed(seed)
    ids = [TOK["bos"]] + _ids(gen, 5)
    out: dict[str, Any] = {}
    if kind in ("av", "audio"):
        ids += [IMAGE_TOKEN_INDEX]
        out["spectrogram"] = torch.randn(segments, MEL, 2 * WHISPER["max_source_positions"], generator=gen)
        out["org_groups"] = [segments]
        out["modalities"] = ["audio-video" if kind == "av" else "audio"]
    if kind == "av":
        out["images"] = [torch.randn(frames, 3, 70, 70, generator=gen)]
        out["real_time"] = [real_time]
    elif kind not in ("audio", "text"):
        raise ValueError(f"unknown input kind {kind!r}")
    ids += _ids(gen, 7)
    out["input_ids"] = torch.tensor([ids])
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out
