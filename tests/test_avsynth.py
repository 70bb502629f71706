"""avsynth: the offline audio-visual benchmark generator (formats, determinism, ground truth, errors)."""

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from analyses import avsynth
from analyses.avsynth import AvsynthError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STAT_CSV = SHARED / "fixtures" / "vggsound" / "stat.csv"
ASSETS_OK = all((avsynth.DEFAULT_ASSETS / rel).is_file() for rel in avsynth.required_assets(avsynth.CLASS_NAMES))
needs_assets = pytest.mark.skipif(not ASSETS_OK, reason=f"offline assets absent in {avsynth.DEFAULT_ASSETS} "
                                                        "(run scripts/fetch_assets.py)")
SIZE = 64
SPLIT_N = (4, 1, 1)


def _generate(root):
    return avsynth.generate(root, *SPLIT_N, seed=3, size=SIZE, frame_lists=True, progress=False)


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    if not ASSETS_OK:
        pytest.skip("offline assets absent (run scripts/fetch_assets.py)")
    a, b = tmp_path_factory.mktemp("avsynth_a"), tmp_path_factory.mktemp("avsynth_b")
    return _generate(a), _generate(b)


@pytest.fixture(scope="module")
def out(twice):
    return twice[0]


def _truth(out, split="train"):
    return json.loads((out.root / avsynth.TASK_DIR / f"{split}_truth.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- classes
def test_class_names_are_exact_vggsound_names():
    if not STAT_CSV.is_file():
        pytest.skip(f"{STAT_CSV} is absent (shared/fixtures not checked out)")
    with STAT_CSV.open(newline="", encoding="utf-8") as f:
        names = {row[0] for row in csv.reader(f) if row}
    assert len(avsynth.CLASS_NAMES) == 20 == len(set(avsynth.CLASS_NAMES))
    assert [n for n in avsynth.CLASS_NAMES if n not in names] == []


@needs_assets
def test_every_glyph_renders():
    ttf = str(avsynth.DEFAULT_ASSETS / "openmoji" / "glyf_colr0.ttf")
    images = {}
    for name in avsynth.CLASS_NAMES:
        im = avsynth.glyph_image(ttf, name)
        a = np.asarray(im)
        opaque = a[..., 3] > 128
        assert opaque.sum() > 0.15 * a.shape[0] * a.shape[1], name  # a real drawing, not a stray pixel
        assert a[..., :3][opaque].std() > 10, name                    # coloured, with detail
        images[name] = a
    # cello is derived from the violin glyph (rotated, tinted) but must look different
    v, c = images["playing violin, fiddle"], images["playing cello"]
    assert v.shape != c.shape or np.abs(v.astype(int) - c).mean() > 10


# ---------------------------------------------------------------------------------------------------- formats
@needs_assets
def test_mc_lists_load_and_clips_decode(out):
    from analyses.datasets import load_vggsound_mc, official_prompt
    from hooked_av.media import load_av

    truth = {t["id"]: t for t in _truth(out)}
    samples = load_vggsound_mc(out.files["train"]["mc"], media_root=out.root, check_media=True)
    frames = load_vggsound_mc(out.files["train"]["mc_frames"], media_root=out.root, check_media=True)
    assert [s.sample_id for s in samples] == [s.sample_id for s in frames] == list(truth)
    assert len({tuple(s.choices.values()) for s in samples}) == len(samples)  # permuted per sample
    for s, f in zip(samples, frames):
        t = truth[s.sample_id]
        assert re.fullmatch(r"syntrain\d{5}_000000", s.sample_id)
        assert s.label_name == t["label"] and sorted(s.choices.values()) == sorted(avsynth.CLASS_NAMES)
        assert s.prompt == official_prompt(s.choices, 1) and s.av is None and "av" not in s.conversation_raw[1]
        assert s.audio == f.audio == out.root / f"vggsound_with_mask/audio/{s.sample_id}.wav"
        assert f.is_frames and len(f.video) == 20
    raw = load_av(samples[0].video, audio=samples[0].audio)
    assert raw.frames.shape == (20, SIZE, SIZE, 3) and raw.waveform.shape == (160000,) and raw.fps == 2.0
    own = load_av(samples[0].video)  # the mp4's own AAC track (encoder padding makes it a little longer)
    assert 160000 <= len(own.waveform) < 161024
    listed = load_av([str(p) for p in frames[0].video], audio=frames[0].audio)
    assert listed.frames.shape == (20, SIZE, SIZE, 3)
    # the mp4 frames are the rendered frames up to h264 loss
    assert np.abs(raw.frames.astype(int) - listed.frames).mean() < 12


@needs_assets
def test_task_files(out):
    from analyses.sources import load_object_blocks

    tasks = out.root / avsynth.TASK_DIR
    truth = _truth(out)
    by_id = {t["id"]: t for t in truth}
    assert load_object_blocks(out.files["train"]["important_seconds"]) == {t["id"]: t["sounding_chunks"] for t in truth}
    yesno = json.loads(out.files["train"]["yesno"].read_text(encoding="utf-8"))
    wording = {avsynth.TASK_VIDEO: r"Is the [a-z ]+ visible in the video\?",
               avsynth.TASK_AUDIO: r"Is the [a-z ]+ making sound in the audio\?",
               avsynth.TASK_MATCH: re.escape(avsynth.MATCH_QUESTION)}
    for q in yesno:
        assert q["label"] in ("Yes", "No") and re.fullmatch(wording[q["task"]], q["text"]), q
        t = by_id[q["video_id"]]
        if q["task"] == avsynth.TASK_VIDEO:
            assert (q["label"] == "Yes") == (q["class"] in t["visible_classes"])
        elif q["task"] == avsynth.TASK_AUDIO:
            assert (q["label"] == "Yes") == (q["class"] in t["sound_classes"])
        else:
            assert (q["label"] == "Yes") == (t["main_sound"] == t["main_visual"])
    assert Counter(q["task"] for q in yesno)[avsynth.TASK_MATCH] == len(truth)
    captions = json.loads(out.files["train"]["captions"].read_text(encoding="utf-8"))
    for c in captions:
        assert re.fullmatch(r"An? [a-z ]+ is [a-z]+ while (an? [a-z ]+|no object) is visible\.", c["caption"]), c
        assert c["sound_objects"] and c["sound_objects"][0] in c["caption"]
    describe = json.loads(out.files["train"]["describe"].read_text(encoding="utf-8"))
    assert describe[0][1]["content"][1]["text"] == "Describe what you see and hear in a single sentence. "
    assert [d[1]["original_label"] for d in describe] == [t["label"] for t in truth]
    meta = json.loads((tasks / "meta.json").read_text(encoding="utf-8"))
    assert meta["splits"]["train"]["conditions"] == dict(Counter(t["condition"] for t in truth))
    assert (tasks / "CREDITS.md").read_text(encoding="utf-8") == avsynth.CREDITS
    assert not list(out.root.rglob("*.part"))  # atomic writes leave no partial file


def test_mismatched_clips_get_no_for_matching():
    truth = {"sample_seed": 1, "id": "x", "condition": "audio_clean+video_confusable",
             "files": {"video": "v.mp4", "audio": "a.wav"}, "visible_classes": ["horse neighing"],
             "sound_classes": ["dog barking"], "main_sound": "dog barking", "main_visual": "horse neighing"}
    qs = avsynth.yesno_entries(truth, avsynth.CLASS_NAMES)
    assert [q["label"] for q in qs if q["task"] == avsynth.TASK_MATCH] == ["No"]
    # the cross-modal traps come first: the dog is heard but not seen, the horse seen but not heard
    assert ("Is the dog visible in the video?", "No", "cross_modal") in [(q["text"], q["label"], q["kind"]) for q in qs]
    assert ("Is the horse making sound in the audio?", "No", "cross_modal") in [
        (q["text"], q["label"], q["kind"]) for q in qs]
    assert avsynth.caption(truth) == "A dog is barking while a horse is visible."
    assert avsynth.caption({**truth, "main_sound": "owl hooting", "main_visual": None}) == \
        "An owl is hooting while no object is visible."


# ---------------------------------------------------------------------------------------------------- determinism
@needs_assets
def test_same_seed_same_files(twice):
    from hooked_av.media import load_av

    a, b = twice
    files_a = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix in (".json", ".wav", ".jpg", ".md"):
            assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    for rel in (r for r in files_a if r.suffix == ".mp4"):
        x, y = load_av(a.root / rel), load_av(b.root / rel)
        assert np.array_equal(x.frames, y.frames) and np.array_equal(x.waveform, y.waveform), rel
        # x264 runs single-threaded without mbtree: the encoded bytes are identical too
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel


@needs_assets
def test_worker_processes_give_the_same_files(tmp_path):
    kw = dict(seed=1, size=32, duration=2, progress=False)
    one = avsynth.generate(tmp_path / "one", 3, 1, 0, workers=1, **kw)
    two = avsynth.generate(tmp_path / "two", 3, 1, 0, workers=2, **kw)
    files = sorted(p.relative_to(one.root) for p in one.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two.root) for p in two.root.rglob("*") if p.is_file())
    assert all((one.root / f).read_bytes() == (two.root / f).read_bytes() for f in files)


@needs_assets
def test_synth_renders_do_not_depend_on_order():
    opts = avsynth.make_options(size=32, duration=4, mix="audio_clean+video_clear=1")
    plans = avsynth.plan_split("val", 8, 0, opts)
    gm = [p for p in plans if avsynth.class_spec(p["label"]).source == "gm"][-1]
    avsynth._synth.cache_clear()
    fresh, _ = avsynth.render_audio(gm, opts, avsynth.DEFAULT_ASSETS)
    for p in plans:
        avsynth.render_audio(p, opts, avsynth.DEFAULT_ASSETS)
    again, _ = avsynth.render_audio(gm, opts, avsynth.DEFAULT_ASSETS)
    assert np.array_equal(fresh, again)


# ---------------------------------------------------------------------------------------------------- ground truth
@needs_assets
def test_masks_follow_the_glyph(out):
    from analyses import objects

    checked = 0
    for t in _truth(out):
        masks = objects.load_masks([objects.mask_path_for_frame(out.root / f) for f in t["files"]["frames"]])
        target = next((g for g in t["video"]["glyphs"] if g["role"] == "target"), None)
        for f, m in enumerate(masks):
            box = None if target is None else target["boxes"][f]
            assert (box is not None) == (target is not None and f // 4 in t["onscreen_chunks"])
            if box is None:
                assert (m > 20).mean() < 0.002, (t["id"], f)  # black (up to JPEG ringing)
                continue
            x0, y0, x1, y1 = box
            inside = np.zeros(m.shape, bool)
            inside[y0:y1, x0:x1] = True
            assert m[inside].mean() > 60 and m[~inside].mean() < 3, (t["id"], f)
            checked += 1
    assert checked > 0


@needs_assets
def test_sounding_chunks_hold_the_class():
    opts = avsynth.make_options(size=32, mix="audio_clean+video_clear=1,audio_noisy+video_clear=1")
    per = avsynth.CHUNK_SECONDS * avsynth.SAMPLE_RATE
    checked = 0
    for plan in avsynth.plan_split("train", 12, 1, opts):
        mix, info = avsynth.render_audio(plan, opts, avsynth.DEFAULT_ASSETS)
        target = info["stems"]["target"]
        energy = [float(np.mean(target[c * per:(c + 1) * per] ** 2)) for c in range(opts.n_chunks)]
        on = plan["sounding_chunks"]
        off = [c for c in range(opts.n_chunks) if c not in on]
        # every sounding chunk holds the class at about the planned level; the others hold none of it
        assert min(energy[c] for c in on) > 0.25 * (10 ** ((avsynth.NOMINAL_DBFS + plan["target_gain_db"]) / 20)) ** 2
        assert all(energy[c] == 0.0 for c in off)
        if off and plan["audio_condition"] == "clean":
            total = [float(np.mean(mix[c * per:(c + 1) * per] ** 2)) for c in range(opts.n_chunks)]
            assert min(total[c] for c in on) > 3 * max(total[c] for c in off), plan["id"]
            checked += 1
    assert checked > 0


def test_conditions_in_requested_proportions():
    opts = avsynth.make_options()
    plans = avsynth.plan_split("train", 40, 0, opts)
    assert Counter(p["condition"] for p in plans) == {k: round(w * 40) for k, w in avsynth.DEFAULT_MIX.items()}
    assert Counter(p["label"] for p in plans) == {n: 2 for n in avsynth.CLASS_NAMES}  # balanced classes
    opts = avsynth.make_options(mix="audio_clean+video_confusable=3, audio_absent+video_clear=1")
    plans = avsynth.plan_split("test", 10, 5, opts)
    counts = Counter(p["condition"] for p in plans)
    assert counts == {"audio_clean+video_confusable": 8, "audio_absent+video_clear": 2}  # 7.5 / 2.5, ties in order
    for p in plans:
        if p["video_condition"] == "confusable":  # the picture shows a look-alike other class
            (g,) = [g for g in p["glyphs"] if g["role"] == "confusable"]
            assert g["class"] != p["label"]
            assert avsynth.class_spec(g["class"]).group == avsynth.class_spec(p["label"]).group
            assert p["expected_dominance"] == "audio"
        else:  # the class is silent; a faint distractor class sounds
            assert p["sounding_chunks"] == [] and p["distractor_audio"]["class"] != p["label"]
            assert p["expected_dominance"] == "video"
    assert sum(avsynth.apportion(tuple(avsynth.DEFAULT_MIX.items()), 7).values()) == 7


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_class_names_the_closest():
    with pytest.raises(AvsynthError, match=r"unknown class 'dog barks'.*'dog barking'"):
        avsynth.class_spec("dog barks")
    with pytest.raises(AvsynthError, match=r"'playing violin, fiddle'"):
        avsynth.make_options(classes=["playing violin", "dog barking", "cat meowing"])


def test_missing_assets_say_how_to_fetch(tmp_path):
    with pytest.raises(AvsynthError, match=r"animals/cat\.mp3.*scripts/fetch_assets\.py"):
        avsynth.generate(tmp_path / "out", 1, 0, 0, assets=tmp_path / "nowhere", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 63}, "even"),
    ({"size": 16}, "frame side"),
    ({"size": (64, 64, 3)}, "size must be"),
    ({"duration": 7}, "multiple of 2"),
    ({"duration": 0}, "duration"),
    ({"classes": ["dog barking", "dog barking", "cat meowing"]}, "repeats"),
    ({"classes": ["dog barking", "cat meowing"]}, "3.."),
    ({"classes": "dog barking"}, "not one string"),
    ({"mix": {"audio_absent+video_absent": 1}}, "no evidence"),
    ({"mix": {"audio_clean+video_blurry": 1}}, "unknown condition"),
    ({"mix": {"audio_clean+video_clear": -1}}, ">= 0"),
    ({"mix": {"audio_clean+video_clear": 0}}, "sum to 0"),
    ({"mix": "audio_clean+video_clear=x"}, "expected <condition>=<weight>"),
    ({"noisy_snr_db": (3, -3)}, "low <= high"),
])
def test_parameter_validation(kwargs, message):
    with pytest.raises(AvsynthError, match=re.escape(message)):
        avsynth.make_options(**kwargs)


@pytest.mark.parametrize("args, message", [
    ((-1, 0, 0), "n_train"), ((0, 0, 0), "nothing to generate"), ((1, 0, 0, -5), "seed"), ((1, 0, 0, 1.5), "seed"),
])
def test_generate_validation(tmp_path, args, message):
    with pytest.raises(AvsynthError, match=message):
        avsynth.generate(tmp_path, *args, progress=False)


@needs_assets
def test_cli(tmp_path, capsys):
    assert avsynth.main(["--out", str(tmp_path), "--n-train", "1", "--n-val", "0", "--n-test", "1", "--size", "32",
                         "--duration", "2", "--workers", "1", "--no-progress"]) == 0
    assert "2 clips" in capsys.readouterr().out
    assert (tmp_path / "avsynth" / "test_mc.json").is_file() and not (tmp_path / "avsynth" / "val_mc.json").exists()
    assert avsynth.main(["--out", str(tmp_path), "--classes", "dog;cat meowing;owl hooting", "--no-progress"]) == 2
    assert "closest valid names: 'dog barking'" in capsys.readouterr().err


def test_recorded_meta_reads_the_generators_last_record(out, tmp_path):
    """`recorded_meta`: the seed and counts of a finished generation; None where none finished (no meta.json);
    a file that is no generator record is named."""
    meta = avsynth.recorded_meta(out.root)
    assert meta["seed"] == 3 and [meta["splits"][s]["n"] for s in ("train", "val", "test")] == list(SPLIT_N)
    assert avsynth.recorded_meta(tmp_path) is None
    bad = tmp_path / avsynth.TASK_DIR / "meta.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"generator": "analyses.avsynth"}))
    with pytest.raises(ValueError, match=r"meta\.json: not a generator record \(expected JSON with an integer 'seed'"):
        avsynth.recorded_meta(tmp_path)
