"""The window-level Q-Former audio encoder of video-SALMONN 2+ and video-SALMONN-o1, from transformers' modules.

Both families encode audio the same way (public code: `video_SALMONN2_plus/qwenvl/model/modeling_whisper.py`
`WhisperEncoder.forward`; `videosalmonno1/llava/model/language_model/videosalmonno1.py`
`_encode_auditory_feature`): 30-s segments of Whisper log-mel features -> Whisper encoder (transformers'
`WhisperEncoder`, which also insists on exactly 2 x max_source_positions mel frames) -> [o1 only: an extra
LayerNorm `ln_speech`] -> non-overlapping windows of `second_per_window` seconds of encoder frames (`F.unfold` in the
public code; frames past the last full window are dropped) -> each window cross-attended by `n_query` learned
queries in a BLIP-2 BERT Q-Former (transformers' `Blip2QFormerModel`: LayerNorm on the queries, self-attention,
cross-attention every `cross_attention_frequency` layers, query FFN; the BERT text path is absent in both
releases) -> Linear to the LLM width -> [o1 only: `final_linear`, Linear-GELU-Linear]. One segment gives
`windows_per_segment x n_query` tokens, window-major.

The public code computes window sizes as `round(1500 * seconds / 30)`: 1500 encoder frames per 30-s segment,
i.e. 50 encoder frames per second (10 ms mel hop, stride-2 convolution). That rate is a property of the Whisper
front end, not of the segment length, so tiny test configs with short segments keep it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_av.checkpoint import rename

#: Whisper encoder frames per second of audio (the public code's 1500 frames / 30 s)
ENCODER_FRAMES_PER_SECOND = 50
#: mel frames per encoder frame (the stride-2 second convolution)
MEL_FRAMES_PER_ENCODER_FRAME = 2

#: Q-Former fields read from the public code's BertConfig (names there -> Blip2QFormerConfig)
_BERT_FIELDS = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps", "initializer_range": "initializer_range",
    "cross_attention_freq": "cross_attention_frequency", "encoder_width": "encoder_hidden_size",
}


@dataclass(frozen=True)
class WindowSettings:
    """Window-level Q-Former windows: length and hop in seconds of encoder frames, queries per window."""

    second_per_window: float
    second_stride: float
    n_query: int = 1

    @property
    def kernel(self) -> int:
        """Encoder frames per window (`round(1500 * second_per_window / 30)` in the public code)."""
        return round(ENCODER_FRAMES_PER_SECOND * self.second_per_window)

    @property
    def stride(self) -> int:
        return round(ENCODER_FRAMES_PER_SECOND * self.second_stride)

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.stride < 1:
            raise ValueError(f"windows of {self.second_per_window} s with stride {self.second_stride} s are shorter "
                             f"than one encoder frame (1/{ENCODER_FRAMES_PER_SECOND} s)")
        if self.n_query < 1:
            raise ValueError(f"n_query must be >= 1, got {self.n_query}")


def qformer_config(bert: dict[str, Any], encoder_width: int | None = None) -> Any:
    """transformers `Blip2QFormerConfig` from the public code's Q-Former `BertConfig` fields (a dict).

    Only the query path exists in the released models, so `use_qformer_text_input` is False."""
    from transformers import Blip2QFormerConfig

    kwargs = {ours: bert[theirs] for theirs, ours in _BERT_FIELDS.items() if theirs in bert}
    if encoder_width is not None:
        kwargs["encoder_hidden_size"] = encoder_width
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "encoder_hidden_size") if k not in kwargs]
    if missing:
        raise ValueError(f"the Q-Former config lacks {missing} (public BertConfig fields: {sorted(_BERT_FIELDS)})")
    kwargs.setdefault("cross_attention_frequency", 1)
    return Blip2QFormerConfig(use_qformer_text_input=False, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, **kwargs)


class WindowQFormerAudio(nn.Module):
    """Whisper encoder + window-level Q-Former + projection (see the module docstring).

    Args:
        whisper_config: transformers `WhisperConfig` of the encoder (d_model, layers, mel bins, max_source_positions).
        qformer: transformers `Blip2QFormerConfig` (see `qformer_config`).
        d_out: LLM width.
        window: window length, hop and queries per window.
        pre_norm: o1's `ln_speech` LayerNorm on the encoder output before windowing.
        final_mlp: o1's `final_linear` (Linear-GELU-Linear at the LLM width) after the projection.
    """

    def __init__(self, whisper_config: Any, qformer: Any, d_out: int, window: WindowSettings,
                 pre_norm: bool = False, final_mlp: bool = False):
        from transformers import Blip2QFormerModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        super().__init__()
        self.window = window
        self.whisper = WhisperEncoder._from_config(whisper_config)
        d_audio = whisper_config.d_model
        if qformer.encoder_hidden_size != d_audio:
            raise ValueError(f"the Q-Former cross-attends to width {qformer.encoder_hidden_size}, the Whisper encoder "
                             f"outputs {d_audio}")
        self.ln_speech = nn.LayerNorm(d_audio) if pre_norm else None
        self.qformer = Blip2QFormerModel._from_config(qformer)
        self.query_tokens = nn.Parameter(torch.zeros(1, window.n_query, qformer.hidden_size))
        self.proj = nn.Linear(qformer.hidden_size, d_out)
        self.final_linear = (nn.Sequential(nn.Linear(d_out, d_out), nn.GELU(), nn.Linear(d_out, d_out))
                             if final_mlp else None)
        if self.encoder_frames < window.kernel:
            raise ValueError(f"a segment has {self.encoder_frames} encoder frames, fewer than one window "
                             f"({window.kernel})")

    @property
    def encoder_frames(self) -> int:
        """Encoder frames per segment (Whisper's max_source_positions)."""
        return int(self.whisper.config.max_source_positions)

    @property
    def mel_frames(self) -> int:
        """Mel frames per segment the Whisper encoder requires (2 x max_source_positions; 3000 for 30 s)."""
        return self.encoder_frames * MEL_FRAMES_PER_ENCODER_FRAME

    @property
    def segment_seconds(self) -> float:
        return self.encoder_frames / ENCODER_FRAMES_PER_SECOND

    @property
    def windows_per_segment(self) -> int:
        """Full windows per segment; the frames after the last full window are dropped (as `F.unfold` does)."""
        return (self.encoder_frames - self.window.kernel) // self.window.stride + 1

    @property
    def tokens_per_segment(self) -> int:
        return self.windows_per_segment * self.window.n_query

    def token_times(self, n_tokens: int) -> Float[Tensor, " n"]:
        """Start time (s) of each of an audio's `n_tokens` LLM tokens: token k is query k % n_query of window
        (k // n_query) % windows_per_segment of segment k // tokens_per_segment."""
        k = torch.arange(n_tokens)
        window = k // self.window.n_query
        segment, w = window // self.windows_per_segment, window % self.windows_per_segment
        return segment.float() * self.segment_seconds + w.float() * self.window.stride / ENCODER_FRAMES_PER_SECOND

    def windows(self, frames: Float[Tensor, "n_seg frames d"]) -> Float[Tensor, "n_windows kernel d"]:
        """Windows of encoder frames, segment-major (equal to the public code's `F.unfold` + permute)."""
        k, s = self.window.kernel, self.window.stride
        return frames.unfold(1, k, s).transpose(-1, -2).reshape(-1, k, frames.shape[-1])

    def forward(self, mel: Float[Tensor, "n_seg n_mel frames"]) -> Float[Tensor, "n_seg tokens d_out"]:
        if mel.ndim != 3 or mel.shape[-1] != self.mel_frames:
            raise ValueError(f"audio features must be [segments, mel bins, {self.mel_frames}] (each segment padded to "
                             f"{self.segment_seconds:g} s), got {tuple(mel.shape)}")
        n_seg = mel.shape[0]
        frames = self.whisper(mel.to(self.proj.weight.dtype)).last_hidden_state
        if self.ln_speech is not None:
            frames = self.ln_speech(frames)
        windows = self.windows(frames)
        queries = self.query_tokens.expand(windows.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=windows).last_hidden_state
        out = self.proj(out)
        if self.final_linear is not None:
            out = self.final_linear(out)
        return out.reshape(n_seg, -1, out.shape[-1])


# ---------------------------------------------------------------------------------------------------- front end
#: Whisper front end of both public codes (openai/whisper-large-v3's preprocessor_config.json, and video-SALMONN
#: 2+'s DataArguments: feature_size 128, sampling_rate 16000, hop_length 160, chunk_length 30; n_fft 400)
SAMPLING_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400


def whisper_feature_extractor(n_mels: int, segment_seconds: float, sampling_rate: int = SAMPLING_RATE,
                              hop_length: int = HOP_LENGTH, n_fft: int = N_FFT) -> Any:
    """transformers' `WhisperFeatureExtractor` for segments of `segment_seconds` (30 for the releases; the
    encoder's 2 x max_source_positions mel frames), built from explicit values (nothing is read from the Hub)."""
    from transformers import WhisperFeatureExtractor

    chunk = round(segment_seconds)
    if abs(chunk - segment_seconds) > 1e-9 or chunk < 1:
        raise ValueError(f"segments of {segment_seconds} s: the feature extractor pads to whole seconds")
    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sampling_rate, hop_length=hop_length,
                                   chunk_length=chunk, n_fft=n_fft, padding_value=0.0)


def whisper_segments(feature_extractor: Any, waveform: Any, sampling_rate: int,
                     ) -> Float[Tensor, "n_seg n_mel frames"]:
    """Log-mel features of a waveform cut into segments of the extractor's `chunk_length`, each segment through
    the extractor on its own (so each is padded to a full segment, as in both public codes:
    `[processor(a, sampling_rate=sr, return_tensors="pt")["input_features"].squeeze() for a in audio_lst]`)."""
    segment = int(feature_extractor.n_samples)
    pieces = [waveform[k: k + segment] for k in range(0, len(waveform), segment)]
    if not pieces:
        raise ValueError("an empty waveform has no audio segments")
    return torch.stack([feature_extractor(piece, sampling_rate=sampling_rate, return_tensors="pt")["input_features"][0]
                        for piece in pieces])


# ---------------------------------------------------------------------------------------------------- weight names
_QFORMER_RULES = [
    (r"embeddings\.LayerNorm\.(weight|bias)", r"layernorm.\1"),
    (r"encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"encoder.layer.\1.\2.attention.\3.\4"),
    (r"encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"encoder.layer.\1.\2.output.\3.\4"),
    (r"encoder\.layer\.(\d+)\.(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)",
     r"encoder.layer.\1.\2.\3.\4"),
]
#: public Q-Former entries the released forward never uses (text path, LM head, position buffer)
_QFORMER_UNUSED = re.compile(r"(embeddings\.(position_ids|word_embeddings\..*|position_embeddings\..*)"
                             r"|encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)"
                             r"|cls\..*|pooler\..*)")


def qformer_key(rest: str) -> str | None:
    """Our `qformer.*` name for a public `BertLMHeadModel.bert` key (the part after `bert.`); None for unused
    entries. Raises KeyError for anything else."""
    if _QFORMER_UNUSED.fullmatch(rest):
        return None
    renamed = rename(rest, _QFORMER_RULES)
    if renamed is not None:
        return "qformer." + renamed
    raise KeyError(f"unrecognised Q-Former key {rest!r}")


def qformer_released_key(rest: str) -> str:
    """Inverse of `qformer_key`: the public `bert.*` key (without the leading `bert.`) of our `qformer.*` name
    (the part after `qformer.`)."""
    rules = [
        (r"layernorm\.(weight|bias)", r"embeddings.LayerNorm.\1"),
        (r"encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(query|key|value)\.(weight|bias)",
         r"encoder.layer.\1.\2.self.\3.\4"),
        (r"encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
         r"encoder.layer.\1.\2.output.\3.\4"),
        (r"encoder\.layer\.(\d+)\.(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)",
         r"encoder.layer.\1.\2.\3.\4"),
    ]
    renamed = rename(rest, rules)
    if renamed is not None:
        return renamed
    raise KeyError(f"no public Q-Former key for {rest!r}")


_WHISPER_ENCODER = re.compile(r"(conv[12]\.(weight|bias)|embed_positions\.weight|layer_norm\.(weight|bias)"
                              r"|layers\.\d+\.(self_attn\.(q|k|v|out)_proj|self_attn_layer_norm|fc1|fc2"
                              r"|final_layer_norm)\.(weight|bias))")


def whisper_key(rest: str) -> str:
    """Our `whisper.*` name for a Whisper encoder key (the part after the encoder prefix); the names are
    transformers' own in both public codes. Raises KeyError for anything else."""
    if not _WHISPER_ENCODER.fullmatch(rest):
        raise KeyError(f"unrecognised Whisper encoder key {rest!r}")
    return "whisper." + rest
