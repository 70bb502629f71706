"""Raw media loading, raw-level corruptions, and the torchvision-free Qwen2.5-Omni processor path.

Media are written into tmp dirs (PyAV encodes h264 + aac mp4s, soundfile writes wavs, PIL writes frame lists) and
read back. The processor is checked against transformers' own code where it can run without torchvision: the
Whisper feature extractor as `Qwen2_5OmniProcessor._process_audio` calls it, `get_chunked_index` and
`replace_video_with_audio_token` (called on a stub), `Qwen2VLImageProcessorPil` (row ordering), and
`Qwen2VLVideoProcessor.patchify` compiled from the installed source (its module imports torchvision).
"""

from __future__ import annotations

import ast
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")
pytest.importorskip("decord")
PIL_Image = pytest.importorskip("PIL.Image")

from hooked_av.corrupt import (  # noqa: E402
    CORRUPTIONS, check_same_layout, corrupt, corrupted_pair, layout_differences, which_modality_is_corrupted,
)
from hooked_av.inputs import LayoutError  # noqa: E402
from hooked_av.media import (  # noqa: E402
    PAPER_VIDEO, QWEN_OMNI_UTILS_FRAME_LIST, MediaError, RawAV, load_audio, load_av, load_video_frames,
    sample_indices, smart_nframes,
)
from model_zoo.qwen2_5_omni_processing import (  # noqa: E402
    Qwen25OmniMediaProcessor, audio_in_video_ids, chunked_index, num_audio_tokens, patchify_video,
)
from model_zoo.tiny import TOK  # noqa: E402

CLIP_SECONDS = 7.0  # 4 audio-visual chunks of 2 s, the last one partial
CLIP_FPS = 10
CLIP_SIZE = (48, 64)  # height, width
SOURCE_RATE = 44100
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.3
AAC_FRAME = 1024
#: Small video pixel bounds for the tiny model: 48x64 frames -> 56x56 -> (2x2 merged tokens) per temporal grid.
SMALL_VIDEO = dict(video_min_pixels=4 * 28 * 28, video_max_pixels=16 * 28 * 28)
TOKENS_PER_GRID = 4
AUDIO_TOKENS_PER_SECOND = 25
PROMPT_BEFORE, PROMPT_AFTER = [TOK["bos"], 11, 12, 13], [21, 22, TOK["eos"]]


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def write_mp4(path: Path, seconds: float = CLIP_SECONDS, fps: int = CLIP_FPS, size: tuple[int, int] = CLIP_SIZE,
              with_audio: bool = True) -> Path:
    """An h264 (+ stereo aac at 44.1 kHz) mp4 whose frames change over time."""
    container = av.open(str(path), "w")
    video = container.add_stream("h264", rate=fps)
    video.width, video.height, video.pix_fmt = size[1], size[0], "yuv420p"
    audio = container.add_stream("aac", rate=SOURCE_RATE) if with_audio else None
    for i in range(int(fps * seconds)):
        image = np.zeros((*size, 3), np.uint8)
        image[..., 0] = (i * 7) % 255
        image[:, : size[1] // 2, 1] = 200
        for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    if audio is not None:
        wav = tone(seconds, SOURCE_RATE)
        for start in range(0, len(wav), AAC_FRAME):
            block = wav[start:start + AAC_FRAME]
            frame = av.AudioFrame.from_ndarray(np.stack([block, block]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = SOURCE_RATE, start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("media") / "clip.mp4")


@pytest.fixture(scope="module")
def raw(clip_path) -> RawAV:
    return load_av(clip_path)


@pytest.fixture(scope="module")
def processor(model) -> Qwen25OmniMediaProcessor:
    return Qwen25OmniMediaProcessor.from_model(model, **SMALL_VIDEO)


@pytest.fixture(scope="module")
def process(processor):
    return processor.for_prompt(PROMPT_BEFORE, PROMPT_AFTER, use_audio_in_video=True)


@pytest.fixture(scope="module")
def clean_inputs(process, raw) -> dict:
    return process(raw)


# ---------------------------------------------------------------------------------------------------- media
@pytest.mark.parametrize("total, video_fps, expected", [
    (70, 10, 14),       # 7 s at 10 fps -> 2 fps
    (25, 10, 4),        # 5 frames at 2 fps -> floored to a multiple of 2
    (10, 10, 4),        # 2 frames -> raised to the 4-frame minimum
    (3, 10, 2),         # minimum capped by the clip, floored to 2
    (10000, 10, 768),   # 2000 -> 768-frame maximum
])
def test_smart_nframes_rule(total, video_fps, expected):
    assert smart_nframes(total, video_fps) == expected
    assert expected % 2 == 0


def test_load_video_frames_samples_at_fps(clip_path):
    frames = load_video_frames(clip_path)
    n = int(CLIP_SECONDS * 2)
    assert frames.frames.shape == (n, *CLIP_SIZE, 3) and frames.frames.dtype == np.uint8
    assert frames.source_frames == CLIP_SECONDS * CLIP_FPS and frames.source_fps == pytest.approx(CLIP_FPS)
    assert list(frames.indices) == sample_indices(int(CLIP_SECONDS * CLIP_FPS), n)
    assert frames.fps == pytest.approx(2.0)
    slower = load_video_frames(clip_path, fps=1.0)  # 7 frames -> floored to 6
    assert slower.frames.shape[0] == 6 and slower.fps == pytest.approx(6 / 70 * CLIP_FPS)


def test_pyav_fallback_without_decord(clip_path, monkeypatch):
    with_decord = load_video_frames(clip_path)
    monkeypatch.setitem(__import__("sys").modules, "decord", None)  # `import decord` now raises ImportError
    with_pyav = load_video_frames(clip_path)
    assert with_pyav.indices == with_decord.indices and with_pyav.frames.shape == with_decord.frames.shape
    assert with_pyav.fps == pytest.approx(with_decord.fps)
    # two FFmpeg builds (decord bundles 4.1, PyAV 8.x) may convert YUV to RGB slightly differently
    assert np.abs(with_pyav.frames.astype(int) - with_decord.frames.astype(int)).mean() < 2


def test_load_audio_track_of_mp4_is_mono_16k(clip_path):
    wav = load_audio(clip_path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - CLIP_SECONDS * 16000) < 0.01 * CLIP_SECONDS * 16000  # aac priming/padding only
    # channels are averaged (librosa's to_mono), not summed at -3 dB
    assert np.abs(wav[1000:-1000]).max() == pytest.approx(TONE_AMPLITUDE, abs=0.03)


def test_load_audio_wav(tmp_path):
    exact = tone(1.0, 16000)
    sf.write(tmp_path / "mono16k.wav", exact, 16000, subtype="FLOAT")
    assert np.array_equal(load_audio(tmp_path / "mono16k.wav"), exact)
    stereo = np.stack([tone(1.0, SOURCE_RATE)] * 2, axis=1)
    sf.write(tmp_path / "stereo44k.flac", stereo, SOURCE_RATE)
    wav = load_audio(tmp_path / "stereo44k.flac")
    assert wav.dtype == np.float32 and abs(len(wav) - 16000) <= 16
    assert np.abs(wav[500:-500]).max() == pytest.approx(TONE_AMPLITUDE, abs=0.02)


def test_load_av_takes_the_video_track(raw, clip_path):
    assert raw.frames.shape == (int(CLIP_SECONDS * 2), *CLIP_SIZE, 3)
    assert raw.sample_rate == 16000 and raw.fps == pytest.approx(2.0)
    assert raw.video_source == raw.audio_source == str(clip_path)
    assert raw.duration == pytest.approx(CLIP_SECONDS, abs=0.05)
    assert raw.video_duration == pytest.approx(CLIP_SECONDS) and raw.corruptions == ()


def test_frame_list_is_padded_to_even(tmp_path):
    paths = []
    for i, suffix in enumerate(("png", "png", "jpg")):
        PIL_Image.fromarray(np.full((40, 60, 3), 60 * i, np.uint8)).save(tmp_path / f"f{i}.{suffix}")
        paths.append(tmp_path / f"f{i}.{suffix}")
    frames = load_video_frames(paths, fps=1.0)
    assert frames.frames.shape == (4, 40, 60, 3) and frames.fps == 1.0 and frames.source_frames == 3
    assert np.array_equal(frames.frames[3], frames.frames[2])
    resized = load_video_frames(paths, resize=QWEN_OMNI_UTILS_FRAME_LIST)
    assert resized.frames.shape[1] % 28 == 0 and resized.frames.shape[2] % 28 == 0
    PIL_Image.fromarray(np.zeros((30, 60, 3), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(MediaError, match=r"odd\.png: frame size 60x30 differs"):
        load_video_frames(paths + [tmp_path / "odd.png"])


def test_paper_resize_gives_the_paper_frame_size():
    # METHOD §2.5: a 360x640 clip of 20 frames becomes 224x420 with the paper's VIDEO_MAX_PIXELS
    assert PAPER_VIDEO.target_size(360, 640, 20) == (224, 420)


def test_media_errors_name_file_and_problem(tmp_path, clip_path):
    def raises(call, *args, match: str):
        with pytest.raises(MediaError, match=match) as err:
            call(*args)
        # one line naming the file; the decoder's exception is not chained onto it
        assert err.value.__cause__ is None
        assert err.value.__context__ is None or err.value.__suppress_context__
        assert "\n" not in str(err.value)

    raises(load_audio, tmp_path / "nope.wav", match=r"nope\.wav: no such file")
    raises(load_video_frames, tmp_path / "nope.mp4", match=r"nope\.mp4: no such file")
    silent = write_mp4(tmp_path / "silent.mp4", seconds=2.0, with_audio=False)
    raises(load_audio, silent, match=r"silent\.mp4: no audio stream")
    raises(load_av, silent, match=r"silent\.mp4: no audio stream")
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 10)
    raises(load_video_frames, tmp_path / "garbage.mp4", match=r"garbage\.mp4: unreadable")
    raises(load_audio, tmp_path / "garbage.mp4", match=r"garbage\.mp4: unreadable")
    sf.write(tmp_path / "a.wav", tone(0.5, 16000), 16000)
    raises(load_video_frames, tmp_path / "a.wav", match=r"a\.wav: no video stream")
    raises(load_audio, tmp_path, match="not a file")


# ---------------------------------------------------------------------------------------------------- corruptions
def test_corruptions_keep_shapes_and_are_recorded(raw):
    silent = corrupt(raw, "zero_audio")
    assert silent.waveform.shape == raw.waveform.shape and silent.waveform.dtype == np.float32
    assert not silent.waveform.any() and silent.frames is raw.frames
    assert [r.name for r in silent.corruptions] == ["zero_audio"]
    black = corrupt(silent, "black_frames")
    assert black.frames.shape == raw.frames.shape and black.frames.dtype == np.uint8 and not black.frames.any()
    assert [(r.name, r.modality) for r in black.corruptions] == [("zero_audio", "audio"), ("black_frames", "video")]
    assert raw.waveform.any() and raw.frames.any()  # the clean clip is untouched


def test_noise_is_seeded(raw):
    a, b = corrupt(raw, "noise_audio", std=0.05, seed=3), corrupt(raw, "noise_audio", std=0.05, seed=3)
    assert np.array_equal(a.waveform, b.waveform) and not np.array_equal(a.waveform, raw.waveform)
    assert not np.array_equal(a.waveform, corrupt(raw, "noise_audio", std=0.05, seed=4).waveform)
    assert a.corruptions[-1].params == {"std": 0.05, "seed": 3}
    f1, f2 = corrupt(raw, "noise_frames", seed=1), corrupt(raw, "noise_frames", seed=1)
    assert np.array_equal(f1.frames, f2.frames) and f1.frames.dtype == np.uint8
    assert f1.frames.shape == raw.frames.shape and not np.array_equal(f1.frames, raw.frames)


def test_registry_and_modalities(raw):
    assert {"zero_audio", "black_frames", "noise_audio", "noise_frames"} <= set(CORRUPTIONS)
    assert which_modality_is_corrupted("zero_audio") == "audio"
    assert which_modality_is_corrupted("black_frames") == "video"
    with pytest.raises(KeyError, match="unknown corruption 'mute'; known: zero_audio"):
        corrupt(raw, "mute")
    with pytest.raises(ValueError, match="no waveform"):
        corrupt(RawAV(frames=raw.frames), "zero_audio")


def test_layout_difference_message():
    clean = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 500, 500, 6]]), "attention_mask": torch.ones(1, 8)}
    swapped = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 502, 502, 6]]), "attention_mask": torch.ones(1, 8)}
    with pytest.raises(LayoutError) as err:
        check_same_layout(clean, swapped)
    assert str(err.value) == ("corrupted inputs change the token layout: "
                              "input_ids differ at 2 positions (first at 5: 500 vs 502)")
    grids = dict(clean, video_grid_thw=torch.tensor([[2, 4, 4]]))
    assert layout_differences(grids, dict(clean, video_grid_thw=torch.tensor([[2, 4, 6]]))) == [
        "video_grid_thw differ at 1 entries (first at 2: 4 vs 6)"]
    assert layout_differences(grids, clean) == ["video_grid_thw is missing from the corrupted inputs"]


def test_corrupted_pair_rejects_layout_changes(processor, raw):
    def truncate_audio(r: RawAV) -> RawAV:
        return RawAV(r.waveform[: len(r.waveform) // 2], r.frames, r.sample_rate, r.fps)

    with pytest.raises(LayoutError, match=r"input_ids shape \(1, \d+\) vs \(1, \d+\).*audio feature lengths differ"):
        corrupted_pair(processor.for_prompt(PROMPT_BEFORE, PROMPT_AFTER), raw, truncate_audio)

    def drop_frames(r: RawAV) -> RawAV:
        return RawAV(None, r.frames[: len(r.frames) // 2], r.sample_rate, r.fps)

    video_only = RawAV(None, raw.frames, raw.sample_rate, raw.fps)
    with pytest.raises(LayoutError, match=r"video_grid_thw differ at 1 entries \(first at 0: 7 vs 4\)"):
        corrupted_pair(processor.for_prompt(PROMPT_BEFORE, PROMPT_AFTER), video_only, drop_frames)


# ---------------------------------------------------------------------------------------------------- vs transformers
def omni_processor_stub(feature_extractor=None, merge_size: int = 2) -> types.SimpleNamespace:
    """The attributes of Qwen2_5OmniProcessor that its audio and placeholder methods read, with those methods
    bound: transformers' own code runs without building the processor (which needs torchvision)."""
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

    stub = types.SimpleNamespace(
        feature_extractor=feature_extractor, audio_token="<|AUDIO|>", video_token="<|VIDEO|>",
        audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>",
        video_processor=types.SimpleNamespace(merge_size=merge_size),
    )
    for name in ("_process_audio", "replace_audio_token", "get_chunked_index", "replace_video_with_audio_token"):
        setattr(stub, name, types.MethodType(getattr(Qwen2_5OmniProcessor, name), stub))
    return stub


STUB_TOKEN_IDS = {"<|AUDIO|>": TOK["audio"], "<|VIDEO|>": TOK["video"], "<|audio_bos|>": TOK["audio_start"],
                  "<|audio_eos|>": TOK["audio_end"]}


def test_processor_constants_match_transformers():
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor as P

    from model_zoo import qwen2_5_omni_processing as q

    assert P.videos_kwargs["size"] == {"shortest_edge": q.VIDEO_MIN_PIXELS, "longest_edge": q.VIDEO_MAX_PIXELS}
    assert P.audio_kwargs == {"sampling_rate": q.SAMPLING_RATE, "return_attention_mask": True}
    assert (P.seconds_per_chunk, P.position_id_per_seconds) == (q.SECONDS_PER_CHUNK, q.POSITION_ID_PER_SECONDS)


def test_audio_features_match_the_omni_processor_call(processor, raw):
    from transformers import WhisperFeatureExtractor

    ours = processor.audio_features(raw.waveform)
    n_mels = processor.settings.n_mels
    reference = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160, chunk_length=300,
                                        n_fft=400, padding_value=0.0, return_attention_mask=True)
    # Qwen2_5OmniProcessor._process_audio with its merged audio kwargs (padding="max_length" is forced inside)
    audio_inputs, replacements = omni_processor_stub(reference)._process_audio(
        [raw.waveform], sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    assert torch.equal(ours["input_features"], audio_inputs["input_features"])
    assert torch.equal(ours["feature_attention_mask"], audio_inputs["feature_attention_mask"])
    assert ours["input_features"].shape == (1, n_mels, 30000) and ours["feature_attention_mask"].dtype == torch.int32
    n = num_audio_tokens(int(ours["feature_attention_mask"].sum()))
    assert int(audio_inputs["num_audio_tokens"][0]) == n and replacements == ["<|AUDIO|>" * n]


def test_chunked_index_matches_transformers():
    stub = omni_processor_stub()
    gen = np.random.default_rng(0)
    for _ in range(20):
        values = np.sort(gen.integers(0, 400, size=int(gen.integers(1, 60)))).astype(float)
        assert chunked_index(values.tolist(), 50) == stub.get_chunked_index(values, 50)


@pytest.mark.parametrize("grid, spg, n_audio", [
    ((7, 4, 4), 1.0, 175),    # the test clip: 4 chunks, the last one partial
    ((5, 4, 6), 1.0, 100),    # video longer than audio
    ((2, 4, 4), 1.0, 260),    # audio longer than video
    ((4, 2, 2), 2.5, 90),     # a grid every 62.5 positions: jumps over chunk boundaries
    ((6, 2, 4), 0.5, 49),     # 4 fps
])
def test_audio_in_video_placeholders_match_transformers(grid, spg, n_audio):
    stub = omni_processor_stub()
    text = stub.replace_video_with_audio_token(
        {"video_grid_thw": np.array([grid]), "video_second_per_grid": [spg]}, 0,
        {"num_audio_tokens": np.array([n_audio])}, 0, position_id_per_seconds=25, seconds_per_chunk=2)
    expected = [STUB_TOKEN_IDS[t] for t in re.findall(r"<\|[^|]+\|>", text)]
    from hooked_av.config import TokenIds

    assert audio_in_video_ids(grid, spg, n_audio, TokenIds(**TOK)) == expected


def test_video_patchify_of_two_identical_frames_equals_the_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from hooked_av.config import TokenIds

    bounds = dict(min_pixels=8 * 28 * 28, max_pixels=40 * 28 * 28)
    frame = np.random.default_rng(1).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    proc = Qwen25OmniMediaProcessor(TokenIds(**TOK), n_mels=16, video_min_pixels=bounds["min_pixels"],
                                    video_max_pixels=bounds["max_pixels"])
    ours = proc.video_pixels(np.stack([frame, frame]), fps=2.0)
    image = Qwen2VLImageProcessorPil(**bounds)(images=[frame], return_tensors="pt")
    assert ours["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    assert image["pixel_values"].shape[0] > 16  # several merge blocks in both directions
    assert torch.equal(ours["pixel_values_videos"], image["pixel_values"])


def _transformers_video_patchify():
    """`Qwen2VLVideoProcessor.patchify` compiled from the installed source (the module imports torchvision)."""
    import transformers.models.qwen2_vl as pkg

    source = Path(pkg.__file__).with_name("video_processing_qwen2_vl.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "video_processing_qwen2_vl.py", "exec"), namespace)
    return namespace["patchify"]


def test_video_patchify_matches_transformers_source():
    patchify = _transformers_video_patchify()
    video = np.random.default_rng(2).standard_normal((5, 3, 56, 84)).astype(np.float32)  # odd frame count: padding
    rows, grid = patchify_video(video, 14, 2, 2)
    ref, gt, gh, gw = patchify(None, torch.from_numpy(video)[None], patch_size=14, merge_size=2, temporal_patch_size=2)
    assert grid == (gt, gh, gw) == (3, 4, 6)
    assert torch.equal(torch.from_numpy(rows), ref[0])


# ---------------------------------------------------------------------------------------------------- with the model
def expected_chunk_counts(n_grids: int, n_audio: int, spg: float = 1.0) -> list[tuple[int, int]]:
    """(video, audio) tokens per 2-s chunk, from clip durations: grid g starts at g*spg seconds, audio token k at
    k/25 seconds."""
    video_t = [g * spg for g in range(n_grids)]
    audio_t = [k / AUDIO_TOKENS_PER_SECOND for k in range(n_audio)]
    n_chunks = math.ceil(max(video_t[-1] + 1e-9, audio_t[-1] + 1e-9) / 2)
    return [(TOKENS_PER_GRID * sum(2 * c <= t < 2 * (c + 1) for t in video_t),
             sum(2 * c <= t < 2 * (c + 1) for t in audio_t)) for c in range(n_chunks)]


def test_clip_through_processor_and_model(model, raw, clean_inputs):
    out = clean_inputs
    assert list(out) == ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw",
                         "video_second_per_grid", "input_features", "feature_attention_mask", "use_audio_in_video"]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == out["video_grid_thw"].dtype == torch.long
    assert out["pixel_values_videos"].dtype == out["video_second_per_grid"].dtype == torch.float32
    assert out["use_audio_in_video"] is True and out["video_second_per_grid"].tolist() == [1.0]
    n_grids = len(raw.frames) // 2
    assert out["video_grid_thw"].tolist() == [[n_grids, 4, 4]]
    n_audio = num_audio_tokens(math.ceil(len(raw.waveform) / 160))
    assert n_audio == AUDIO_TOKENS_PER_SECOND * CLIP_SECONDS  # 175 tokens for 7 s
    expected = expected_chunk_counts(n_grids, n_audio)
    assert len(expected) >= 3

    mm = model.modality_map(**out)
    assert mm.n_chunks() == len(expected)
    got = [(len(mm.positions("video", chunk=c)), len(mm.positions("audio", chunk=c))) for c in range(mm.n_chunks())]
    assert got == expected == [(8, 50), (8, 50), (8, 50), (4, 25)]
    counts = mm.counts()
    assert counts["text"] == len(PROMPT_BEFORE) + len(PROMPT_AFTER) and counts["special"] == 4
    logits = model(**out)
    assert logits.shape == (1, out["input_ids"].shape[1], model.cfg.d_vocab) and torch.isfinite(logits).all()


def test_processor_outputs_feed_the_transformers_thinker(hf_thinker, model, clean_inputs):
    """transformers' own forward (placeholder scatter, get_rope_index over the interleaved chunks) accepts the
    outputs and agrees with the hooked model."""
    with torch.no_grad():
        reference = hf_thinker(**clean_inputs).logits
    assert (model(**clean_inputs) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("name, changed, kept", [
    ("zero_audio", "input_features", "pixel_values_videos"),
    ("black_frames", "pixel_values_videos", "input_features"),
])
def test_paper_corruptions_keep_the_layout(model, processor, process, raw, name, changed, kept):
    clean, corrupted = corrupted_pair(process, raw, name)
    assert not torch.equal(clean[changed], corrupted[changed]) and torch.equal(clean[kept], corrupted[kept])
    assert model.modality_map(**clean).same_layout(model.modality_map(**corrupted))
    if name == "black_frames":  # black pixels normalise to -mean/std per channel (channel is the slowest axis)
        proc = processor.video_frame_processor
        per_channel = corrupted["pixel_values_videos"].view(-1, 3, 2 * 14 * 14)
        expected = -torch.tensor(proc.image_mean) / torch.tensor(proc.image_std)
        assert torch.allclose(per_channel, expected.view(1, 3, 1).expand_as(per_channel), atol=1e-6)
    clean_logits, corrupted_logits = model(**clean), model(**corrupted)
    assert torch.isfinite(corrupted_logits).all() and not torch.allclose(clean_logits, corrupted_logits)


def test_separate_blocks_without_audio_in_video(model, processor, raw, clean_inputs):
    out = processor(raw, PROMPT_BEFORE, PROMPT_AFTER, use_audio_in_video=False)
    assert out["use_audio_in_video"] is False
    assert torch.equal(out["input_features"], clean_inputs["input_features"])
    counts = model.modality_map(**out).counts()
    assert counts["video"] == TOKENS_PER_GRID * len(raw.frames) // 2 and counts["audio"] == 175
    assert counts["special"] == 4 and model(**out).shape[1] == out["input_ids"].shape[1]


def test_audio_only(model, processor, raw):
    out = processor(RawAV(waveform=raw.waveform), PROMPT_BEFORE, PROMPT_AFTER)
    assert "pixel_values_videos" not in out and out["use_audio_in_video"] is False
    mm = model.modality_map(**out)
    assert mm.counts()["audio"] == 175 and mm.ranges("audio") == [(len(PROMPT_BEFORE) + 1, len(PROMPT_BEFORE) + 176)]
    assert torch.isfinite(model(**out)).all()


def test_image_input(model, processor):
    image = np.random.default_rng(3).integers(0, 256, (64, 90, 3), dtype=np.uint8)
    out = processor(None, PROMPT_BEFORE, PROMPT_AFTER, images=[image])
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "use_audio_in_video"}
    grid = out["image_grid_thw"][0].tolist()
    assert model.modality_map(**out).counts()["image"] == grid[0] * grid[1] * grid[2] // 4
    assert torch.isfinite(model(**out)).all()


def test_trimmed_audio_padding_gives_the_same_logits(model, clean_inputs):
    from model_zoo.qwen2_5_omni_processing import trim_audio_padding

    trimmed = trim_audio_padding(clean_inputs)
    assert trimmed["input_features"].shape[-1] < clean_inputs["input_features"].shape[-1]
    with torch.no_grad():
        torch.testing.assert_close(model(**trimmed), model(**clean_inputs), rtol=1e-5, atol=1e-5)
