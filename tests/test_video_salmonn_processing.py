"""Raw-media processing of video-SALMONN 2+ and video-SALMONN-o1 (model_zoo.video_salmonn_processing), tiny models.

Expectations are written out by hand from the public code's rules (MODELS.md sections 3 and 4, the module docstring):
frame indices, pixel budgets and resized sizes, token counts and the interleave order for given clip lengths. Audio
features are compared with transformers' `WhisperFeatureExtractor` run on each segment, 2+ pixels with
transformers' `Qwen2VLImageProcessorPil` run as an image processor, o1 pixels with the transforms LLaVA's
`SigLipImageProcessor` chains (transformers' `resize`, `rescale`, `normalize`). End to end: files written with
avsynth's mp4 / wav writers are read by the runtime's clip reader, processed, and run through the tiny models; the
CLI traces them.
"""

import json

import numpy as np
import pytest
import torch

from hooked_av.inputs import Modality
from hooked_av.media import RawAV
from model_zoo import video_salmonn2, video_salmonn_o1
from model_zoo.tiny_video_salmonn import MEL, TOK, tiny_o1_config, tiny_vs2_config
from model_zoo.video_salmonn_processing import (
    O1ChatProcessor, O1MediaProcessor, Salmonn2ChatProcessor, Salmonn2MediaProcessor, o1_frame_indices,
    vs2_frame_indices, vs2_frame_max_pixels,
)

SR = 16000
BEFORE, AFTER = [1, 2, 3], [4, 5]
IMAGE = video_salmonn_o1.IMAGE_TOKEN_INDEX
#: tiny Whisper: 1-s segments (max_source_positions 50) of 100 mel frames, 16 mel bins
SEGMENT = SR


def init_random(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def vs2():
    return init_random(video_salmonn2.build(tiny_vs2_config()))


@pytest.fixture(scope="module")
def o1():
    return init_random(video_salmonn_o1.build(tiny_o1_config()))


def clip(seconds=2.0, fps=10.0, size=(48, 64), audio_seconds=None, audio=True, seed=0, pairs=False):
    """An in-memory clip: `seconds x fps` random frames, a waveform of `audio_seconds` (default: the video's)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * fps)
    frames = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    if pairs:
        frames[1::2] = frames[0::2]
    length = round((seconds if audio_seconds is None else audio_seconds) * SR)
    wav = (0.1 * rng.standard_normal(length)).astype(np.float32) if audio else None
    return RawAV(waveform=wav, frames=frames, sample_rate=SR, fps=fps)


def whisper(n_mels=MEL, chunk=1):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SR, hop_length=160, chunk_length=chunk,
                                   n_fft=400)


def reference_segments(wav, n_samples=SEGMENT):
    """The public `process_audio` loop: 1-s pieces (tiny segments), each through the feature extractor."""
    fe = whisper()
    return torch.stack([fe(wav[k:k + n_samples], sampling_rate=SR, return_tensors="pt")["input_features"].squeeze()
                        for k in range(0, len(wav), n_samples)])


def kinds(mm, b=0):
    letter = {Modality.TEXT: "t", Modality.AUDIO: "a", Modality.VIDEO: "v", Modality.SPECIAL: "s"}
    return "".join(letter[Modality(int(m))] for m in mm.modality[b].tolist())


# ---------------------------------------------------------------------------------------------------- 2+: rules
@pytest.mark.parametrize("n, fps, expected", [
    (20, 10.0, list(range(20))),           # 2 s -> 20 frames wanted, 20 there
    (8, 2.0, list(range(8))),              # 4 s at 2 fps: 40 wanted, duplicates of linspace removed -> all 8
    (30, 25.0, [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29]),  # 1.2 s -> 12, raised to 16
    (250, 25.0, [int(i * 249 / 99) for i in range(100)]),  # 10 s -> 100 of 250 (linspace, truncated)
])
def test_vs2_frame_indices_by_hand(n, fps, expected):
    assert vs2_frame_indices(n, fps) == expected


def test_vs2_frame_indices_cap_and_pixel_budget():
    idx = vs2_frame_indices(10000, 25.0)  # 400 s -> 4000 frames wanted, capped at 768
    assert len(idx) == 768 and idx[0] == 0 and idx[-1] == 9999
    assert vs2_frame_max_pixels(768) == 61250
    assert vs2_frame_max_pixels(16) == pytest.approx(0.95 * 48 * 61250)  # 2,793,000
    assert vs2_frame_max_pixels(100) == pytest.approx(446880.0)


@pytest.mark.parametrize("n_frames, size", [(768, (168, 308)), (100, (364, 644)), (16, (364, 644))])
def test_vs2_resize_of_a_360p_frame(n_frames, size):
    """smart_resize(360, 640) by hand: 364 x 644 fits any budget above 234,416 pixels; at 768 frames (61,250
    pixels) beta = sqrt(230400 / 61250) -> floor(360 / beta / 28) x 28 = 168, floor(640 / beta / 28) x 28 = 308."""
    from model_zoo.vision_processing import normalized_frames

    proc = Salmonn2MediaProcessor(video_salmonn2.parse_config(tiny_vs2_config()).tokens)
    frame = np.zeros((1, 360, 640, 3), np.uint8)
    out = normalized_frames(proc.frame_processor, frame, 3136, proc.frame_max_pixels(n_frames), 28)
    assert out.shape == (1, 3, *size)


# ---------------------------------------------------------------------------------------------------- 2+: a clip
def test_vs2_clip_layout_features_and_forward(vs2):
    """2 s at 10 fps, 48 x 64 frames, 2 s of audio: all 20 frames kept (20 wanted), fps 10, 0.2 s per grid, 10
    grids of 56 x 56 (4 x 4 patches -> 4 tokens); 2 one-second segments of 2 tokens. Audio after grid g:
    floor((g+1) 0.4) - floor(g 0.4) = 0 0 1 0 1 0 0 1 0, the last grid the rest (4 - 3 = 1)."""
    proc = Salmonn2MediaProcessor.from_model(vs2)
    raw = clip(pairs=True)
    out = proc(raw, BEFORE, AFTER)
    assert out["video_grid_thw"].tolist() == [[10, 4, 4]]
    assert out["second_per_grid_ts"].tolist() == pytest.approx([0.2])
    assert out["audio_lengths"].tolist() == [4]
    per_grid = [0, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    block = [TOK["vision_start"]]
    for n in per_grid:
        block += [TOK["video"]] * 4 + [TOK["audio"]] * n
    assert out["input_ids"][0].tolist() == BEFORE + block + [TOK["vision_end"]] + AFTER
    # audio: each 1-s segment through transformers' WhisperFeatureExtractor
    assert torch.equal(out["audio_feature"], reference_segments(raw.waveform))
    assert out["audio_feature"].shape == (2, MEL, 100)
    # pixels: frames come in identical pairs, so each temporal grid equals transformers' image processor's
    # patches of one frame (an image is repeated to the temporal patch size) with the same pixel bounds
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=proc.frame_max_pixels(20))
    rows = out["pixel_values_videos"].view(10, 16, -1)
    for g in (0, 7):
        ref = image_proc(images=[raw.frames[2 * g]], return_tensors="pt")
        assert ref["image_grid_thw"].tolist() == [[1, 4, 4]]
        torch.testing.assert_close(rows[g], ref["pixel_values"], atol=1e-6, rtol=0)
    # through the model: the ModalityMap follows the interleave, times from the grids and the audio windows
    with torch.no_grad():
        logits = vs2(**out)
    assert logits.shape == (1, out["input_ids"].shape[1], 512) and torch.isfinite(logits).all()
    mm = vs2.modality_map(**out)
    expected = "ttt" + "s" + "".join("v" * 4 + "a" * n for n in per_grid) + "s" + "tt"
    assert kinds(mm) == expected
    assert mm.time[0, mm.positions("audio")].tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert mm.time[0, mm.positions("video")].unique().tolist() == pytest.approx([0.2 * g for g in range(10)])


def test_vs2_audio_alone_visual_only_and_longer_audio(vs2):
    proc = Salmonn2MediaProcessor.from_model(vs2)
    # audio alone, 0.4 s: padded to 1 s -> one segment, 2 tokens, `<|vision_start|><|audio_pad|>*<|vision_end|>`
    wav = (0.1 * np.random.default_rng(1).standard_normal(6400)).astype(np.float32)
    out = proc(RawAV(waveform=wav, sample_rate=SR), BEFORE, AFTER)
    assert out["input_ids"][0].tolist() == BEFORE + [TOK["vision_start"], TOK["audio"], TOK["audio"],
                                                     TOK["vision_end"]] + AFTER
    assert torch.equal(out["audio_feature"], reference_segments(np.concatenate([wav, np.zeros(9600, np.float32)])))
    assert "pixel_values_videos" not in out
    # the visual-only layout (use_audio=False): Qwen2.5-VL's video block, no audio inputs
    out = proc(clip(), BEFORE, AFTER, use_audio=False)
    assert out["input_ids"][0].tolist() == BEFORE + [TOK["vision_start"]] + [TOK["video"]] * 40 + \
        [TOK["vision_end"]] + AFTER
    assert "audio_feature" not in out and "audio_lengths" not in out
    # audio longer than the video is kept whole (no truncation in 2+): 3.5 s -> 4 segments, 8 tokens; the last
    # grid takes the 5 tokens past floor(9 x 0.4) = 3
    out = proc(clip(audio_seconds=3.5), BEFORE, AFTER)
    assert out["audio_lengths"].tolist() == [8] and out["audio_feature"].shape[0] == 4
    ids = out["input_ids"][0].tolist()
    assert ids[-len(AFTER) - 1 - 5:-len(AFTER) - 1] == [TOK["audio"]] * 5
    with torch.no_grad():
        assert torch.isfinite(vs2(**out)).all()


def test_vs2_bad_input_errors(vs2):
    proc = Salmonn2MediaProcessor.from_model(vs2)
    with pytest.raises(ValueError, match="no audio track.*use_audio=False"):
        proc(clip(audio=False), BEFORE, AFTER)
    wav = np.zeros(44100, np.float32)
    with pytest.raises(ValueError, match="44100 Hz; video-SALMONN 2\\+ needs 16000 Hz"):
        proc(RawAV(waveform=wav, sample_rate=44100), BEFORE, AFTER)
    with pytest.raises(ValueError, match="needs a video-SALMONN 2\\+ model"):
        Salmonn2MediaProcessor.from_model(video_salmonn_o1.build(tiny_o1_config()))


# ---------------------------------------------------------------------------------------------------- o1: rules
@pytest.mark.parametrize("n, fps, expected", [
    (20, 10.0, [0, 5, 10, 15]),                    # every round(10 / 2) = 5th frame
    (250, 25.0, list(range(0, 250, 12))),          # round(12.5) = 12 (half to even): 21 frames
    (30, 3.0, list(range(0, 30, 2))),              # round(1.5) = 2
    (7, 1.0, list(range(7))),                      # round(0.5) = 0 -> at least 1
    (200, 2.0, [int(i * 199 / 59) for i in range(60)]),  # 100 s: 100 > 60 frames -> linspace(0, 199, 60)
])
def test_o1_frame_indices_by_hand(n, fps, expected):
    assert o1_frame_indices(n, fps) == expected


@pytest.mark.parametrize("n, fps", [(250, 25.0), (20, 10.0), (29, 2.9), (70, 7.0), (3000, 30.0), (13, 2.0)])
def test_frame_rules_keep_their_own_output(n, fps):
    """A clip read with a family's rule (fps = kept / n x fps, as hooked_av.media.load_av reports it) keeps all its
    frames when the processor applies the rule again."""
    for rule in (vs2_frame_indices, o1_frame_indices):
        kept = rule(n, fps)
        assert rule(len(kept), len(kept) / n * fps) == list(range(len(kept)))


# ---------------------------------------------------------------------------------------------------- o1: a clip
def siglip_reference(frames, size):
    """LLaVA's SigLipImageProcessor transforms on each frame: resize (PIL bicubic), rescale 1/255, normalise 0.5."""
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    out = []
    for frame in frames:
        x = resize(frame, (size, size), resample=PILImageResampling.BICUBIC, data_format=ChannelDimension.FIRST,
                   input_data_format=ChannelDimension.LAST)
        x = rescale(x, 1 / 255, data_format=ChannelDimension.FIRST, input_data_format=ChannelDimension.FIRST)
        x = normalize(x, (0.5,) * 3, (0.5,) * 3, data_format=ChannelDimension.FIRST,
                      input_data_format=ChannelDimension.FIRST)
        out.append(torch.from_numpy(np.asarray(x, dtype=np.float32)))
    return torch.stack(out)


def test_o1_clip_layout_features_and_forward(o1):
    """2 s at 10 fps: frames 0, 5, 10, 15 (2 fps); 70-px SigLIP, 5 x 5 patches max-pooled to 2 x 2: per frame two
    rows of (2 tokens + newline); audio 3.3 s cut to the video's 2 s -> 2 one-second segments of 5 tokens (0.2-s
    windows); 10 tokens over 4 frames interpolate (nearest) to 12: 0 0 1 | 2 3 4 | 5 5 6 | 7 8 9."""
    proc = O1MediaProcessor.from_model(o1)
    raw = clip(audio_seconds=3.3)
    out = proc(raw, BEFORE, AFTER)
    assert out["input_ids"][0].tolist() == BEFORE + [IMAGE] + AFTER
    assert out["real_time"] == [2.0] and out["modalities"] == ["audio-video"] and out["org_groups"] == [2]
    assert out["frame_times"] == [[0.0, 0.5, 1.0, 1.5]]
    torch.testing.assert_close(out["images"][0], siglip_reference(raw.frames[[0, 5, 10, 15]], 70), atol=1e-6, rtol=0)
    assert torch.equal(out["spectrogram"], reference_segments(raw.waveform[:2 * SR]))
    with torch.no_grad():
        logits = o1(**out)
    assert logits.shape == (1, 3 + 4 * 6 + 12 + 2, 512) and torch.isfinite(logits).all()
    mm = o1.modality_map(**out)
    assert kinds(mm) == "ttt" + ("vvsvvs" + "aaa") * 4 + "tt"
    audio = mm.positions("audio")
    assert mm.meta["audio_source"][0, audio].tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert mm.time[0, mm.positions("video")].unique().tolist() == pytest.approx([0, 0.5, 1.0, 1.5])


def test_o1_silent_video_and_audio_alone(o1):
    proc = O1MediaProcessor.from_model(o1)
    # a video without audio gets silence of the video's length (the public dataset's np.zeros), modality "video"
    out = proc(clip(audio=False), BEFORE, AFTER)
    assert out["modalities"] == ["video"]
    assert torch.equal(out["spectrogram"], reference_segments(np.zeros(2 * SR, np.float32)))
    # audio alone, 0.4 s: padded to 1 s, one segment of 5 tokens spliced in place of <image>
    wav = (0.1 * np.random.default_rng(2).standard_normal(6400)).astype(np.float32)
    out = proc(RawAV(waveform=wav, sample_rate=SR), BEFORE, AFTER)
    assert out["images"] is None and out["modalities"] == ["audio"] and out["org_groups"] == [1]
    assert torch.equal(out["spectrogram"], reference_segments(np.concatenate([wav, np.zeros(9600, np.float32)])))
    assert kinds(o1.modality_map(**out)) == "ttt" + "a" * 5 + "tt"
    # audio alone is cut to max_time (30 s): 31.5 s -> 30 one-second segments
    long = np.zeros(round(31.5 * SR), np.float32)
    assert proc(RawAV(waveform=long, sample_rate=SR), BEFORE, AFTER)["org_groups"] == [30]


def test_o1_bad_input_errors(o1):
    proc = O1MediaProcessor.from_model(o1)
    with pytest.raises(ValueError, match="22050 Hz; video-SALMONN-o1 needs 16000 Hz"):
        proc(RawAV(waveform=np.zeros(22050, np.float32), sample_rate=22050), BEFORE, AFTER)
    one_frame = RawAV(waveform=np.zeros(SR, np.float32), frames=np.zeros((1, 70, 70, 3), np.uint8), fps=2.0)
    with pytest.raises(ValueError, match="keeps 1 frame.*at least 2"):
        proc(one_frame, BEFORE, AFTER)
    with pytest.raises(ValueError, match="needs a video-SALMONN-o1 model"):
        O1MediaProcessor.from_model(video_salmonn2.build(tiny_vs2_config()))


# ---------------------------------------------------------------------------------------------------- chat prompts
def char_tokenizer():
    """A character-level fast tokenizer (ids < 400) with the Qwen chat markers as special tokens (480, 481)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "\n": 1, **{chr(c): c - 30 for c in range(32, 127)}, "<|im_start|>": 480, "<|im_end|>": 481}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[UNK]")


def chars(text):
    return [1 if c == "\n" else ord(c) - 30 for c in text]


def test_chat_prompts_follow_the_public_templates(vs2, o1):
    tok = char_tokenizer()
    start, end = 480, 481
    # 2+: the chat template per turn, the user turn `<video>\n{prompt}`, then the assistant prefix
    before, after = Salmonn2ChatProcessor(Salmonn2MediaProcessor.from_model(vs2, tok)).prompt_ids("Hi?")
    assert before == [start] + chars("system\nYou are a helpful assistant.") + [end] + chars("\n") + \
        [start] + chars("user\n")
    assert after == chars("\nHi?") + [end] + chars("\n") + [start] + chars("assistant\n")
    # o1: preprocess_qwen's pieces; the user text after <image> is "\n{prompt}" behind its own newline
    before, after = O1ChatProcessor(O1MediaProcessor.from_model(o1, tok)).prompt_ids("Hi?")
    assert before == [start] + chars("system\nYou are a helpful assistant.") + [end] + chars("\n") + \
        [start] + chars("user\n")
    assert after == chars("\n\nHi?") + [end] + chars("\n") + [start] + chars("assistant\n")


# ---------------------------------------------------------------------------------------------------- end to end
def write_avsynth_clip(root, seconds=3, size=64):
    """An avsynth-style clip: h264 at 2 fps with a mono AAC track, and the 16 kHz wav the official lists point to
    (written by avsynth's own writers)."""
    from analyses import avsynth

    rng = np.random.default_rng(5)
    n = seconds * avsynth.FPS
    frames = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        frames[i, :, : size // 2] = (40 * i) % 256
        frames[i, :, size // 2:, 1] = 200
    wav = (0.2 * np.sin(2 * np.pi * 440 * np.arange(seconds * SR) / SR)
           + 0.01 * rng.standard_normal(seconds * SR)).astype(np.float32)
    video, audio = root / "clip.mp4", root / "clip.wav"
    avsynth._write_mp4(video, frames, wav)
    avsynth._write_wav(audio, wav)
    return video, audio


@pytest.fixture(scope="module")
def checkpoints(vs2, o1, tmp_path_factory):
    """The tiny models as released-layout checkpoints with a tokenizer, for `load_runtime`."""
    out = {}
    for name, model in (("vs2", vs2), ("o1", o1)):
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(path))
        char_tokenizer().save_pretrained(str(path))
        out[name] = path
    return out


@pytest.mark.parametrize("family", ["vs2", "o1"])
def test_runtime_runs_an_avsynth_clip(family, checkpoints, tmp_path):
    """load_runtime gives the family's clip reader and chat processor; 3 s at 2 fps -> 6 frames for both rules
    (2+: 30 wanted, 6 there; o1: every frame), 3 s of audio."""
    from analyses.runtime import load_runtime
    from hooked_av.corrupt import corrupted_pair

    video, audio = write_avsynth_clip(tmp_path)
    rt = load_runtime(str(checkpoints[family]))
    raw = rt.load(str(video), audio=str(audio))
    assert raw.frames.shape == (6, 64, 64, 3) and raw.fps == pytest.approx(2.0) and len(raw.waveform) == 3 * SR
    inputs = rt.process(raw, "Which?")
    with torch.no_grad():
        logits = rt.model(**inputs)
    assert torch.isfinite(logits).all()
    mm = rt.model.modality_map(**inputs)
    prompt = kinds(mm)
    n_before = len(chars("system\nYou are a helpful assistant.\nuser\n")) + 3  # two <|im_start|>, one <|im_end|>
    if family == "vs2":
        # 3 grids of 56 x 56 (4 tokens), 3 one-second segments (6 tokens): 2 after each grid (1 s per grid)
        assert inputs["video_grid_thw"].tolist() == [[3, 4, 4]]
        assert inputs["second_per_grid_ts"].tolist() == [1.0]
        media = "s" + ("v" * 4 + "a" * 2) * 3 + "s"
    else:
        # 6 frames x (2 rows x (2 + newline)), 15 audio tokens interpolated to 18: 3 after each frame
        assert inputs["real_time"] == [pytest.approx(3.0)] and inputs["org_groups"] == [3]
        media = ("vvsvvs" + "aaa") * 6
    assert prompt[:n_before] == "t" * n_before and prompt[n_before:n_before + len(media)] == media
    assert set(prompt[n_before + len(media):]) == {"t"}
    for corruption in ("black_frames", "zero_audio"):  # the paper's corruptions keep the layout
        clean, corrupted = corrupted_pair(lambda r: rt.process(r, "Which?"), raw, corruption)
        assert torch.equal(clean["input_ids"], corrupted["input_ids"])


@pytest.fixture(scope="module")
def vggsound_list(tmp_path_factory):
    from test_cli import make_dataset

    return make_dataset(tmp_path_factory.mktemp("vggsound"))


@pytest.mark.parametrize("family", ["vs2", "o1"])
def test_cli_trace_runs_video_salmonn_from_raw_clips(family, checkpoints, vggsound_list, tmp_path):
    """`hooked-av trace` on the official-format list of test_cli (4-s clips at 10 fps with their wavs): the clean
    and both corrupted conditions are read, processed and layout-checked by the family's processor."""
    from analyses.cli import main
    from analyses.records import RecordStore

    root, lst, _ = vggsound_list
    args = ["trace", "--model", str(checkpoints[family]), "--data", str(lst), "--media-root", str(root),
            "--out", str(tmp_path / "out"), "--dominance", "list", "--n-divs", "2", "--limit", "1",
            "--layers", "0,2", "--sink-dims", "7,11", "--tau", "1.5"]
    assert main(args) == 0
    records = RecordStore(tmp_path / "out" / "tracing" / "tracing.jsonl").read()
    assert [(r["id"], r["dominant"]) for r in records] == [("clipA_000001", "audio")]
    assert all({c["subset"] for c in r["cells"]} >= {"all", "cross_modal_sink"} for r in records)
    settings = json.loads((tmp_path / "out" / "tracing" / "settings.json").read_text())
    assert settings["model"] == str(checkpoints[family])
