"""The README's recipe example runs as written (on the tiny random thinker and a synthetic clip)."""

import re
from pathlib import Path

from hooked_av import HookedAVModel, SinkConstants
from model_zoo.tiny import TinyTokenizer
from test_media_corrupt import write_mp4

README = Path(__file__).resolve().parents[1] / "README.md"


def test_recipe_example_runs(hf_thinker, tmp_path):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Recipes"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    clip = write_mp4(tmp_path / "clip.mp4", seconds=4.0)
    code = code.replace('"clip.mp4"', repr(str(clip)))
    model = HookedAVModel.from_hf_model(hf_thinker, sinks=SinkConstants(dims=(7, 11), tau=1.5))
    scope = {"model": model, "tokenizer": TinyTokenizer(), "prompt": "Which one? A. x B. y C. z"}
    exec(compile(code, "README recipe", "exec"), scope)
    assert scope["out"].new_tokens.shape == (1, 32)
    assert len(scope["unimodal"]) + len(scope["cross"]) == len(scope["g"].video)
    assert isinstance(scope["ie"].ie_clean, float)
