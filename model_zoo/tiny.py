"""Tiny random Qwen2.5-Omni thinkers and processor-shaped inputs, for tests, the demo and benchmarks.

The configs exercise every code path (GQA, mrope sections, windowed and full ViT blocks, chunked audio attention)
at sizes that run in milliseconds on a CPU. Inputs are built by hand in the exact layout and shapes the
transformers Qwen2.5-Omni processor emits.
"""

from __future__ import annotations

import torch

VOCAB = 512
TOK = dict(audio=500, image=501, video=502, audio_start=503, audio_end=504, vision_start=505, vision_end=506,
           bos=507, eos=508, pad=509)
MEL = 16
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch


def tiny_thinker_config(**text_overrides):
    from transformers import Qwen2_5OmniThinkerConfig

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
    text.update(text_overrides)
    d_model = text["hidden_size"]
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=MEL, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=d_model, n_window=50, max_source_positions=200),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=d_model,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, in_channels=3,
                           temporal_patch_size=2, spatial_merge_size=2),
        text_config=text,
        audio_token_index=TOK["audio"], image_token_index=TOK["image"], video_token_index=TOK["video"],
        audio_start_token_id=TOK["audio_start"], audio_end_token_id=TOK["audio_end"],
        vision_start_token_id=TOK["vision_start"], vision_end_token_id=TOK["vision_end"],
        bos_token_id=TOK["bos"], eos_token_id=TOK["eos"], pad_token_id=TOK["pad"],
    )


def tiny_hf_thinker(seed: int = 0, attn: str = "eager", **text_overrides):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_thinker_config(**text_overrides)
    cfg._attn_implementation = attn
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    # random init leaves norms at 1 and biases at 0: perturb them so the comparison covers them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "bias")) or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _text(gen, n):
    return torch.randint(0, 400, (n,), generator=gen).tolist()


def audio_features(gen, frames: list[int]):
    """Processor-shaped audio inputs for audios of the given mel-frame counts (padded to the longest)."""
    n = max(frames)
    feats = torch.randn(len(frames), MEL, n, generator=gen)
    fam = torch.zeros(len(frames), n, dtype=torch.long)
    for i, f in enumerate(frames):
        fam[i, :f] = 1
    return feats, fam


def n_audio_tokens(frames: int) -> int:
    a = (frames - 1) // 2 + 1
    return (a - 2) // 2 + 1


def vision_patches(gen, grids: list[tuple[int, int, int]]):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, PATCH_DIM, generator=gen), torch.tensor(grids, dtype=torch.long)


def build_inputs(kind: str, seed: int = 0, **kw):
    """Processor-shaped inputs for one sample: kind in text, audio, image, video, av (audio in video)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [TOK["bos"]] + _text(gen, 5)
    out: dict = {}
    if kind == "audio":
        frames = kw.get("frames", 230)
        out["input_features"], out["feature_attention_mask"] = audio_features(gen, [frames])
        ids += [TOK["audio_start"]] + [TOK["audio"]] * n_audio_tokens(frames) + [TOK["audio_end"]]
    elif kind == "image":
        grid = kw.get("grid", (1, 6, 8))
        out["pixel_values"], out["image_grid_thw"] = vision_patches(gen, [grid])
        ids += [TOK["vision_start"]] + [TOK["image"]] * (grid[0] * grid[1] * grid[2] // 4) + [TOK["vision_end"]]
    elif kind == "video":
        grid = kw.get("grid", (3, 4, 6))
        spg = kw.get("spg", 1.0)
        out["pixel_values_videos"], out["video_grid_thw"] = vision_patches(gen, [grid])
        out["video_second_per_grid"] = torch.tensor([spg])
        ids += [TOK["vision_start"]] + [TOK["video"]] * (grid[0] * grid[1] * grid[2] // 4) + [TOK["vision_end"]]
    elif kind == "av":
        grid = kw.get("grid", (5, 4, 4))
        spg = kw.get("spg", 1.0)
        frames = kw.get("frames", 730)  # 7.3 s: chunks that don't divide evenly
        out["pixel_values_videos"], out["video_grid_thw"] = vision_patches(gen, [grid])
        out["video_second_per_grid"] = torch.tensor([spg])
        out["input_features"], out["feature_attention_mask"] = audio_features(gen, [frames])
        out["use_audio_in_video"] = True
        ids += [TOK["vision_start"], TOK["audio_start"]] + av_interleave(grid, spg, n_audio_tokens(frames))
        ids += [TOK["audio_end"], TOK["vision_end"]]
    elif kind != "text":
        raise ValueError(kind)
    ids += _text(gen, 7)
    out["input_ids"] = torch.tensor([ids])
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def av_interleave(grid, spg, n_audio, per_second=25, chunk_seconds=2):
    """Placeholder ids of an audio-in-video block: [V chunk0][A chunk0][V chunk1]... (processor layout)."""
    t, h, w = grid
    per_grid = h * w // 4
    per_chunk = per_second * chunk_seconds
    v_t = [int(g * spg * per_second) for g in range(t)]
    n_chunks = max(v_t[-1] // per_chunk + 1, (n_audio - 1) // per_chunk + 1)
    ids = []
    for c in range(n_chunks):
        ids += [TOK["video"]] * (per_grid * sum(1 for x in v_t if c * per_chunk <= x < (c + 1) * per_chunk))
        ids += [TOK["audio"]] * len([k for k in range(n_audio) if c * per_chunk <= k < (c + 1) * per_chunk])
    return ids


def collate(samples: list[dict], padding_side: str = "left") -> dict:
    """Batch single-sample inputs the way the processor does: pad ids with the pad token, stack media."""
    from model_zoo.qwen2_5_omni_processing import collate as omni_collate

    return omni_collate(samples, TOK["pad"], padding_side)


class TinyTokenizer:
    """A character-level stand-in tokenizer for the tiny random thinker (ids < 400), so the text side of the
    pipeline (prompts, answer letters) runs without a real vocabulary. Qwen chat markers map to fixed ids."""

    SPECIAL = {"<|im_start|>": 480, "<|im_end|>": 481}
    CHARS = 400

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for marker, tid in self.SPECIAL.items():
                if text.startswith(marker, i):
                    ids.append(tid)
                    i += len(marker)
                    break
            else:
                ids.append(ord(text[i]) % self.CHARS)
                i += 1
        return ids

    def decode(self, ids: list[int]) -> str:
        inverse = {v: k for k, v in self.SPECIAL.items()}
        return "".join(inverse.get(i, chr(i) if i < self.CHARS else "") for i in ids)
