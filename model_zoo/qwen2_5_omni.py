"""Qwen2.5-Omni thinker as a HookedAVModel.

The LLM decoder is the hooked reimplementation of `hooked_av.components`; the audio encoder and the vision encoder
are transformers' own `Qwen2_5OmniAudioEncoder` / `Qwen2_5OmniVisionEncoder` (so they match the reference by
construction), exposed as `audio_tower`, `video_tower` and `image_tower` (the last two share the ViT).
`parse_layout` computes the 3-D TMRoPE position ids (equal to transformers' `get_rope_index`) and the ModalityMap
in one pass over the prompt layout.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_av.checkpoint import rename
from hooked_av.config import AVModelConfig, SinkConstants, TokenIds
from hooked_av.inputs import LayoutError, Modality, ModalityMap, ModalityMapBuilder
from hooked_av.model import AVInputs, HookedAVModel
from hooked_av.towers import HookedTower

FAMILY = "qwen2_5_omni"
HF_THINKER_CLASS = "Qwen2_5OmniThinkerForConditionalGeneration"

#: Qwen2.5-Omni token ids (both sizes), from the released thinker configs.
QWEN25_OMNI_TOKENS = dict(
    audio=151646, image=151655, video=151656, audio_start=151647, audio_end=151648,
    vision_start=151652, vision_end=151653, bos=151644, eos=151645, pad=151643,
)

SINKS_7B = SinkConstants(
    dims=(458, 2570), tau=25.0, eps=1e-6, calibrated=True,
    provenance="official code kaistmm/crossmodal-hub logic/sink.py (DIM_SINK=[458, 2570], TAU=25), Qwen2.5-Omni-7B",
)
SINKS_3B = SinkConstants(
    dims=(), tau=None, calibrated=False,
    provenance="not calibrated: no official constants for Qwen2.5-3B-based models; run the calibration recipe "
    "on real weights (community values for Qwen2.5-VL-3B, [318, 1874, 1819] or [1874, 1819], are unverified)",
)

SINKS_ORGANISM = SinkConstants(
    dims=(), tau=None, calibrated=False,
    provenance="calibrate with hooked_av.recipes.sinks.calibrate_sinks (SmolLM2-135M backbone: massive activations "
    "reported in residual dim 507, DATA.md; not calibrated on the organism)",
)

#: Decoder presets: shapes of the released checkpoints (config.json of Qwen/Qwen2.5-Omni-{7B,3B}).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-omni-7b": dict(
        n_layers=28, d_model=3584, n_heads=28, n_key_value_heads=4, d_head=128, d_mlp=18944, d_vocab=152064,
        n_ctx=32768, rope_theta=1_000_000.0, mrope_section=(16, 24, 24), tie_word_embeddings=False, sinks=SINKS_7B,
    ),
    "qwen2.5-omni-3b": dict(
        n_layers=36, d_model=2048, n_heads=16, n_key_value_heads=2, d_head=128, d_mlp=11008, d_vocab=151936,
        n_ctx=32768, rope_theta=1_000_000.0, mrope_section=(16, 24, 24), tie_word_embeddings=False, sinks=SINKS_3B,
    ),
    # the offline organism (model_zoo.organism.assemble): SmolLM2-135M-Instruct in the Qwen2.5-Omni thinker layout;
    # no n_layers here, so checkpoints of truncated backbones (the first n <= 30 layers) match the preset too
    "organism": dict(
        d_model=576, n_heads=9, n_key_value_heads=3, d_head=64, d_mlp=1536, d_vocab=49159,
        n_ctx=8192, rope_theta=100_000.0, mrope_section=(8, 12, 12), tie_word_embeddings=True, sinks=SINKS_ORGANISM,
    ),
}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def config_from_hf(hf_config: Any, model_name: str = "custom", sinks: SinkConstants | None = None,
                   dtype: torch.dtype = torch.float32) -> AVModelConfig:
    """AVModelConfig from a transformers `Qwen2_5OmniThinkerConfig` (or the thinker part of a full config)."""
    thinker = _get(hf_config, "thinker_config") or hf_config
    text = _get(thinker, "text_config")
    vision = _get(thinker, "vision_config")
    rope = _get(text, "rope_parameters") or _get(text, "rope_scaling") or {}
    n_heads = _get(text, "num_attention_heads")
    d_model = _get(text, "hidden_size")
    tokens = TokenIds(
        audio=_get(thinker, "audio_token_index", _get(thinker, "audio_token_id")),
        image=_get(thinker, "image_token_index", _get(thinker, "image_token_id")),
        video=_get(thinker, "video_token_index", _get(thinker, "video_token_id")),
        audio_start=_get(thinker, "audio_start_token_id"),
        audio_end=_get(thinker, "audio_end_token_id"),
        vision_start=_get(thinker, "vision_start_token_id", QWEN25_OMNI_TOKENS["vision_start"]),
        vision_end=_get(thinker, "vision_end_token_id", QWEN25_OMNI_TOKENS["vision_end"]),
        bos=_get(thinker, "bos_token_id", _get(text, "bos_token_id")),
        eos=_get(thinker, "eos_token_id", _get(text, "eos_token_id")),
        pad=_get(thinker, "pad_token_id", _get(text, "pad_token_id")),
    )
    return AVModelConfig(
        n_layers=_get(text, "num_hidden_layers"),
        d_model=d_model,
        n_heads=n_heads,
        n_key_value_heads=_get(text, "num_key_value_heads"),
        d_head=_get(text, "head_dim") or d_model // n_heads,
        d_mlp=_get(text, "intermediate_size"),
        d_vocab=_get(text, "vocab_size"),
        n_ctx=_get(text, "max_position_embeddings", 32768),
        act_fn=_get(text, "hidden_act", "silu"),
        rms_norm_eps=_get(text, "rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(_get(thinker, "tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", _get(text, "rope_theta", 1_000_000.0))),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        token_ids=tokens,
        position_id_per_seconds=_get(thinker, "position_id_per_seconds", 25),
        seconds_per_chunk=_get(thinker, "seconds_per_chunk", 2),
        spatial_merge_size=_get(vision, "spatial_merge_size", 2),
        sinks=sinks or SinkConstants(),
        model_family=FAMILY,
        model_name=model_name,
        dtype=dtype,
    )


def audio_token_count(feature_lengths: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    """LLM tokens per audio from mel-frame counts: conv stride 2, then average pooling by 2 (25 tokens/s)."""
    after_conv = (feature_lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def _chunk_index(rel_t: list[int], per_chunk: int) -> list[int]:
    """Chunk of each token from its temporal position relative to the block start (non-decreasing input).

    A boundary is crossed at most once per token, as transformers' `get_chunked_index` does (a jump over several
    chunk lengths opens only one new chunk).
    """
    out, chunk, bound = [], 0, per_chunk
    for t in rel_t:
        if t >= bound:
            chunk += 1
            bound += per_chunk
        out.append(chunk)
    return out


def parse_layout(
    cfg: AVModelConfig,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    image_grid_thw: Int[Tensor, "n_image 3"] | None = None,
    video_grid_thw: Int[Tensor, "n_video 3"] | None = None,
    video_second_per_grid: Tensor | None = None,
    audio_lengths: Int[Tensor, " n_audio"] | None = None,
    use_audio_in_video: bool = False,
) -> tuple[Int[Tensor, "3 batch pos"], ModalityMap]:
    """TMRoPE position ids and the ModalityMap of a Qwen2.5-Omni prompt layout.

    Blocks: text; `<|audio_bos|> AUDIO* <|audio_eos|>`; `<|vision_bos|> IMAGE* <|vision_eos|>`;
    `<|vision_bos|> VIDEO* <|vision_eos|>`; and with `use_audio_in_video`,
    `<|vision_bos|><|audio_bos|> [V chunk0][A chunk0][V chunk1]... <|audio_eos|><|vision_eos|>`.
    Media items are consumed in order across the batch (image, video and audio counters), as the processor emits
    them. Padding positions get position 1, as transformers does.
    """
    tok = cfg.token_ids
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pps, merge, per_chunk = cfg.position_id_per_seconds, cfg.spatial_merge_size, cfg.tokens_per_chunk
    positions = torch.ones(3, batch, seq_len, dtype=torch.long)
    builder = ModalityMapBuilder(batch, seq_len, cfg.seconds_per_chunk)
    counters = {"image": 0, "video": 0, "audio": 0}
    grids = {"image": image_grid_thw, "video": video_grid_thw}

    def take(kind: str) -> int:
        i = counters[kind]
        available = {"image": image_grid_thw, "video": video_grid_thw, "audio": audio_lengths}[kind]
        n = 0 if available is None else len(available)
        if i >= n:
            raise LayoutError(f"the prompt holds more {kind} blocks than the inputs provide ({n} {kind} item(s))")
        counters[kind] += 1
        return i

    def vision_grid(kind: str, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """Relative (t, h, w) position rows and temporal grid index of every merged vision token."""
        gt, gh, gw = (int(x) for x in grids[kind][index])
        lh, lw = gh // merge, gw // merge
        if kind == "video":
            if video_second_per_grid is None:
                raise LayoutError("video_second_per_grid is required for video inputs")
            spg = torch.as_tensor(video_second_per_grid)[index].cpu().float()
            t_pos = (torch.arange(gt) * spg * pps).long()
        else:
            t_pos = (torch.arange(gt) * 1 * pps).long()
        g = torch.arange(gt).view(-1, 1).expand(-1, lh * lw).flatten()
        h = torch.arange(lh).view(1, -1, 1).expand(gt, -1, lw).flatten()
        w = torch.arange(lw).view(1, 1, -1).expand(gt, lh, -1).flatten()
        return t_pos[g], h, w, g

    for b in range(batch):
        valid = attention_mask[b].bool()
        idx = valid.nonzero().squeeze(-1)  # absolute positions of the valid tokens
        ids = input_ids[b, idx].tolist()
        n = len(ids)
        pos = torch.zeros(3, n, dtype=torch.long)
        last = -1  # max position of the last emitted piece; the next piece starts at last + 1
        i = 0

        def emit_text(j: int, modality: Modality = Modality.TEXT) -> None:
            nonlocal last
            pos[:, j] = last + 1
            last += 1
            builder.set(b, int(idx[j]), modality)

        def expect(j: int, token: int | None, what: str) -> None:
            if j >= n or ids[j] != token:
                got = "the end of the sequence" if j >= n else f"token {ids[j]}"
                raise LayoutError(f"sample {b}: expected {what} (id {token}) at position {int(idx[j]) if j < n else j}, got {got}")

        def expect_run(j: int, count: int, token: int | None, what: str) -> None:
            run = ids[j : j + count]
            if len(run) != count or any(t != token for t in run):
                found = sum(1 for t in ids if t == token)
                raise LayoutError(
                    f"sample {b}: {what} expects {count} placeholder tokens (id {token}) from position "
                    f"{int(idx[j]) if j < n else j}; the prompt holds {found} such tokens in all"
                )

        while i < n:
            t = ids[i]
            nxt = ids[i + 1] if i + 1 < n else None
            if t == tok.vision_start and nxt == tok.audio_start and use_audio_in_video:
                v, a = take("video"), take("audio")
                bos = last + 1
                pos[:, i : i + 2] = bos
                builder.set(b, idx[i : i + 2], Modality.SPECIAL, item=v)
                st = bos + 1
                vt, vh, vw, vg = vision_grid("video", v)
                n_audio = int(audio_token_count(torch.as_tensor(audio_lengths[a]).view(1))[0])
                at = torch.arange(n_audio)
                v_chunk = _chunk_index(vt.tolist(), per_chunk)
                a_chunk = _chunk_index(at.tolist(), per_chunk)
                n_chunks = max(v_chunk[-1] + 1 if v_chunk else 1, a_chunk[-1] + 1 if a_chunk else 1)
                v_chunk_t, a_chunk_t = torch.tensor(v_chunk), torch.tensor(a_chunk)
                j = i + 2
                spg = float(torch.as_tensor(video_second_per_grid)[v])
                for c in range(n_chunks):
                    for kind, sel_chunk in (("video", v_chunk_t), ("audio", a_chunk_t)):
                        sel = (sel_chunk == c).nonzero().squeeze(-1)
                        if len(sel) == 0:
                            continue
                        m = len(sel)
                        token = tok.video if kind == "video" else tok.audio
                        expect_run(j, m, token, f"chunk {c} of audio-in-video block {v}")
                        if kind == "video":
                            piece = torch.stack([vt[sel], vh[sel], vw[sel]]) + st
                            grid = torch.stack([vg[sel], vh[sel], vw[sel]], dim=-1)
                            builder.set(b, idx[j : j + m], Modality.VIDEO, chunk=c, time=vg[sel].float() * spg,
                                        grid=grid, item=v)
                        else:
                            piece = at[sel].view(1, -1).expand(3, -1) + st
                            builder.set(b, idx[j : j + m], Modality.AUDIO, chunk=c, time=at[sel].float() / pps,
                                        item=a)
                        pos[:, j : j + m] = piece
                        last = int(piece.max())
                        j += m
                expect(j, tok.audio_end, "<|audio_eos|> closing an audio-in-video block")
                expect(j + 1, tok.vision_end, "<|vision_eos|> closing an audio-in-video block")
                pos[:, j : j + 2] = last + 1
                last += 1
                builder.set(b, idx[j : j + 2], Modality.SPECIAL, item=v)
                i = j + 2
            elif t == tok.vision_start and nxt in (tok.image, tok.video) and nxt is not None:
                kind = "image" if nxt == tok.image else "video"
                k = take(kind)
                emit_text(i, Modality.SPECIAL)
                st = last + 1
                vt, vh, vw, vg = vision_grid(kind, k)
                m = len(vt)
                token = tok.image if kind == "image" else tok.video
                expect_run(i + 1, m, token, f"{kind} {k} (grid {grids[kind][k].tolist()})")
                piece = torch.stack([vt, vh, vw]) + st
                pos[:, i + 1 : i + 1 + m] = piece
                last = int(piece.max())
                grid = torch.stack([vg, vh, vw], dim=-1)
                if kind == "video":
                    spg = float(torch.as_tensor(video_second_per_grid)[k])
                    builder.set(b, idx[i + 1 : i + 1 + m], Modality.VIDEO, chunk=vt // per_chunk,
                                time=vg.float() * spg, grid=grid, item=k)
                else:
                    builder.set(b, idx[i + 1 : i + 1 + m], Modality.IMAGE, grid=grid, item=k)
                expect(i + 1 + m, tok.vision_end, f"<|vision_eos|> closing {kind} {k}")
                emit_text(i + 1 + m, Modality.SPECIAL)
                i = i + 2 + m
            elif t == tok.audio_start and nxt == tok.audio:
                k = take("audio")
                emit_text(i, Modality.SPECIAL)
                st = last + 1
                m = int(audio_token_count(torch.as_tensor(audio_lengths[k]).view(1))[0])
                expect_run(i + 1, m, tok.audio, f"audio {k} ({int(audio_lengths[k])} mel frames)")
                at = torch.arange(m)
                pos[:, i + 1 : i + 1 + m] = at + st
                last = st + m - 1
                builder.set(b, idx[i + 1 : i + 1 + m], Modality.AUDIO, chunk=at // per_chunk,
                            time=at.float() / pps, item=k)
                expect(i + 1 + m, tok.audio_end, f"<|audio_eos|> closing audio {k}")
                emit_text(i + 1 + m, Modality.SPECIAL)
                i = i + 2 + m
            else:
                if t in (tok.audio, tok.image, tok.video):
                    raise LayoutError(
                        f"sample {b}: placeholder token {t} at position {int(idx[i])} is outside a modality block"
                    )
                emit_text(i)
                i += 1
        positions[:, b, idx] = pos
    for kind, used in counters.items():
        given = {"image": image_grid_thw, "video": video_grid_thw, "audio": audio_lengths}[kind]
        if given is not None and len(given) != used:
            raise LayoutError(f"the inputs provide {len(given)} {kind} item(s) but the prompt uses {used}")
    return positions, builder.build(family=FAMILY)


_PROCESSOR_KEYS = (
    "input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
    "pixel_values_videos", "video_grid_thw", "video_second_per_grid", "use_audio_in_video",
)


class Qwen25OmniHookedModel(HookedAVModel):
    """Qwen2.5-Omni thinker: hooked decoder, transformers audio and vision encoders as hooked towers."""

    tower_names = ("audio_tower", "video_tower", "image_tower")

    def __init__(self, cfg: AVModelConfig, hf_config: Any):
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

        super().__init__(cfg)
        self.hf_config = hf_config
        audio_cfg, vision_cfg = hf_config.audio_config, hf_config.vision_config
        self.audio_encoder = hf.Qwen2_5OmniAudioEncoder._from_config(audio_cfg)
        self.vision_encoder = hf.Qwen2_5OmniVisionEncoder._from_config(vision_cfg)
        self.audio_tower = HookedTower(audio_cfg.encoder_layers)
        vit_note = "ViT layer outputs are in window order (transformers' window_index), not raster order"
        self.video_tower = HookedTower(vision_cfg.depth, vit_note)
        self.image_tower = HookedTower(vision_cfg.depth, vit_note)
        self.setup()

    # ------------------------------------------------------------ inputs
    def prepare_inputs(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        input_features: Float[Tensor, "n_audio mel frames"] | None = None,
        feature_attention_mask: Int[Tensor, "n_audio frames"] | None = None,
        pixel_values: Float[Tensor, "patches d_patch"] | None = None,
        image_grid_thw: Int[Tensor, "n_image 3"] | None = None,
        pixel_values_videos: Float[Tensor, "patches d_patch"] | None = None,
        video_grid_thw: Int[Tensor, "n_video 3"] | None = None,
        video_second_per_grid: Tensor | list[float] | None = None,
        use_audio_in_video: bool | Tensor = False,
        **unexpected: Any,
    ) -> AVInputs:
        if unexpected:
            raise TypeError(
                f"unexpected input(s) {sorted(unexpected)}; Qwen2.5-Omni takes the processor's keys: "
                f"{', '.join(_PROCESSOR_KEYS)}"
            )
        if input_ids is None:
            raise TypeError("input_ids is required")
        device = self.device
        input_ids = input_ids.to(device)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        audio_lengths = None
        if input_features is not None:
            if feature_attention_mask is None:
                feature_attention_mask = torch.ones(input_features.shape[0], input_features.shape[-1],
                                                    dtype=torch.long)
            audio_lengths = feature_attention_mask.sum(-1).cpu()
        if video_second_per_grid is not None:
            video_second_per_grid = torch.as_tensor(video_second_per_grid)
        use_audio_in_video = bool(use_audio_in_video)
        position_ids, mmap = parse_layout(
            self.cfg, input_ids.cpu(), attention_mask.cpu(),
            image_grid_thw=None if image_grid_thw is None else image_grid_thw.cpu(),
            video_grid_thw=None if video_grid_thw is None else video_grid_thw.cpu(),
            video_second_per_grid=video_second_per_grid, audio_lengths=audio_lengths,
            use_audio_in_video=use_audio_in_video,
        )
        mm = dict(input_features=input_features, feature_attention_mask=feature_attention_mask,
                  pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                  pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                  video_second_per_grid=video_second_per_grid, use_audio_in_video=use_audio_in_video)
        return AVInputs(input_ids, attention_mask, position_ids.to(device), mmap, mm)

    def embed_inputs(self, inputs: AVInputs) -> Float[Tensor, "batch pos d_model"]:
        tok = self.cfg.token_ids
        embeds = self.embed(inputs.input_ids)
        mm = inputs.mm
        if mm.get("input_features") is not None:
            audio = self.audio_tower.run(partial_audio(self, mm["feature_attention_mask"]), mm["input_features"],
                                        list(self.audio_encoder.layers))
            embeds = _scatter(embeds, inputs.input_ids == tok.audio, audio, "audio")
        for kind, key, grid_key, token in (("image", "pixel_values", "image_grid_thw", tok.image),
                                           ("video", "pixel_values_videos", "video_grid_thw", tok.video)):
            if mm.get(key) is None:
                continue
            tower = self.image_tower if kind == "image" else self.video_tower
            grid = mm[grid_key].to(self.device)
            out = tower.run(lambda px, g=grid: self.vision_encoder(px.type(self.vision_encoder.dtype),
                                                                   grid_thw=g).pooler_output, mm[key].to(self.device),
                           list(self.vision_encoder.blocks))
            embeds = _scatter(embeds, inputs.input_ids == token, out, kind)
        return embeds

    # ------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str, max_shard_bytes: int = 2 * 2**30) -> None:
        """Write an HF-format Qwen2.5-Omni thinker checkpoint (config.json + safetensors), loadable by transformers."""
        from hooked_av.checkpoint import save_hf_checkpoint

        save_hf_checkpoint(self, path, to_hf_key, max_shard_bytes=max_shard_bytes)


def partial_audio(model: Qwen25OmniHookedModel, feature_attention_mask: Tensor):
    """The audio encoder call of transformers' `get_audio_features`, on the processor's padded features."""

    def encode(input_features: Tensor) -> Tensor:
        fam = feature_attention_mask.to(input_features.device)
        lengths = fam.sum(-1)
        flat = input_features.permute(0, 2, 1)[fam.bool()].permute(1, 0)
        after_cnn, _ = model.audio_encoder._get_feat_extract_output_lengths(lengths)
        return model.audio_encoder(flat, feature_lens=lengths, aftercnn_lens=after_cnn).last_hidden_state

    return encode


def _scatter(embeds: Tensor, mask: Tensor, values: Tensor, what: str) -> Tensor:
    n = int(mask.sum())
    if n != values.shape[0]:
        raise LayoutError(f"{what}: the prompt holds {n} placeholder tokens but the encoder produced "
                          f"{values.shape[0]} embeddings")
    return embeds.masked_scatter(mask[..., None].to(embeds.device), values.to(embeds.device, embeds.dtype))


# ---------------------------------------------------------------- weight names
_TEXT_RULES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "ln_final.weight"),
    (r"lm_head\.weight", "unembed.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.ln1.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ln2.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.mlp\.(\w+)\.weight", r"blocks.\1.mlp.\2.weight"),
    (r"audio_tower\.(.+)", r"audio_encoder.\1"),
    (r"visual\.(.+)", r"vision_encoder.\1"),
]
_IGNORED_PREFIXES = ("talker.", "token2wav.")


def from_hf_key(key: str) -> str | None:
    """Our parameter name for a checkpoint key (original `thinker.*` names, thinker-only names, or the
    transformers 5.x in-memory names); None for weights outside the thinker (talker, token2wav)."""
    if key.startswith(_IGNORED_PREFIXES):
        return None
    key = key.removeprefix("thinker.")
    key = re.sub(r"^model\.language_model\.", "model.", key)
    key = re.sub(r"^model\.(audio_tower|visual)\.", r"\1.", key)
    renamed = rename(key, _TEXT_RULES)
    if renamed is not None:
        return renamed
    raise KeyError(f"unrecognised Qwen2.5-Omni checkpoint key {key!r}")


def to_hf_key(name: str) -> str:
    """Thinker-only checkpoint key (as transformers' save_pretrained writes it) for one of our parameters."""
    rules = [
        (r"embed\.weight", "model.embed_tokens.weight"),
        (r"ln_final\.weight", "model.norm.weight"),
        (r"unembed\.weight", "lm_head.weight"),
        (r"blocks\.(\d+)\.ln1\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"blocks\.(\d+)\.ln2\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"blocks\.(\d+)\.attn\.(\w+)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
        (r"blocks\.(\d+)\.mlp\.(\w+)\.weight", r"model.layers.\1.mlp.\2.weight"),
        (r"audio_encoder\.(.+)", r"audio_tower.\1"),
        (r"vision_encoder\.(.+)", r"visual.\1"),
    ]
    renamed = rename(name, rules)
    if renamed is not None:
        return renamed
    raise KeyError(f"no checkpoint name for parameter {name!r}")


def build(hf_config: Any, model_name: str = "custom", sinks: SinkConstants | None = None,
          dtype: torch.dtype = torch.float32) -> Qwen25OmniHookedModel:
    """An (uninitialised-weights) model for a transformers thinker config."""
    thinker = getattr(hf_config, "thinker_config", None) or hf_config
    cfg = config_from_hf(thinker, model_name=model_name, sinks=sinks, dtype=dtype)
    return Qwen25OmniHookedModel(cfg, thinker)


def from_hf_model(hf_model: Any, sinks: SinkConstants | None = None, model_name: str = "custom",
                  ) -> Qwen25OmniHookedModel:
    """Convert an in-memory `Qwen2_5OmniThinkerForConditionalGeneration` (or the full Omni model's thinker)."""
    thinker = getattr(hf_model, "thinker", hf_model)
    if type(thinker).__name__ != HF_THINKER_CLASS:
        raise TypeError(f"expected a transformers {HF_THINKER_CLASS}, got {type(thinker).__name__}")
    dtype = next(thinker.parameters()).dtype
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build(thinker.config, model_name=model_name, sinks=sinks, dtype=dtype)
    state = {}
    for key, tensor in thinker.state_dict().items():
        ours = from_hf_key(key)
        if ours is not None:
            state[ours] = tensor
    if model.cfg.tie_word_embeddings:
        state.pop("unembed.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "unembed.weight" and model.cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise KeyError(f"weight conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if model.cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.weight
    return model.to(next(thinker.parameters()).device).eval()
