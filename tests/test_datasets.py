"""VGGSound MC sample lists: the official prompt on every real sample, loading, audio paths, clear errors."""

import json
from pathlib import Path

import pytest

from analyses.datasets import (
    DatasetError,
    MCSample,
    conversation,
    load_vggsound_mc,
    official_audio_path,
    official_prompt,
    official_sample_id,
    parse_answer_letter,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LISTS = SHARED / "fixtures" / "crossmodal_hub" / "json_files" / "causal_tracing"
# (file, step, samples): the official lists and their first-10 "_small" versions
REAL = [
    ("step1/people_case_2.json", 1, 349),
    ("step1/sports_case_1.json", 1, 548),
    ("step2/people.json", 2, 349),
    ("step2/sports.json", 2, 548),
    ("step1/people_case_2_small.json", 1, 10),
    ("step1/sports_case_1_small.json", 1, 10),
    ("step2/people_small.json", 2, 10),
    ("step2/sports_small.json", 2, 10),
]


def real_list(name: str) -> Path:
    path = LISTS / name
    if not path.is_file():
        pytest.skip(f"fixture {path} is absent (shared/fixtures not checked out)")
    return path


def stored_prompt(raw: list) -> str:
    """The prompt text of an official conversation: the text block of the user message."""
    (user,) = [m for m in raw if m["role"] == "user"]
    (text,) = [c["text"] for c in user["content"] if c["type"] == "text"]
    return text


@pytest.mark.parametrize("name,step,count", REAL[:4])
def test_official_prompt_reproduces_every_real_prompt(name, step, count):
    raw = json.loads(real_list(name).read_text(encoding="utf-8"))
    assert len(raw) == count
    matched = sum(official_prompt(s[1]["choices"], step) == stored_prompt(s) for s in raw)
    other = sum(official_prompt(s[1]["choices"], 3 - step) == stored_prompt(s) for s in raw)
    print(f"{name}: {matched}/{len(raw)} prompts equal official_prompt(choices, {step}); {other} match step {3 - step}")
    assert matched == count and other == 0


def test_official_prompt_text():
    choices = {"A": "dog barking", "B": "cat meowing"}
    head = "Classify the sounding object into one of the categories below:\n\nA. dog barking\nB. cat meowing\n"
    assert official_prompt(choices, 1) == head + "Respond ONLY with a single label letter (A\u2013B)."
    assert official_prompt(choices, 2) == head + "\nRespond ONLY with a single label letter (A\u2013B)."
    with pytest.raises(ValueError, match="step"):
        official_prompt(choices, 3)


@pytest.mark.parametrize("name,step,count", REAL)
def test_load_real_lists(name, step, count):
    samples = load_vggsound_mc(real_list(name), step=step)
    assert len(samples) == count
    assert len({s.sample_id for s in samples}) == count
    for s in samples:
        assert s.letters == "ABCDEFGHIJKLMNOPQRST"
        assert s.name_of(s.label) == s.label_name and s.letter_of(s.label_name) == s.label
        assert s.is_frames == name.split("/")[1].startswith("people")
        assert s.audio.as_posix() == f"vggsound_with_mask/audio/{s.sample_id}.wav"
        if step == 1:
            assert None not in (s.av, s.a, s.v) and s.word_probs == {}
        else:
            assert None not in (s.correct_pred, s.corrupt_pred) and len(s.word_probs) == 4


def test_real_list_details():
    people = load_vggsound_mc(real_list("step1/people_case_2.json"), media_root="/media", step=1)
    sports = load_vggsound_mc(real_list("step1/sports_case_1.json"), media_root="/media", step=1)
    first = people[0]
    assert first.sample_id == "--U7joUcTCo_000000" and len(first.video) == 20
    assert first.video[0] == Path("/media/vggsound_with_mask/sam2_mask_black/--U7joUcTCo_000000/001_raw.jpg")
    assert first.audio == Path("/media/vggsound_with_mask/audio/--U7joUcTCo_000000.wav")
    assert (first.label, first.label_name, first.av, first.a, first.v) == ("K", "people coughing", "K", "K", "R")
    assert sports[0].video == Path("/media/vggsound_with_mask/video/-86gl1hp1Aw_000105.mp4")
    assert sports[0].audio == Path("/media/vggsound_with_mask/audio/-86gl1hp1Aw_000105.wav")
    # stored predictions are raw generations: 22 people `av` values are not a bare letter ("C.", "C\nHuman: ...")
    not_bare = [s for s in people if s.predictions_raw["av"] not in s.choices]
    assert len(not_bare) == 22 and all(s.av is not None for s in not_bare)
    # read as letters, every sample satisfies its dominance condition (raw string comparison: 332/349 and 546/548)
    assert all(s.dominance == "audio" for s in people) and all(s.dominance == "video" for s in sports)
    assert sum(s.predictions_raw["av"] == s.predictions_raw["a"] != s.predictions_raw["v"] for s in people) == 332
    assert sum(s.av == s.label for s in people) == 251 and sum(s.av == s.label for s in sports) == 516
    # step 2 lists the same samples in the same order; `_small` = the first 10
    step2 = load_vggsound_mc(real_list("step2/people.json"), step=2)
    assert [s.sample_id for s in step2] == [s.sample_id for s in people]
    small = load_vggsound_mc(real_list("step1/people_case_2_small.json"), media_root="/media", step=1)
    assert small == people[:10]


def test_conversation_round_trips_the_official_messages():
    for name, step, _ in REAL[4:]:
        for s in load_vggsound_mc(real_list(name), step=step):
            conv = conversation(s)
            assert conv[0] == s.conversation_raw[0] == {
                "role": "system",
                "content": [{"type": "text", "text": "You are a helpful assistant."}],
            }
            assert conv[1]["role"] == "user" and conv[1]["content"] == s.conversation_raw[1]["content"]
    s = load_vggsound_mc(real_list("step1/people_case_2_small.json"), media_root="/m", step=1)[0]
    conv = conversation(s, "Which?", audio=True)
    video, audio, text = conv[1]["content"]
    assert isinstance(video["video"], list) and all(isinstance(f, str) for f in video["video"])
    assert audio == {"type": "audio", "audio": "/m/vggsound_with_mask/audio/--U7joUcTCo_000000.wav"}
    assert text == {"type": "text", "text": "Which?"}


def test_official_audio_path_and_id():
    frames = [f"vggsound_with_mask/sam2_mask_black/abc_000010/{k:03d}_raw.jpg" for k in (1, 13)]
    assert official_audio_path(frames) == "vggsound_with_mask/audio/abc_000010.wav"
    assert official_sample_id(frames) == "abc_000010"
    assert official_audio_path(frames[0]) == "vggsound_with_mask/audio/abc_000010.wav"
    assert official_audio_path("vggsound_with_mask/video/x_000001.mp4") == "vggsound_with_mask/audio/x_000001.wav"
    assert official_sample_id("vggsound_with_mask/video/x_000001.mp4") == "x_000001"
    # an id containing "video" keeps it (the official str.replace would rewrite it)
    assert official_audio_path("vggsound/video/myvideo_01.mp4") == "vggsound/audio/myvideo_01.wav"
    assert official_audio_path("data/AVHBench/videos/00191.mp4") == "data/AVHBench/audios/00191.wav"
    assert official_audio_path("clips/a.mp4") == "clips/a.wav"


def test_parse_answer_letter():
    choices = {letter: letter.lower() for letter in "ABCDEFGHIJKLMNOPQRST"}
    cases = {"K": "K", "C.": "C", "C\n": "C", "C. people whistling": "C", "C\nHuman: What?": "C", " D": "D",
             "Cat": None, "Z": None, "": None, None: None, "c": None}
    for text, letter in cases.items():
        assert parse_answer_letter(text, choices) == letter, text


# ---------------------------------------------------------------------------------------------------- errors


def synthetic(video="vggsound_with_mask/video/s{i}_000000.mp4", n=3, step=1, frames=0, overrides=None):
    """A small valid list in the official format (synthetic choices, not fixture data); `frames` > 0: frame lists."""
    choices = {"A": "dog barking", "B": "cat meowing", "C": "playing piano"}
    out = []
    for i in range(n):
        user = {
            "role": "user",
            "content": [
                {"type": "video", "video": [video.format(i=i, f=f) for f in range(frames)] or video.format(i=i)},
                {"type": "text", "text": official_prompt(choices, step)},
            ],
            "label": "B", "label_name": "cat meowing", "av": "B", "a": "B", "v": "A", "choices": dict(choices),
        }
        out.append([{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}, user])
    for (i, key), value in (overrides or {}).items():
        out[i][1][key] = value
    return out


def write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({(1, "label_name"): "x"}, "bad.json sample 1: 'label_name' 'x' is not one of the choices"),
        ({(2, "label"): "Q"}, "bad.json sample 2: 'label' 'Q' is not a choice letter (ABC)"),
        ({(0, "label"): "A"}, "bad.json sample 0: 'label' 'A' is 'dog barking' but 'label_name' is 'cat meowing'"),
        ({(1, "choices"): {"B": "x", "A": "y"}}, "bad.json sample 1: 'choices' keys must be AB in order, got BA"),
        ({(1, "choices"): {"A": "x", "B": "x"}}, "bad.json sample 1: 'choices' repeats a class name"),
        ({(0, "av"): 3}, "bad.json sample 0: 'av' must be a string, got 3"),
        ({(2, "corrupt_correct_word_prob"): 1.5}, "bad.json sample 2: 'corrupt_correct_word_prob' must be a proba"),
        ({(1, "content"): "text"}, "bad.json sample 1: 'content' of the user message must be a list of blocks"),
    ],
)
def test_validation_errors_name_file_sample_and_field(tmp_path, overrides, message):
    with pytest.raises(DatasetError) as err:
        load_vggsound_mc(write(tmp_path, synthetic(overrides=overrides)), check_prompt=False)
    assert str(err.value).startswith(message)


def test_structural_errors(tmp_path):
    good = synthetic()
    assert [s.sample_id for s in load_vggsound_mc(write(tmp_path, good))] == ["s0_000000", "s1_000000", "s2_000000"]
    with pytest.raises(DatasetError, match=r"bad.json: not valid JSON \(.* line 1") as err:
        load_vggsound_mc(write(tmp_path, "[{"))
    assert err.value.__suppress_context__  # no chained JSONDecodeError traceback
    with pytest.raises(DatasetError, match="bad.json: expected a JSON list of conversations, got dict"):
        load_vggsound_mc(write(tmp_path, {"a": 1}))
    with pytest.raises(DatasetError, match="bad.json sample 1: expected exactly one 'user' message, found 0"):
        load_vggsound_mc(write(tmp_path, [good[0], good[1][:1]]))
    with pytest.raises(DatasetError, match="no such file"):
        load_vggsound_mc(tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="cannot read"):
        load_vggsound_mc(tmp_path)
    dup = synthetic(video="vggsound_with_mask/video/same.mp4")
    with pytest.raises(DatasetError, match="bad.json sample 1: duplicate sample id 'same' \\(also sample 0\\)"):
        load_vggsound_mc(write(tmp_path, dup))
    step_hint = r"sample 0: prompt text differs .*step=1\) at character \d+ \(it is the step-2 prompt: pass step=2\)"
    with pytest.raises(DatasetError, match=step_hint):
        load_vggsound_mc(write(tmp_path, synthetic(step=2)), step=1)
    assert len(load_vggsound_mc(write(tmp_path, synthetic(step=2)), step=2)) == 3


def test_check_media(tmp_path):
    root = tmp_path / "media"
    path = write(tmp_path, synthetic(video="vggsound_with_mask/sam2_mask_black/s{i}_000000/{f:03d}_raw.jpg", frames=2))
    samples = load_vggsound_mc(path, media_root=root)  # no media check by default
    for s in samples:
        for f in (*s.video, s.audio):
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
    assert load_vggsound_mc(path, media_root=root, check_media=True) == samples
    assert samples[1].video[1].name == "001_raw.jpg" and samples[1].sample_id == "s1_000000"
    for index, missing in ((2, samples[2].video[1]), (1, samples[1].audio)):  # the first bad sample is reported
        missing.unlink()
        with pytest.raises(DatasetError) as err:
            load_vggsound_mc(path, media_root=root, check_media=True)
        assert str(err.value) == f"bad.json sample {index}: media file {missing} does not exist"


def test_sample_helpers():
    s = MCSample("id", Path("v.mp4"), Path("a.wav"), "B", "y", {"A": "x", "B": "y"}, "p", av="B", a="A", v="B")
    assert s.letter_of("y") == "B" and s.name_of("A") == "x" and s.dominance == "video" and not s.is_frames
    with pytest.raises(KeyError, match="'z' is not one of the choices"):
        s.letter_of("z")
    with pytest.raises(KeyError, match="'C' is not a choice letter"):
        s.name_of("C")
