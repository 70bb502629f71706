"""video-SALMONN-o1 (7B) as a HookedAVModel with the zoo's uniform hook names.

There is no transformers class for this model; the reference is the public code, `BriansIDP/video-SALMONN-o1`,
folder `videosalmonno1/` (class `videoSALMONNo1ForCausalLM`, LLaVA-NeXT + SALMONN code on transformers 4.39).
Its parts:

* LLM: LLaVA-OneVision-Qwen2-7B's Qwen2 decoder (1-D rope, theta 1e6, q/k/v bias), reimplemented with hooks.
* `video_tower`: SigLIP-so400m/14 @384 (transformers' `SiglipVisionModel`) with its last layer deleted and no
  post-LayerNorm (the public tower keeps `hidden_states[-1]` of the truncated encoder: 729 tokens per frame), a 2-D
  pooling of stride 2 (`mm_spatial_pool_mode`, "max" in `inference.py`; 27 -> 13 per side, floor), the
  `mm_projector` (mlp2x_gelu: Linear-GELU-Linear). hook_out holds the pooled, projected frame tokens.
* `audio_tower`: transformers' `WhisperEncoder` on 30-s segments, o1's extra LayerNorm `ln_speech`, a window-level
  BLIP-2 Q-Former (0.2-s windows in `inference.py`: 5 tokens/s), `speech_llama_proj`, `final_linear`
  (Linear-GELU-Linear), then a per-segment sinusoidal offset (segment 0 gets none, segment j the sinusoid of
  position j - 1). hook_out holds these tokens in time order, before the interleave.
* Layout (`prepare_inputs`; public `prepare_inputs_labels_for_multimodal`, `mm_newline_position="grid"`): the
  prompt holds one `<image>` placeholder (id -200, not a vocabulary id) per sample, replaced by spliced
  embeddings: for each frame, its rows of pooled tokens each followed by the learned `image_newline`, then the
  frame's share of audio tokens. The shares: the first round(real_time * 50) audio tokens (in practice all of them,
  padded silence of the last segment included) are nearest-neighbour interpolated up to the next multiple of the
  frame count, when needed, and split evenly (so some audio tokens appear twice); the rest follow the last frame.
  Audio alone replaces the placeholder by its tokens. Positions are plain `arange` (no multimodal rope), sequences
  are truncated to `tokenizer_model_max_length` (32768). There are no placeholder ids in the final sequence: the
  ModalityMap is the only record of what each position holds (newline tokens are labelled `special`).

Settings that live in the public code's command-line arguments rather than in config.json (`O1Settings`) take
`inference.py`'s defaults, as `inference.py` overwrites the config with them.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_av.checkpoint import CheckpointError, load_into
from hooked_av.config import AVModelConfig, SinkConstants, TokenIds
from hooked_av.inputs import LayoutError, Modality, ModalityMapBuilder
from hooked_av.model import AVInputs, HookedAVModel
from hooked_av.towers import HookedTower

from .families import DISPLAY_NAMES, FamilyMismatchError, describe_class, describe_config, family_of_config
from .salmonn_audio import WindowQFormerAudio, WindowSettings, qformer_config, qformer_key, qformer_released_key, \
    whisper_key
from .video_salmonn2 import _assign_state, decoder_key, decoder_released_key

FAMILY = "video_salmonn_o1"
UPSTREAM_CLASS = "videoSALMONNo1ForCausalLM"
MODEL_TYPES = ("videosalmonno1",)
#: the LLaVA `<image>` placeholder id in input_ids (llava/constants.py)
IMAGE_TOKEN_INDEX = -200
#: rows of the public per-segment offset table (`sinusoidal_position(200, d)`: row 0 zeros, rows 1..200)
SEGMENT_OFFSET_ROWS = 201
#: config.json entry holding what the public config does not (encoder architectures, inference settings)
CONFIG_KEY = "video_salmonn_o1"

#: google/siglip-so400m-patch14-384 (the public `SigLipVisionConfig` defaults); the tower deletes the last layer
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     num_channels=3, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                     layer_norm_eps=1e-6)
#: openai/whisper-large-v3 encoder (passed as `whisper_path` in the public code)
WHISPER_LARGE_V3 = dict(num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        d_model=1280, max_source_positions=1500, activation_function="gelu")
#: `init_speech_Qformer`: bert-base-uncased with 2 layers, cross-attention in every layer to the Whisper width
QFORMER_BERT_BASE_2L = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                            hidden_act="gelu", layer_norm_eps=1e-12, cross_attention_freq=1, encoder_width=1280,
                            initializer_range=0.02)

SINKS_7B = SinkConstants(
    dims=(458, 2570), tau=None, calibrated=False,
    provenance="not calibrated: dims [458, 2570] are the massive-activation channels reported for the 3584-wide "
    "Qwen2/Qwen2.5-7B lineage (MODELS.md section 6: Qwen2-VL-7B / Qwen2.5-VL-7B, third-party); expected for this "
    "Qwen2-7B-based LLM, not verified on video-SALMONN-o1 weights. No published tau: run "
    "hooked_av.recipes.sinks.calibrate_sinks on the real weights",
)
SINKS_TINY = SinkConstants(dims=(), tau=None, calibrated=False,
                           provenance="random tiny test model: no sinks to calibrate")

PRESETS: dict[str, dict[str, Any]] = {
    # LLaVA-OneVision-Qwen2-7B's LLM (Qwen2-7B-Instruct shapes, MODELS.md section 4.1)
    "video-salmonn-o1-7b": dict(
        n_layers=28, d_model=3584, n_heads=28, n_key_value_heads=4, d_head=128, d_mlp=18944, d_vocab=152064,
        n_ctx=32768, rope_theta=1_000_000.0, mrope_section=None, tie_word_embeddings=False, sinks=SINKS_7B,
    ),
    # `model_zoo.tiny_video_salmonn.tiny_o1_config`
    "video-salmonn-o1-tiny": dict(
        n_layers=3, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=96, d_vocab=512, n_ctx=4096,
        mrope_section=None, sinks=SINKS_TINY,
    ),
}
PRESET_CHECKED = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab",
                  "mrope_section")
MODALITIES = ("audio-video", "video", "audio")


@dataclass(frozen=True)
class O1Settings:
    """The public code's inference settings (`inference.py` argument defaults), which it writes over config.json.

    second_per_window / second_stride / n_query: the audio Q-Former windows (0.2 s: 5 tokens per second).
    use_final_linear: the Linear-GELU-Linear after `speech_llama_proj`.
    pool_mode / pool_stride / pooling_position: `mm_spatial_pool_mode` ("max" or "average"), stride, and whether
        pooling comes before or after `mm_projector`.
    newline_position: `mm_newline_position`; only "grid" (a newline after every row) interleaves audio.
    audio_front_rate: audio tokens per second of `real_time` interleaved with the frames (`round(t * 50)`: the
        public code's constant; with 5 audio tokens/s it covers every token).
    max_length: `tokenizer_model_max_length`; longer spliced sequences are cut.
    """

    second_per_window: float = 0.2
    second_stride: float = 0.2
    n_query: int = 1
    use_final_linear: bool = True
    pool_mode: str = "max"
    pool_stride: int = 2
    pooling_position: str = "before"
    newline_position: str = "grid"
    audio_front_rate: float = 50.0
    max_length: int = 32768

    def __post_init__(self) -> None:
        if self.pool_mode not in ("max", "average"):
            raise ValueError(f"pool_mode must be 'max' or 'average' (the public get_2dPool), got {self.pool_mode!r}")
        if self.pooling_position not in ("before", "after"):
            raise ValueError(f"pooling_position must be 'before' or 'after', got {self.pooling_position!r}")
        if self.newline_position != "grid":
            raise ValueError(f"newline_position {self.newline_position!r}: only 'grid' interleaves audio with frames "
                             "in the public code (the o1 inference setting)")


@dataclass
class O1Config:
    """A video-SALMONN-o1 checkpoint config, split into what each part needs.

    raw: config.json (the public `videoSALMONNo1Config`, a Qwen2Config plus LLaVA `mm_*` fields).
    vision: SigLIP config of the kept layers (the release's layer count minus the deleted last one).
    vision_from_checkpoint: whether the checkpoint's vision weights are used: the public tower loads them only when
        the config marks the tower as trained (`unfreeze_mm_vision_tower`, or `mm_vision_tower` in
        `mm_tunable_parts`); otherwise it loads google/siglip-so400m-patch14-384 (`vision_checkpoint`).
    """

    raw: dict[str, Any]
    vision: Any
    whisper: Any
    qformer: Any
    settings: O1Settings
    projector_type: str
    mm_hidden_size: int
    vision_from_checkpoint: bool
    tokens: TokenIds = field(default_factory=TokenIds)

    @property
    def window(self) -> WindowSettings:
        s = self.settings
        return WindowSettings(s.second_per_window, s.second_stride, s.n_query)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


def parse_config(config: Any, settings: O1Settings | None = None) -> O1Config:
    """O1Config from a config.json dict (or an object with `to_dict`). Encoder architectures and settings come
    from the `video_salmonn_o1` entry when present (written by `save_pretrained`), else from the public code's
    values. Raises FamilyMismatchError, naming both, for another family's config."""
    from transformers import SiglipVisionConfig, WhisperConfig

    if isinstance(config, O1Config):
        return config
    raw = dict(config if isinstance(config, dict) else config.to_dict())
    if family_of_config(raw) != FAMILY:
        raise FamilyMismatchError(f"expected a {DISPLAY_NAMES[FAMILY]} config (model_type "
                                  f"{' or '.join(MODEL_TYPES)}), got {describe_config(raw).replace('checkpoint', 'config')}")
    ours = raw.get(CONFIG_KEY) or {}
    if settings is None:
        settings = O1Settings(**ours.get("settings", {}))
    vision = {**SIGLIP_SO400M, **ours.get("vision_config", {})}
    released_layers = vision["num_hidden_layers"]
    if released_layers < 2:
        raise ValueError(f"the SigLIP release needs >= 2 layers (the tower deletes the last), got {released_layers}")
    vision = SiglipVisionConfig(**{**vision, "num_hidden_layers": released_layers - 1}, vision_use_head=False)
    whisper = WhisperConfig(**{**WHISPER_LARGE_V3, **ours.get("whisper_config", {})})
    bert = {**QFORMER_BERT_BASE_2L, **ours.get("qformer_config", {})}
    tunable = raw.get("mm_tunable_parts") or ""
    d_model = raw["hidden_size"]
    mm_hidden = raw.get("mm_hidden_size", vision.hidden_size)
    if mm_hidden != vision.hidden_size:
        raise ValueError(f"mm_hidden_size {mm_hidden} != SigLIP width {vision.hidden_size}")
    tokens = TokenIds(bos=raw.get("bos_token_id", 151643), eos=raw.get("eos_token_id", 151645),
                      pad=raw.get("pad_token_id", raw.get("bos_token_id", 151643)))
    if d_model % 2:
        raise ValueError(f"the per-segment sinusoidal offsets need an even LLM width, got {d_model}")
    return O1Config(
        raw=raw, vision=vision, whisper=whisper, qformer=qformer_config(bert, encoder_width=whisper.d_model),
        settings=settings, projector_type=raw.get("mm_projector_type", "mlp2x_gelu"), mm_hidden_size=mm_hidden,
        vision_from_checkpoint=bool(raw.get("unfreeze_mm_vision_tower")) or "mm_vision_tower" in str(tunable),
        tokens=tokens,
    )


def config_from_hf(hf_config: Any, model_name: str = "custom", sinks: SinkConstants | None = None,
                   dtype: torch.dtype = torch.float32) -> AVModelConfig:
    """AVModelConfig of the Qwen2 LLM (1-D rope: the public config class forces `rope_scaling` to None)."""
    parsed = parse_config(hf_config)
    raw = parsed.raw
    n_heads = raw["num_attention_heads"]
    d_model = raw["hidden_size"]
    return AVModelConfig(
        n_layers=raw["num_hidden_layers"],
        d_model=d_model,
        n_heads=n_heads,
        n_key_value_heads=raw.get("num_key_value_heads") or n_heads,
        d_head=raw.get("head_dim") or d_model // n_heads,
        d_mlp=raw["intermediate_size"],
        d_vocab=raw["vocab_size"],
        n_ctx=raw.get("max_position_embeddings", 32768),
        act_fn=raw.get("hidden_act", "silu"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_theta=float(raw.get("rope_theta", 1_000_000.0)),
        mrope_section=None,
        token_ids=parsed.tokens,
        sinks=sinks or SinkConstants(),
        model_family=FAMILY,
        model_name=model_name,
        dtype=dtype,
    )


def segment_offsets(n_rows: int, d_model: int) -> Float[Tensor, "rows d_model"]:
    """The per-segment offset table of the public code (`sinusoidal_position(200, d)`), float32: row 0 is zero,
    row j >= 1 holds sin / cos (even / odd channels) of position j - 1 at the transformer frequencies."""
    position = torch.arange(0, n_rows - 1, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                         * -(torch.log(torch.tensor(10000.0)) / d_model))
    table = torch.zeros(n_rows, d_model)
    table[1:, 0::2] = torch.sin(position * div_term)
    table[1:, 1::2] = torch.cos(position * div_term)
    return table


def frame_audio_split(n_audio: int, n_frames: int, real_time: float, front_rate: float,
                      ) -> tuple[Int[Tensor, "frames per_frame"], Int[Tensor, " back"]]:
    """Which of a sample's audio tokens follow each frame, and which follow the last frame.

    The first round(real_time * front_rate) tokens (at most all) are nearest-neighbour interpolated (torch
    `F.interpolate`, as the public code) up to the next multiple of `n_frames` when needed and split evenly; the
    rest come after the last frame. Returns source token indices ([frames, per_frame] and [back])."""
    front = min(round(real_time * front_rate), n_audio)
    source = torch.arange(front, dtype=torch.float32)
    if front % n_frames:
        size = front + n_frames - front % n_frames
        source = F.interpolate(source.view(1, 1, -1), size=size, mode="nearest").view(-1)
    return source.long().view(n_frames, len(source) // n_frames), torch.arange(front, n_audio)


def _projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    """The public `build_vision_projector` for 'linear' and 'mlp{N}x_gelu'."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None:
        raise ValueError(f"mm_projector_type {kind!r} is not supported (linear, mlpNx_gelu)")
    layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(1, int(match[1])):
        layers += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


_INPUT_KEYS = ("input_ids", "attention_mask", "images", "spectrogram", "org_groups", "real_time", "modalities",
               "frame_times", "padding_side")
_TEXT, _VIDEO, _AUDIO, _NEWLINE = 0, 1, 2, 3


class VideoSalmonnO1HookedModel(HookedAVModel):
    """video-SALMONN-o1: hooked Qwen2 LLM; transformers' SigLIP, Whisper encoder and BLIP-2 Q-Former as hooked
    towers; LLaVA-style splicing of the interleaved audio-visual block (module docstring)."""

    tower_names = ("audio_tower", "video_tower")

    def __init__(self, cfg: AVModelConfig, hf_config: O1Config):
        from transformers import SiglipVisionModel

        super().__init__(cfg)
        self.hf_config = hf_config
        self.settings = hf_config.settings
        self.vision_encoder = SiglipVisionModel._from_config(hf_config.vision)
        self.vision_encoder.post_layernorm = nn.Identity()  # the public tower reads hidden_states[-1]
        self.mm_projector = _projector(hf_config.projector_type, hf_config.mm_hidden_size, cfg.d_model)
        self.image_newline = nn.Parameter(torch.zeros(cfg.d_model))
        self.audio_encoder = WindowQFormerAudio(hf_config.whisper, hf_config.qformer, cfg.d_model, hf_config.window,
                                                pre_norm=True, final_mlp=hf_config.settings.use_final_linear)
        self.register_buffer("segment_offsets", segment_offsets(SEGMENT_OFFSET_ROWS, cfg.d_model), persistent=False)
        self.audio_tower = HookedTower(hf_config.whisper.encoder_layers,
                                       "layer outputs are Whisper encoder frames, [segments, frames, d_audio]; "
                                       "hook_out holds the audio tokens in time order (segment offsets added), "
                                       "before the interleave")
        self.video_tower = HookedTower(hf_config.vision.num_hidden_layers,
                                       "layer outputs are SigLIP patches, [frames, patches, d_vision]; hook_out "
                                       "holds the pooled, projected frame tokens [frames x tokens, d_model]")
        self.setup()

    # ------------------------------------------------------------ shapes
    @property
    def patches_per_side(self) -> int:
        return self.hf_config.vision.image_size // self.hf_config.vision.patch_size

    @property
    def pooled_side(self) -> int:
        """Tokens per side of a frame after pooling (floor, as max/avg_pool2d)."""
        stride = self.settings.pool_stride
        return self.patches_per_side // stride if stride > 1 else self.patches_per_side

    def encode_frames(self, frames: Float[Tensor, "frames 3 height width"]) -> Float[Tensor, "frames tokens d_model"]:
        """SigLIP (truncated, no post-LayerNorm) -> 2-D pooling -> mm_projector (public `encode_images`)."""
        size = self.hf_config.vision.image_size
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (self.hf_config.vision.num_channels, size, size):
            raise ValueError(f"frames must be [frames, {self.hf_config.vision.num_channels}, {size}, {size}] "
                             f"(SigLIP's input size), got {tuple(frames.shape)}")
        x = self.vision_encoder.embeddings(frames.to(self.mm_projector_dtype))
        x = self.vision_encoder.encoder(inputs_embeds=x).last_hidden_state
        if self.settings.pooling_position == "before":
            return self.mm_projector(self._pool(x))
        return self._pool(self.mm_projector(x))

    @property
    def mm_projector_dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    def _pool(self, x: Float[Tensor, "frames patches d"]) -> Float[Tensor, "frames pooled d"]:
        """The public `get_2dPool`: [frames, side, side, d] pooled with kernel = stride (floor)."""
        stride = self.settings.pool_stride
        if stride <= 1:
            return x
        n, _, d = x.shape
        side = self.patches_per_side
        x = x.view(n, side, side, d).permute(0, 3, 1, 2)
        x = F.max_pool2d(x, stride) if self.settings.pool_mode == "max" else F.avg_pool2d(x, stride)
        return x.permute(0, 2, 3, 1).reshape(n, -1, d)

    def encode_audio(self, spectrogram: Float[Tensor, "segments n_mel frames"], groups: list[int],
                     ) -> Float[Tensor, "tokens d_model"]:
        """Audio tokens of all samples in time order: the window-level Q-Former tokens of each 30-s segment plus
        the segment's sinusoidal offset (segment j of its sample gets row j of `segment_offsets`)."""
        out = self.audio_encoder(spectrogram)  # [segments, per_segment, d]
        if sum(groups) != out.shape[0]:
            raise LayoutError(f"org_groups {groups} sum to {sum(groups)} segments; the spectrogram has {out.shape[0]}")
        if groups and max(groups) > SEGMENT_OFFSET_ROWS:
            raise LayoutError(f"at most {SEGMENT_OFFSET_ROWS} segments per sample (the public offset table), got "
                              f"{max(groups)}")
        rows = torch.cat([torch.arange(g) for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
        offsets = self.segment_offsets[rows.to(self.segment_offsets.device)].to(out.dtype)
        return (out + offsets[:, None]).flatten(0, 1)

    # ------------------------------------------------------------ inputs
    def prepare_inputs(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        images: list[Tensor | None] | Tensor | None = None,
        spectrogram: Float[Tensor, "segments n_mel frames"] | None = None,
        org_groups: list[int] | None = None,
        real_time: list[float] | float | None = None,
        modalities: list[str] | str | None = None,
        frame_times: list[list[float] | None] | None = None,
        padding_side: str = "left",
        **unexpected: Any,
    ) -> AVInputs:
        """AVInputs from the public test dataset's tensors: `input_ids` with one `<image>` placeholder (-200) per
        sample that has media; `images`: per sample, its frames [F, 3, 384, 384] (None for audio alone);
        `spectrogram`: all samples' 30-s Whisper segments, `org_groups` segments per sample; `real_time`: each
        video's duration in seconds; `modalities`: "audio-video" / "video" (frames with audio, silent or not) or
        "audio". `frame_times` (optional) date the frames in the ModalityMap (default: spread evenly over
        `real_time`). The spliced sequences are padded on `padding_side`."""
        if unexpected:
            raise TypeError(f"unexpected input(s) {sorted(unexpected)}; video-SALMONN-o1 takes: "
                            f"{', '.join(_INPUT_KEYS)}")
        if input_ids is None:
            raise TypeError("input_ids is required")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        input_ids = input_ids.cpu()
        batch = input_ids.shape[0]
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.cpu()
        has_media = [(input_ids[b][attention_mask[b].bool()] == IMAGE_TOKEN_INDEX).sum().item() for b in range(batch)]
        bad = [b for b, n in enumerate(has_media) if n > 1]
        if bad:
            raise LayoutError(f"samples {bad} hold more than one <image> placeholder (id {IMAGE_TOKEN_INDEX}); the "
                              "public code splices one audio-visual block per sample")
        media = [b for b, n in enumerate(has_media) if n == 1]
        images_list = self._per_sample(images, batch, "images")
        if isinstance(modalities, str):
            modalities = [modalities] * batch
        if modalities is None:
            modalities = ["audio-video" if images_list[b] is not None else "audio" for b in range(batch)]
        if len(modalities) != batch or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"modalities must give one of {MODALITIES} per sample, got {modalities}")
        if isinstance(real_time, (int, float)):
            real_time = [float(real_time)] * batch
        if media and spectrogram is None:
            raise LayoutError("the prompt holds an <image> placeholder but no spectrogram was given (the public "
                              "code always encodes audio; a video without audio gets silent segments)")
        if org_groups is None:
            org_groups = [spectrogram.shape[0]] if spectrogram is not None and batch == 1 else None
        if spectrogram is not None and (org_groups is None or len(org_groups) != batch):
            raise LayoutError(f"org_groups must give the segments of each of the {batch} samples, got {org_groups}")
        per_segment = self.audio_encoder.tokens_per_segment
        token_times = self.audio_encoder.token_times
        settings = self.settings
        lh = lw = self.pooled_side
        per_frame = lh * lw

        seqs: list[dict[str, list]] = []
        audio_row = video_row = 0
        n_video_items = n_audio_items = 0
        for b in range(batch):
            ids = input_ids[b][attention_mask[b].bool()].tolist()
            seq = dict(ids=[], kind=[], row=[], grid=[], time=[], item=[], src=[])

            def add(kind: int, token: int, row: int = -1, grid: tuple = (-1, -1, -1), time: float = math.nan,
                    item: int = -1, src: int = -1, seq: dict = seq) -> None:
                seq["ids"].append(token)
                seq["kind"].append(kind)
                seq["row"].append(row)
                seq["grid"].append(grid)
                seq["time"].append(time)
                seq["item"].append(item)
                seq["src"].append(src)

            n_audio = (org_groups[b] if org_groups is not None else 0) * per_segment
            frames = images_list[b]
            for token in ids:
                if token != IMAGE_TOKEN_INDEX:
                    add(_TEXT, token)
                    continue
                times = token_times(n_audio)
                a_item = n_audio_items
                n_audio_items += 1
                if modalities[b] == "audio":
                    if frames is not None:
                        raise LayoutError(f"sample {b}: modality 'audio' with frames")
                    for k in range(n_audio):
                        add(_AUDIO, self.cfg.token_ids.pad, row=audio_row + k, time=float(times[k]), item=a_item,
                            src=k)
                    continue
                if frames is None:
                    raise LayoutError(f"sample {b}: modality {modalities[b]!r} but no frames")
                n_frames = frames.shape[0]
                if n_frames < 2:
                    raise LayoutError(f"sample {b}: a video needs at least 2 frames (the public code treats one "
                                      "frame as an image and drops its audio)")
                if real_time is None or real_time[b] is None:
                    raise LayoutError(f"sample {b}: real_time (the video's duration in seconds) is required")
                duration = float(real_time[b])
                f_times = (frame_times[b] if frame_times is not None and frame_times[b] is not None
                           else [f * duration / n_frames for f in range(n_frames)])
                if len(f_times) != n_frames:
                    raise LayoutError(f"sample {b}: {len(f_times)} frame times for {n_frames} frames")
                per, back = frame_audio_split(n_audio, n_frames, duration, settings.audio_front_rate)
                v_item = n_video_items
                n_video_items += 1
                for f in range(n_frames):
                    for r in range(lh):
                        for c in range(lw):
                            add(_VIDEO, self.cfg.token_ids.pad, row=video_row + f * per_frame + r * lw + c,
                                grid=(f, r, c), time=float(f_times[f]), item=v_item)
                        add(_NEWLINE, self.cfg.token_ids.pad, time=float(f_times[f]), item=v_item)
                    for k in per[f].tolist():
                        add(_AUDIO, self.cfg.token_ids.pad, row=audio_row + k, time=float(times[k]), item=a_item,
                            src=k)
                for k in back.tolist():
                    add(_AUDIO, self.cfg.token_ids.pad, row=audio_row + k, time=float(times[k]), item=a_item, src=k)
            if has_media[b] == 0 and (n_audio or frames is not None):
                raise LayoutError(f"sample {b} has media but no <image> placeholder (id {IMAGE_TOKEN_INDEX})")
            audio_row += n_audio
            video_row += 0 if frames is None else frames.shape[0] * per_frame
            if len(seq["ids"]) > settings.max_length:
                warnings.warn(f"sample {b}: {len(seq['ids'])} tokens after splicing, cut to {settings.max_length} "
                              "(tokenizer_model_max_length, as the public code does)", stacklevel=2)
                for key in seq:
                    seq[key] = seq[key][: settings.max_length]
            seqs.append(seq)

        seq_len = max(len(s["ids"]) for s in seqs)
        pad = self.cfg.token_ids.pad if self.cfg.token_ids.pad is not None else 0
        out_ids = torch.full((batch, seq_len), pad, dtype=torch.long)
        mask = torch.zeros(batch, seq_len, dtype=torch.long)
        positions = torch.zeros(1, batch, seq_len, dtype=torch.long)
        kind = torch.full((batch, seq_len), -1, dtype=torch.long)
        rows = torch.full((batch, seq_len), -1, dtype=torch.long)
        src = torch.full((batch, seq_len), -1, dtype=torch.long)
        builder = ModalityMapBuilder(batch, seq_len, self.cfg.seconds_per_chunk)
        spc = float(self.cfg.seconds_per_chunk)
        for b, s in enumerate(seqs):
            n = len(s["ids"])
            sl = slice(seq_len - n, seq_len) if padding_side == "left" else slice(0, n)
            out_ids[b, sl] = torch.tensor(s["ids"], dtype=torch.long)
            mask[b, sl] = 1
            positions[0, b, sl] = torch.arange(n)
            kind[b, sl] = torch.tensor(s["kind"], dtype=torch.long)
            rows[b, sl] = torch.tensor(s["row"], dtype=torch.long)
            src[b, sl] = torch.tensor(s["src"], dtype=torch.long)
            absolute = torch.arange(seq_len)[sl]
            k = kind[b, sl]
            time = torch.tensor(s["time"], dtype=torch.float32)
            item = torch.tensor(s["item"], dtype=torch.long)
            grid = torch.tensor(s["grid"], dtype=torch.long).view(-1, 3)
            for code, modality in ((_TEXT, Modality.TEXT), (_VIDEO, Modality.VIDEO), (_AUDIO, Modality.AUDIO),
                                   (_NEWLINE, Modality.SPECIAL)):
                sel = (k == code).nonzero().squeeze(-1)
                if not len(sel):
                    continue
                if code == _TEXT:
                    builder.set(b, absolute[sel], modality)
                    continue
                t = time[sel]
                builder.set(b, absolute[sel], modality, chunk=(t // spc).long(), time=t,
                            grid=grid[sel] if code == _VIDEO else None, item=int(item[sel][0]))
        mmap = builder.build(family=FAMILY, audio_source=src, newline=(kind == _NEWLINE))
        all_frames = [f for f in images_list if f is not None]
        mm = dict(frames=torch.cat(all_frames) if all_frames else None, spectrogram=spectrogram,
                  org_groups=list(org_groups) if org_groups is not None else [], video_rows=rows * (kind == _VIDEO)
                  + -1 * (kind != _VIDEO), audio_rows=rows * (kind == _AUDIO) + -1 * (kind != _AUDIO),
                  newline=(kind == _NEWLINE))
        device = self.device
        mm = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in mm.items()}
        return AVInputs(out_ids.to(device), mask.to(device), positions.to(device), mmap, mm)

    @staticmethod
    def _per_sample(images: Any, batch: int, what: str) -> list[Tensor | None]:
        if images is None:
            return [None] * batch
        if isinstance(images, Tensor):
            if batch != 1:
                raise TypeError(f"{what}: give a list of per-sample frame tensors for a batch of {batch}")
            return [images]
        images = list(images)
        if len(images) != batch:
            raise LayoutError(f"{what}: {len(images)} entries for a batch of {batch}")
        return images

    def embed_inputs(self, inputs: AVInputs) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings with the spliced frame tokens, newlines and audio tokens (index maps of
        `prepare_inputs`)."""
        embeds = self.embed(inputs.input_ids)
        mm = inputs.mm
        video_rows, audio_rows = mm.get("video_rows"), mm.get("audio_rows")
        if mm.get("frames") is not None:
            out = self.video_tower.run(lambda px: self.encode_frames(px).flatten(0, 1), mm["frames"].to(self.device),
                                       list(self.vision_encoder.encoder.layers))
            sel = video_rows >= 0
            embeds = embeds.masked_scatter(sel[..., None], out[video_rows[sel]].to(embeds.dtype))
        if mm.get("spectrogram") is not None:
            groups = mm["org_groups"]
            out = self.audio_tower.run(lambda mel: self.encode_audio(mel, groups), mm["spectrogram"].to(self.device),
                                       list(self.audio_encoder.whisper.layers))
            sel = audio_rows >= 0
            embeds = embeds.masked_scatter(sel[..., None], out[audio_rows[sel]].to(embeds.dtype))
        newline = mm.get("newline")
        if newline is not None and bool(newline.any()):
            embeds = torch.where(newline[..., None], self.image_newline.to(embeds.dtype), embeds)
        return embeds

    # ------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str, max_shard_bytes: int = 2 * 2**30) -> None:
        """Write a checkpoint in the released layout (`model.*`, `model.vision_tower.vision_tower.vision_model.*`,
        `speech_*`, ...) with a config.json that marks the vision tower as part of the checkpoint and records the
        encoder architectures and settings under `video_salmonn_o1`; loadable by `from_pretrained`."""
        from hooked_av.checkpoint import save_hf_checkpoint

        raw = dict(self.hf_config.raw)
        vision = self.hf_config.vision.to_dict()
        vision = {k: vision[k] for k in SIGLIP_SO400M if k in vision}
        vision["num_hidden_layers"] = self.hf_config.vision.num_hidden_layers + 1
        whisper = self.hf_config.whisper.to_dict()
        qformer = self.hf_config.qformer
        raw[CONFIG_KEY] = dict(
            vision_config=vision, whisper_config={k: whisper[k] for k in WHISPER_LARGE_V3},
            qformer_config=dict(hidden_size=qformer.hidden_size, num_hidden_layers=qformer.num_hidden_layers,
                                num_attention_heads=qformer.num_attention_heads,
                                intermediate_size=qformer.intermediate_size, hidden_act=qformer.hidden_act,
                                layer_norm_eps=qformer.layer_norm_eps,
                                cross_attention_freq=qformer.cross_attention_frequency,
                                encoder_width=qformer.encoder_hidden_size),
            settings=asdict(self.settings))
        raw["unfreeze_mm_vision_tower"] = True
        saved = self.hf_config
        self.hf_config = O1Config(**{**saved.__dict__, "raw": raw})
        try:
            save_hf_checkpoint(self, path, to_released_key, max_shard_bytes=max_shard_bytes,
                               architecture=UPSTREAM_CLASS)
        finally:
            self.hf_config = saved


# ---------------------------------------------------------------------------------------------------- weight names
_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


def siglip_key(rest: str, kept_layers: int) -> str | None:
    """Our `vision_encoder.*` name for a SigLIP vision key (after `vision_model.`); None for the deleted last
    layer(s), the post-LayerNorm and the attention-pooling head, which the public tower never runs."""
    match = re.fullmatch(r"encoder\.layers\.(\d+)\..+", rest)
    if match:
        return "vision_encoder." + rest if int(match[1]) < kept_layers else None
    if re.fullmatch(r"embeddings\.(patch_embedding\.(weight|bias)|position_embedding\.weight)", rest):
        return "vision_encoder." + rest
    if re.fullmatch(r"(post_layernorm|head)\..+", rest):
        return None
    raise KeyError(f"unrecognised SigLIP vision key {rest!r}")


def key_mapper(hf_config: Any):
    """`map_key` for the released checkpoint (see `from_released_key`), from an O1Config or a model holding one.
    (The public vision tower's source depends on config.json, so this takes the parsed config, not the LLM's
    AVModelConfig.)"""
    hf_config = getattr(hf_config, "hf_config", hf_config)
    if not isinstance(hf_config, O1Config):
        raise TypeError(f"key_mapper needs the parsed video-SALMONN-o1 config (O1Config) or a model holding it, "
                        f"got {type(hf_config).__name__}")
    kept = hf_config.vision.num_hidden_layers
    use_vision = hf_config.vision_from_checkpoint
    use_final = hf_config.settings.use_final_linear

    def from_released_key(key: str) -> str | None:
        """Released key -> ours: `model.embed_tokens` / `model.layers.*` / `model.norm` / `lm_head` -> the decoder
        (as for video-SALMONN 2+); `model.vision_tower.vision_tower.vision_model.{embeddings,encoder}.*` ->
        `vision_encoder.*` (only when the config marks the tower as trained, else the SigLIP release supplies
        them); `model.mm_projector.{i}` -> `mm_projector.{i}`; `model.image_newline` -> `image_newline`;
        `speech_encoder.*` -> `audio_encoder.whisper.*`; `ln_speech` -> `audio_encoder.ln_speech`;
        `speech_Qformer.bert.*` -> `audio_encoder.qformer.*` (BERT -> Blip2QFormerModel names, see
        `salmonn_audio.qformer_key`); `speech_query_tokens` -> `audio_encoder.query_tokens`; `speech_llama_proj`
        -> `audio_encoder.proj`; `final_linear.{0,2}` -> `audio_encoder.final_linear.{0,2}`."""
        ours = decoder_key(key)
        if ours is not None:
            return ours
        if key.startswith(_VISION_PREFIX):
            return siglip_key(key.removeprefix(_VISION_PREFIX), kept) if use_vision else None
        match = re.fullmatch(r"model\.mm_projector\.(\d+)\.(weight|bias)", key)
        if match:
            return f"mm_projector.{match[1]}.{match[2]}"
        if key == "model.image_newline":
            return "image_newline"
        if key.startswith("speech_encoder."):
            return "audio_encoder." + whisper_key(key.removeprefix("speech_encoder."))
        if re.fullmatch(r"ln_speech\.(weight|bias)", key):
            return "audio_encoder." + key
        if key.startswith("speech_Qformer.bert."):
            target = qformer_key(key.removeprefix("speech_Qformer.bert."))
            return None if target is None else "audio_encoder." + target
        if key.startswith("speech_Qformer.cls."):
            return None
        if key == "speech_query_tokens":
            return "audio_encoder.query_tokens"
        if re.fullmatch(r"speech_llama_proj\.(weight|bias)", key):
            return "audio_encoder.proj." + key.rsplit(".", 1)[1]
        match = re.fullmatch(r"final_linear\.([02])\.(weight|bias)", key)
        if match:
            return f"audio_encoder.final_linear.{match[1]}.{match[2]}" if use_final else None
        raise KeyError(f"unrecognised video-SALMONN-o1 checkpoint key {key!r}")

    return from_released_key


def siglip_release_mapper(hf_config: O1Config):
    """`map_key` for google/siglip-so400m-patch14-384 (SiglipModel or SiglipVisionModel layout): the vision
    encoder without its last layer; the text model, logit scale/bias, post-LayerNorm and head are skipped."""
    kept = hf_config.vision.num_hidden_layers

    def map_key(key: str) -> str | None:
        if key.startswith(("text_model.", "logit_")):
            return None
        return siglip_key(key.removeprefix("vision_model."), kept)

    return map_key


def whisper_release_mapper(key: str) -> str | None:
    """`map_key` for openai/whisper-large-v3 (WhisperForConditionalGeneration / WhisperModel / encoder layout):
    the encoder; the decoder and output projection are skipped."""
    if key.startswith(("model.decoder.", "decoder.", "proj_out.")):
        return None
    rest = key.removeprefix("model.").removeprefix("encoder.")
    return "audio_encoder." + whisper_key(rest)


def to_released_key(name: str) -> str:
    """The released checkpoint key of one of our parameters (inverse of `key_mapper`)."""
    ours = decoder_released_key(name)
    if ours is not None:
        return ours
    if name.startswith("vision_encoder."):
        return _VISION_PREFIX + name.removeprefix("vision_encoder.")
    if name.startswith("mm_projector."):
        return "model." + name
    if name == "image_newline":
        return "model.image_newline"
    if name.startswith("audio_encoder.whisper."):
        return "speech_encoder." + name.removeprefix("audio_encoder.whisper.")
    if name.startswith("audio_encoder.ln_speech."):
        return name.removeprefix("audio_encoder.")
    if name.startswith("audio_encoder.qformer."):
        return "speech_Qformer.bert." + qformer_released_key(name.removeprefix("audio_encoder.qformer."))
    if name == "audio_encoder.query_tokens":
        return "speech_query_tokens"
    if name.startswith("audio_encoder.proj."):
        return "speech_llama_proj." + name.removeprefix("audio_encoder.proj.")
    if name.startswith("audio_encoder.final_linear."):
        return name.removeprefix("audio_encoder.")
    raise KeyError(f"no released checkpoint key for parameter {name!r}")


def load_weights(model: VideoSalmonnO1HookedModel, checkpoint: Any, dtype: torch.dtype, device: Any,
                 tied: dict[str, str] | None = None, vision_checkpoint: Any = None,
                 whisper_checkpoint: Any = None) -> None:
    """Stream a released checkpoint into `model`. The public model takes the SigLIP weights from
    google/siglip-so400m-patch14-384 unless its config marks the vision tower as trained, and the Whisper encoder
    from openai/whisper-large-v3 unless the checkpoint holds `speech_encoder.*`: `vision_checkpoint` /
    `whisper_checkpoint` are local copies of those releases, read for what the checkpoint does not supply."""
    from hooked_av.checkpoint import iter_checkpoint_tensors

    keys = [key for key, _ in iter_checkpoint_tensors(checkpoint)]  # names only; no tensor is read here
    needs = []
    if vision_checkpoint is None and not (model.hf_config.vision_from_checkpoint
                                          and any(k.startswith(_VISION_PREFIX) for k in keys)):
        why = ("its config does not mark the vision tower as trained (unfreeze_mm_vision_tower / mm_tunable_parts), "
               "so the public code loads them from that release" if not model.hf_config.vision_from_checkpoint
               else f"the checkpoint holds no {_VISION_PREFIX}* weights")
        needs.append(f"the SigLIP weights of google/siglip-so400m-patch14-384 ({why}): pass "
                     "vision_checkpoint=<local copy>")
    if whisper_checkpoint is None and not any(k.startswith("speech_encoder.") for k in keys):
        needs.append("the Whisper encoder weights of openai/whisper-large-v3 (the checkpoint holds no "
                     "speech_encoder.* weights): pass whisper_checkpoint=<local copy>")
    if needs:
        raise CheckpointError(f"{checkpoint}: this {DISPLAY_NAMES[FAMILY]} checkpoint needs " + "; and ".join(needs))
    extra = []
    if vision_checkpoint is not None:
        extra.append((vision_checkpoint, siglip_release_mapper(model.hf_config)))
    if whisper_checkpoint is not None:
        extra.append((whisper_checkpoint, whisper_release_mapper))
    load_into(model, checkpoint, key_mapper(model.hf_config), dtype, device, tied=tied, extra_sources=extra)


# ---------------------------------------------------------------------------------------------------- building
def build(hf_config: Any, model_name: str = "custom", sinks: SinkConstants | None = None,
          dtype: torch.dtype = torch.float32, settings: O1Settings | None = None) -> VideoSalmonnO1HookedModel:
    """An (uninitialised-weights) model for a checkpoint config (dict or O1Config); `settings` override the
    inference settings (`O1Settings`)."""
    parsed = parse_config(hf_config, settings=settings)
    cfg = config_from_hf(parsed, model_name=model_name, sinks=sinks, dtype=dtype)
    return VideoSalmonnO1HookedModel(cfg, parsed).to(dtype)


def from_hf_model(model: Any, sinks: SinkConstants | None = None, model_name: str = "custom",
                  settings: O1Settings | None = None) -> VideoSalmonnO1HookedModel:
    """Convert an in-memory model of the public code (`videoSALMONNo1ForCausalLM` with its vision tower loaded),
    from `config.to_dict()` and `state_dict()`; the hooked model shares its weight tensors."""
    name = type(model).__name__
    if name != UPSTREAM_CLASS:
        raise FamilyMismatchError(f"expected a {DISPLAY_NAMES[FAMILY]} model ({UPSTREAM_CLASS}), got "
                                  f"{describe_class(name)}")
    from accelerate import init_empty_weights

    raw = dict(model.config.to_dict(), unfreeze_mm_vision_tower=True)  # the loaded tower's weights are in memory
    dtype = next(model.parameters()).dtype
    with init_empty_weights(include_buffers=False):
        hooked = build(raw, model_name=model_name, sinks=sinks, dtype=dtype, settings=settings)
    hooked = _assign_state(hooked, model.state_dict(), key_mapper(hooked.hf_config))
    return hooked.to(next(model.parameters()).device).eval()


def registry_family(family_class: Any) -> Any:
    """This family's `model_zoo.registry.Family` entry."""
    return family_class(
        name=FAMILY,
        model_types=MODEL_TYPES,
        hf_thinker_class=UPSTREAM_CLASS,
        presets=PRESETS,
        checked_fields=PRESET_CHECKED,
        hf_thinker_config=lambda config, path: parse_config(config),
        config_from_hf=config_from_hf,
        build=build,
        key_mapper=key_mapper,
        from_hf_model=from_hf_model,
        accepts=lambda config: family_of_config(config) == FAMILY,
        load_weights=load_weights,
        options=("vision_checkpoint", "whisper_checkpoint"),
    )
