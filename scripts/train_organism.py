"""Train the organism (committed, seeded, resumable): `make organism` runs it, in the background if you like.

1. generate the avsynth train / val splits (offline media from .assets),
2. assemble the base organism (SmolLM2-135M-Instruct backbone + seeded random towers),
3. run every training clip through the Qwen2.5-Omni processor path once (cached in the run folder),
4. train: tower alignment, then task tuning with LoRA (model_zoo.organism_train),
5. evaluate on val (AV / audio-only / video-only accuracy), calibrate the sink constants on val clips,
6. write the deltas and constants to model_zoo/organism_deltas/ (the few MB that are committed).

    .venv/bin/python scripts/train_organism.py [--out runs/organism_train] [--n-train 1200] [--steps 600]

The defaults are the recipe of the committed deltas: 1,000 alignment steps (the audio tokens of faint distractor
sounds aligned half to their class and half to "background noise", so the decoder can tell a faint distractor
from the clip's own sound), then 600 steps of task tuning with LoRA (rank 16, blocks 16-29) under bfloat16
autocast, with the lookup scaffold (option probes at block 21, attention to the right option at blocks 22-25), the
first-hop scaffold (class probe at block 21, attention gathered on the class's AV tokens at blocks 17-19) and the
text lookups (4 per step, sharing the class probe and option-attention terms), then a refinement: 500 more task
steps in `<out>/refine`, warm-started from those deltas with a fresh cosine schedule, optimiser and scaffold probes
(`--refine-steps`; val AV 75% -> 89%, audio only 66% -> 85%, video only 47% -> 62%). `--init-from DELTAS` runs
such a refinement alone on any deltas file. The committed deltas are seven of them in a chain, each `--init-from`
the previous run's deltas: `--steps 500` on the 600-step deltas (the same training as the refinement stage), then
`--steps 500 --silent-weight 2` (held-out AV 77.8% -> 82.0%), then `--fresh-video --vision-depth 4 --video-jitter
0.2 --align-steps 2000 --steps 500 --silent-weight 2` (82.0% -> 87.2%), then two condition weightings on the same
clips, then 400 steps on each of two fresh pools of clips (`--data-seed 2`, `--data-seed 3`; 87.2% -> 90.7%); the
README gives each command and its numbers. `--steps` also takes a staged schedule (e.g. 600 1100 1500): train to
the first horizon, then extend to each next one; each extension recomputes the cosine schedule over the new total
(a warm restart), exactly as resuming a finished run with a larger `--steps` does. About 80 minutes on 2 cores
with AMX: clips processed in 6 minutes, alignment 9, task stage 38 (3.8 s per step; the frozen prefixes of blocks
0-15 are computed once per clip variant, on first use), refinement about 30. Without AMX (bf16 autocast gains
little) a task step takes 5-7 s: task stage about 65 minutes, refinement 50.

`--condition-weight KEY=W ...` draws the task stage's multiple-choice clips of a generator condition, or of one side
of one (`video_confusable`, `audio_absent`), W times as often (matching keys multiply with `--silent-weight`); the
README reports a refinement of the committed deltas with `video_confusable=2 video_small=2`. `--data-seed N`
generates the run's train / val clips from another seed than `--seed` (a fresh pool of clips for a warm-started
run; every split draws its own clips, so the held-out test split stays apart); a run folder that already holds
clips of another seed is named, not mixed.

`--video-jitter` and `--vision-depth` change the vision tower's training (colour jitter of its input) and size;
their defaults are the committed recipe's (no jitter, `model_zoo.organism.VISION_DEFAULTS`). The deltas record
the tower's size in their metadata, so `build_organism.py` assembles the tower they were trained on. A tower of 4
blocks with jitter 0.2 and 2,000 alignment steps names 70% of the object's tokens in held-out clips right (against
50%), but after the same task stage the joint run is worse (held-out AV 60% against 69%; val 55% against 75%): see
the README. `--init-from DELTAS --fresh-video` swaps in a new video tower (seeded random init, of
`--vision-depth`) aligned alone for `--align-steps` (default 1000), then runs the task stage from the deltas'
adapters and audio tower: with the 4-block tower above under the refined adapters, the joint run gains (the
committed deltas' last run).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DELTAS_DIR = ROOT / "model_zoo" / "organism_deltas"
#: training / demo clip length: 3 chunks of 2 s (150 audio + 48 video tokens) keeps CPU passes short
CLIP_SECONDS = 6
YES_NO_SHARE = 0.25  # fraction of training items that are yes/no probes


def chunk_classes(truth: dict, n_chunks: int) -> dict[str, list]:
    """What each 2-s chunk of a clip actually sounds and shows (the alignment targets): the labelled class where
    it sounds / is on screen, else a distractor sound, or the confusable / distractor glyph, else nothing ("");
    and whether the chunk's sound is faint (a distractor sound: 6 dB or more under the nominal level over
    silence, 10 dB or more under the class beside it)."""
    audio, video, faint = [], [], []
    distractor = truth["audio"].get("distractor") or {}
    glyphs = {g["role"]: g for g in truth["video"]["glyphs"]}
    for c in range(n_chunks):
        if c in truth["sounding_chunks"]:
            audio.append(truth["label"])
        elif c in distractor.get("chunks", []):
            audio.append(distractor["class"])
        else:
            audio.append("")
        faint.append(c not in truth["sounding_chunks"] and c in distractor.get("chunks", []))
        shown = next((g["class"] for role in ("target", "confusable", "distractor")
                      if (g := glyphs.get(role)) and c in g["chunks"]), "")
        video.append(shown)
    return {"audio_classes": audio, "video_classes": video, "audio_faint": faint}


#: a video token is labelled with a glyph's class when the glyph's box covers this share of the token's cell
MIN_CELL_OVERLAP = 0.3


def video_token_classes(truth: dict, grid_thw, merge: int, temporal: int) -> list[str]:
    """The class each merged video token shows (its cell covered >= MIN_CELL_OVERLAP by a glyph's box in either
    frame of its temporal patch; the topmost glyph wins), "" for background: per-token alignment targets, in the
    processor's token order (temporal grid, merged row, merged column)."""
    t, h, w = (int(v) for v in grid_thw)
    rows, cols = h // merge, w // merge
    height, width = truth["video"]["size"]
    ch, cw = height / rows, width / cols
    out = []
    for g in range(t):
        for r in range(rows):
            for c in range(cols):
                cell = (c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)
                label = ""
                for glyph in truth["video"]["glyphs"]:  # drawing order: a later glyph is on top
                    boxes = [glyph["boxes"][f] for f in range(g * temporal, (g + 1) * temporal)
                             if f < len(glyph["boxes"]) and glyph["boxes"][f]]
                    if any(_overlap(cell, b) >= MIN_CELL_OVERLAP * cw * ch for b in boxes):
                        label = glyph["class"]
                out.append(label)
    return out


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _merge_and_temporal(model) -> tuple[int, int]:
    return model.cfg.spatial_merge_size, int(model.vision_encoder.config.temporal_patch_size)


def load_truth(root: Path, split: str) -> dict[str, dict]:
    """The split's ground truth (`<root>/avsynth/<split>_truth.json`) by clip id."""
    return {t["id"]: t for t in json.loads((root / "avsynth" / f"{split}_truth.json").read_text())}


def add_token_targets(examples, root: Path, split: str, model) -> None:
    """Fill `video_token_classes` of examples (from the ground truth's glyph boxes; cheap)."""
    truth = load_truth(root, split)
    merge, temporal = _merge_and_temporal(model)
    for ex in examples:
        if not ex.video_token_classes and "video_grid_thw" in ex.inputs:
            ex.video_token_classes = video_token_classes(truth[ex.sample_id], ex.inputs["video_grid_thw"][0],
                                                         merge, temporal)


def add_conditions(examples, root: Path, split: str) -> None:
    """Fill the `condition` of examples that lack it, from the split's ground truth (cheap)."""
    if all(ex.condition for ex in examples):
        return
    truth = load_truth(root, split)
    for ex in examples:
        if not ex.condition:
            if ex.sample_id not in truth:
                raise ValueError(f"{root / 'avsynth' / f'{split}_truth.json'}: no clip {ex.sample_id!r} of the "
                                 "cached examples; the cache belongs to other data")
            ex.condition = truth[ex.sample_id]["condition"]


def parse_condition_weights(items) -> dict[str, float]:
    """`KEY=W` pairs of `--condition-weight`: KEY a condition of the generator (`avsynth.CONDITIONS`) or one
    side of one ("video_confusable"), W > 0."""
    from analyses import avsynth
    from model_zoo.organism_train import condition_keys

    known = set().union(*(condition_keys(c) for c in avsynth.CONDITIONS))
    weights = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected KEY=WEIGHT, e.g. video_confusable=2")
        if key not in known:
            raise ValueError(f"{item!r}: unknown condition {key!r}; expected one of {sorted(known)}")
        try:
            weights[key] = float(value)
        except ValueError:
            raise ValueError(f"{item!r}: weight {value!r} is not a number") from None
        if not weights[key] > 0:
            raise ValueError(f"{item!r}: the weight must be > 0")
    return weights


#: clips between two returns of freed heap memory to the system while processing
TRIM_EVERY = 25


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc). Decoding a clip allocates and frees large buffers in
    several threads; without this the process holds them (about 20 MB per clip) and 1,200 clips exhaust 24 GiB
    although the processed inputs take about 4 MB each."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def build_examples(root: Path, split: str, process, tokenizer, model, cache: Path, yes_no: bool):
    from analyses.datasets import load_vggsound_mc, official_prompt
    from hooked_av import corrupt, media
    from model_zoo.organism_train import Example
    from model_zoo.qwen2_5_omni_processing import trim_audio_padding

    process_full = process
    process = lambda raw, text: trim_audio_padding(process_full(raw, text))  # noqa: E731

    if cache.exists():
        examples = torch.load(cache, weights_only=False)
        add_conditions(examples, root, split)  # caches written before Example.condition existed
        return examples
    truth = load_truth(root, split)
    samples = load_vggsound_mc(root / "avsynth" / f"{split}_mc.json", media_root=root)
    examples = []
    from tqdm.auto import tqdm

    for k, s in enumerate(tqdm(samples, desc=f"processing {split}")):
        if k % TRIM_EVERY == 0:
            _trim_heap()
        t = truth[s.sample_id]
        raw = media.load_av(str(s.video), audio=str(s.audio))
        inputs = process(raw, official_prompt(s.choices, 1))
        n_chunks = CLIP_SECONDS // 2
        variants = {}
        if t["video_condition"] == "clear":
            variants["v"] = process(corrupt.corrupt(raw, "zero_audio"), official_prompt(s.choices, 1))
        if t["audio_condition"] == "clean":
            variants["a"] = process(corrupt.corrupt(raw, "black_frames"), official_prompt(s.choices, 1))
        examples.append(Example(
            inputs=inputs, answer_id=tokenizer.encode(s.label, add_special_tokens=False)[0], kind="mc",
            sample_id=s.sample_id, condition=t["condition"],
            class_name=s.label_name,
            audio_present=[c in t["sounding_chunks"] for c in range(n_chunks)],
            video_present=[c in t["onscreen_chunks"] for c in range(n_chunks)], variants=variants,
            **chunk_classes(t, n_chunks)))
    if yes_no:
        probes = json.loads((root / "avsynth" / f"{split}_yesno.json").read_text())
        rng = random.Random(0)
        rng.shuffle(probes)
        for p in probes[: int(len(examples) * YES_NO_SHARE / (1 - YES_NO_SHARE))]:
            t = truth[p["video_id"]]
            raw = media.load_av(str(root / p["video"]), audio=str(root / p["audio"]))
            examples.append(Example(
                inputs=process(raw, p["text"]), answer_id=tokenizer.encode(p["label"], add_special_tokens=False)[0],
                kind="yesno", class_name=t["label"], sample_id=p["video_id"], condition=t["condition"],
                audio_present=[c in t["sounding_chunks"] for c in range(CLIP_SECONDS // 2)],
                video_present=[c in t["onscreen_chunks"] for c in range(CLIP_SECONDS // 2)],
                **chunk_classes(t, CLIP_SECONDS // 2)))
    add_token_targets(examples, root, split, model)
    torch.save(examples, cache)
    return examples


def evaluate(model, examples) -> dict[str, float]:
    """Accuracy of the answer token on MC items: AV, and each unimodal variant where it exists."""
    from model_zoo.qwen2_5_omni_processing import collate

    pad = model.cfg.token_ids.pad or 0
    out = {}
    with torch.no_grad():
        for name in ("av", "a", "v"):
            items = [(e.inputs if name == "av" else e.variants.get(name), e.answer_id) for e in examples
                     if e.kind == "mc" and (name == "av" or name in e.variants)]
            hits = 0
            for i in range(0, len(items), 8):
                chunk = items[i:i + 8]
                logits = model(model.as_inputs(collate([x for x, _ in chunk], pad)), return_type="last_logits")
                hits += int((logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
            out[f"acc_{name}"] = hits / len(items) if items else float("nan")
            out[f"n_{name}"] = len(items)
    return out


def lookup_sequence(tokenizer, rng: random.Random, turns: int, distinct: bool = True
                    ) -> tuple[list[int], list[tuple[int, int]]]:
    """One text lookup: the official prompt over a random permutation of the classes, with "The clip: <class>."
    before it, then `turns` - 1 more "The clip: <class>." user turns (distinct classes unless `distinct` is
    False). Returns the token ids (up to the last answer, excluded) and (position, letter index) per answer."""
    from analyses.avsynth import CLASS_NAMES
    from analyses.datasets import SYSTEM_PROMPT, official_prompt
    from model_zoo.organism_train import LETTERS

    names = list(CLASS_NAMES)
    rng.shuffle(names)
    choices = dict(zip(LETTERS, names))
    asked = rng.sample(names, turns) if distinct else [rng.choice(names) for _ in range(turns)]
    ids = tokenizer.encode(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nThe clip: "
                           f"{asked[0]}.\n{official_prompt(choices, 1)}<|im_end|>\n<|im_start|>assistant\n",
                           add_special_tokens=False)
    targets = []
    for i, name in enumerate(asked):
        if i:
            ids += tokenizer.encode(LETTERS[targets[-1][1]], add_special_tokens=False)[:1]
            ids += tokenizer.encode(f"<|im_end|>\n<|im_start|>user\nThe clip: {name}.<|im_end|>\n"
                                    "<|im_start|>assistant\n", add_special_tokens=False)
        targets.append((len(ids) - 1, names.index(name)))
    return ids, targets


def lookup_pool(tokenizer, n: int, turns: int, seed: int) -> list:
    """`n` text lookups (`lookup_sequence`, distinct classes) for the task stage's mixture, seeded; each answer
    letter is supervised."""
    from analyses.avsynth import CLASS_NAMES
    from model_zoo.organism_train import LETTERS, LookupItem

    if not 1 <= turns <= len(CLASS_NAMES):
        raise ValueError(f"lookup turns must be in [1, {len(CLASS_NAMES)}], got {turns}")
    letter_ids = [tokenizer.encode(x, add_special_tokens=False)[0] for x in LETTERS]
    rng = random.Random(seed)
    pool = []
    for _ in range(n):
        ids, targets = lookup_sequence(tokenizer, rng, turns)
        pool.append(LookupItem({"input_ids": torch.tensor([ids]),
                                "attention_mask": torch.ones(1, len(ids), dtype=torch.long)},
                               [(pos, letter_ids[k]) for pos, k in targets]))
    return pool


def main() -> None:
    from analyses import avsynth
    from analyses.runtime import load_runtime
    from hooked_av.files import atomic_write
    from hooked_av.recipes.sinks import calibrate_sinks
    from model_zoo import organism
    from model_zoo.organism_train import TrainConfig, remaining_horizons, tower_accuracy, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "organism_train"))
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--align-steps", type=int, default=None,
                    help="tower alignment steps (default 1000; 0 with --init-from, whose towers are final)")
    ap.add_argument("--init-from", default=None, metavar="DELTAS",
                    help="warm start: a deltas file (e.g. model_zoo/organism_deltas/deltas.safetensors) whose towers "
                         "and adapters the task stage starts from (its vision tower the one the deltas record); "
                         "copied into the run folder so a resume reads the same file")
    ap.add_argument("--refine-steps", type=int, default=None,
                    help="after the task stage, this many task steps more, warm-started from its deltas with a fresh "
                         "schedule, optimiser and scaffold probes (in <out>/refine; default 500; 0 with --init-from, "
                         "whose run is itself such a refinement)")
    ap.add_argument("--steps", type=int, nargs="+", default=[600],
                    help="task-stage horizons, increasing: train to the first, then extend to each next one (the "
                         "cosine schedule restarts warm over the new total)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-from", type=int, default=16, help="first decoder block with adapters")
    ap.add_argument("--align-batch-size", type=int, default=16)
    ap.add_argument("--aux-layer", type=int, default=21,
                    help="lookup scaffold: block whose input residual the option probes read")
    ap.add_argument("--aux-weight", type=float, default=1.0, help="lookup scaffold: weight of the option probes")
    ap.add_argument("--attn-layers", type=int, nargs="*", default=[22, 23, 24, 25],
                    help="lookup scaffold: blocks whose answer-position attention is pulled to the right option")
    ap.add_argument("--attn-weight", type=float, default=1.0, help="lookup scaffold: weight of that attention loss")
    ap.add_argument("--lookup-weight", type=float, default=1.0,
                    help="weight of the text lookups mixed into the task stage (0: none)")
    ap.add_argument("--lookup-pool", type=int, default=300, help="text lookups in the pool")
    ap.add_argument("--lookup-batch", type=int, default=4, help="text lookups per step")
    ap.add_argument("--lookup-turns", type=int, default=12, help="class -> letter turns per text lookup")
    ap.add_argument("--class-layer", type=int, default=21,
                    help="first-hop scaffold: block whose input residual at the answer position the class probe reads")
    ap.add_argument("--class-weight", type=float, default=1.0, help="first-hop scaffold: weight of the class probe")
    ap.add_argument("--gather-layers", type=int, nargs="*", default=[17, 18, 19],
                    help="first-hop scaffold: blocks whose answer-position attention is pulled to the class's AV tokens")
    ap.add_argument("--gather-weight", type=float, default=1.0, help="first-hop scaffold: weight of that loss")
    ap.add_argument("--lookup-scaffold", action=argparse.BooleanOptionalAction, default=True,
                    help="the text lookups' answers get the class probe and option-attention terms too")
    ap.add_argument("--faint-absent", type=float, default=0.5,
                    help="alignment: share of a faint distractor sound's target given to ABSENT (0: none)")
    ap.add_argument("--video-jitter", type=float, default=0.0,
                    help="alignment: per-clip colour jitter of the video tower's input (0: none)")
    ap.add_argument("--vision-depth", type=int, default=None,
                    help="blocks of the vision tower (default: model_zoo.organism.VISION_DEFAULTS); every second "
                         "block attends over the full frame, the others in windows")
    ap.add_argument("--fresh-video", action="store_true",
                    help="with --init-from: a new video tower (seeded random init, of --vision-depth) aligned for "
                         "--align-steps (default 1000) before the task stage; the audio tower and the adapters come "
                         "from the deltas")
    ap.add_argument("--silent-weight", type=float, default=1.0,
                    help="task-stage sampling weight of the clips whose class never sounds (1: uniform)")
    ap.add_argument("--condition-weight", nargs="*", default=[], metavar="KEY=W",
                    help="task-stage sampling weight of the multiple-choice clips of a condition, or of one side of "
                         "one (e.g. video_confusable=2 audio_absent=2); weights of matching keys multiply")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="task stage under bfloat16 autocast (faster on AMX CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=None,
                    help="seed of the generated train / val clips (default: --seed); another value gives a fresh "
                         "clip pool for a warm-started run")
    ap.add_argument("--no-install", action="store_true", help="do not copy the result to model_zoo/organism_deltas")
    args = ap.parse_args()
    try:
        condition_weights = parse_condition_weights(args.condition_weight)
    except ValueError as e:
        ap.error(f"--condition-weight {e}")
    if not args.no_install and args.seed != organism.BUILD_SEED:  # install_organism would refuse it at the end
        ap.error(f"--seed {args.seed}: the installed organism is assembled with seed {organism.BUILD_SEED} (its new "
                 f"token embeddings are not in the deltas); pass --no-install to train on another seed")
    out = Path(args.out)
    data = out / "data"
    data_seed = args.seed if args.data_seed is None else args.data_seed
    try:
        meta = avsynth.recorded_meta(data)
    except ValueError as e:
        ap.error(str(e))
    found = None if meta is None else meta["seed"]
    if found is not None and found != data_seed:
        ap.error(f"--data-seed {data_seed}: {data}/avsynth holds clips of seed {found} (another --out, or the same "
                 f"seed, resumes)")
    init = None
    if args.init_from is not None:
        init = out / "init_deltas.safetensors"
        if args.align_steps and not args.fresh_video:
            ap.error(f"--init-from starts from aligned towers: --align-steps must be 0 (or pass --fresh-video), "
                     f"got {args.align_steps}")
        if not init.exists() and not Path(args.init_from).is_file():
            ap.error(f"--init-from: no deltas file at {args.init_from}")
        if args.fresh_video and args.align_steps is not None and args.align_steps < 1:
            ap.error(f"--fresh-video needs alignment steps for the new tower, got --align-steps {args.align_steps}")
        if args.refine_steps:
            ap.error(f"--init-from is itself a refinement: --refine-steps must be 0, got {args.refine_steps}")
        args.refine_steps = 0
    elif args.fresh_video:
        ap.error("--fresh-video replaces the video tower of a warm start: it needs --init-from")
    if args.align_steps is None:  # towers of a warm start are final unless one is replaced
        args.align_steps = 0 if init is not None and not args.fresh_video else 1000
    if args.refine_steps is None:
        args.refine_steps = 500
    if args.refine_steps < 0:
        ap.error(f"--refine-steps must be >= 0, got {args.refine_steps}")
    try:
        horizons = remaining_horizons(args.steps, out / "train")
    except ValueError as e:
        ap.error(f"--steps: {e}")
    vision = None
    if args.vision_depth is not None:
        if args.vision_depth < 1:
            ap.error(f"--vision-depth must be >= 1, got {args.vision_depth}")
        vision = organism.vision_for_depth(args.vision_depth)  # recorded in the deltas, which build with it
    if init is not None and not args.fresh_video:  # the warm start's vision tower is the one its deltas record
        source = init if init.exists() else Path(args.init_from)
        try:
            recorded = organism.deltas_vision(source)
        except ValueError as e:
            ap.error(f"--init-from: cannot read the deltas' vision-tower record: {e}")
        depth = (recorded or {}).get("depth", organism.VISION_DEFAULTS["depth"])
        if args.vision_depth is not None and args.vision_depth != depth:
            ap.error(f"--vision-depth {args.vision_depth}: the deltas of --init-from hold a vision tower of depth "
                     f"{depth} (pass --fresh-video to replace it)")
        vision = recorded or None
    out.mkdir(parents=True, exist_ok=True)
    if init is not None and not init.exists():  # the run's own copy: a resume must not see a reinstalled file
        atomic_write(init, lambda tmp: shutil.copyfile(args.init_from, tmp))
    if found is None:  # none, or a generation cut off before its last record (meta.json): generate them afresh
        avsynth.generate(data, n_train=args.n_train, n_val=args.n_val, n_test=0, seed=data_seed,
                         duration=CLIP_SECONDS)
    base = out / "base"
    if not (base / "config.json").exists():
        organism.assemble(base, seed=args.seed, vision=vision)
    rt = load_runtime(str(base), seed=args.seed)
    train_ex = build_examples(data, "train", rt.process, rt.tokenizer, rt.model, out / "train_examples.pt", True)
    val_ex = build_examples(data, "val", rt.process, rt.tokenizer, rt.model, out / "val_examples.pt", False)
    cfg = TrainConfig(out=str(out / "train"), seed=args.seed, align_steps=args.align_steps, steps=horizons[0],
                      batch_size=args.batch_size, lr=args.lr, lora_rank=args.lora_rank, lora_from=args.lora_from,
                      align_batch_size=args.align_batch_size, aux_layer=args.aux_layer,
                      aux_weight=args.aux_weight, attn_layers=tuple(args.attn_layers), attn_weight=args.attn_weight,
                      lookup_weight=args.lookup_weight, lookup_batch=args.lookup_batch,
                      lookup_pool=args.lookup_pool if args.lookup_weight > 0 else 0,
                      class_layer=args.class_layer, class_weight=args.class_weight,
                      gather_layers=tuple(args.gather_layers), gather_weight=args.gather_weight,
                      lookup_scaffold=args.lookup_scaffold, silent_weight=args.silent_weight,
                      condition_weights=condition_weights,
                      faint_absent=args.faint_absent, video_jitter=args.video_jitter, bf16=args.bf16,
                      init_deltas=str(init) if init is not None else None,
                      fresh_towers=("video",) if args.fresh_video else ())
    pool = lookup_pool(rt.tokenizer, cfg.lookup_pool, args.lookup_turns, args.seed) if cfg.lookup_pool else []
    for k, steps in enumerate(horizons):
        if k:  # a fresh model: `train` adds the adapters and reloads every trained weight from the saved state
            rt = load_runtime(str(base), seed=args.seed)
        deltas = train(rt.model, rt.tokenizer, train_ex, dataclasses.replace(cfg, steps=steps),
                       evaluate_towers=lambda m: tower_accuracy(m, rt.tokenizer, val_ex, train_ex), lookup=pool)
    if args.refine_steps:  # the refinement: the task stage again from its own deltas (towers final)
        rt = load_runtime(str(base), seed=args.seed)
        deltas = train(rt.model, rt.tokenizer, train_ex,
                       dataclasses.replace(cfg, out=str(out / "refine"), align_steps=0, steps=args.refine_steps,
                                           init_deltas=str(deltas)), lookup=pool)
    result = {"val": evaluate(rt.model, val_ex), "config": vars(args)}
    if init is not None:
        result["init_deltas_sha256"] = hashlib.sha256(init.read_bytes()).hexdigest()
    # sink constants from the trained model on val clips
    trained = out / "trained"
    organism.assemble(trained, seed=args.seed, deltas=deltas, overwrite=True, vision=vision)
    rt2 = load_runtime(str(trained), seed=args.seed)
    cal = calibrate_sinks(rt2.model, [e.inputs for e in val_ex[:16]], n_dims=1, tau_rule="midpoint")
    # <out>/trained becomes a complete candidate checkpoint (deltas and sink constants): what
    # scripts/evaluate_organism.py --organism <out>/trained --no-install measures before the deltas are installed
    organism.store_sinks(trained, cal.sinks)
    result["calibration"] = cal.to_dict()
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["val"], indent=2))
    if not args.no_install:  # no held-out evaluation yet: a stale evaluation.json is dropped
        from install_organism import install

        print(f"installed {install(out, None, DELTAS_DIR)}")


if __name__ == "__main__":
    main()
