"""nnsight interop (`hooked_av.integrations.nnsight`), checked against run_with_cache / run_with_hooks.

Importing nnsight patches global state (a `.save` on every object, `Tensor.backward`), so nothing here imports it
into the pytest process: every nnsight-using check runs in one child process (this file run as a script), which
reports each check's outcome as JSON; the tests below assert on those outcomes one by one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_MARKER = "NNSIGHT_CHECKS_JSON="
_CHILD_TIMEOUT_S = 240


def _python(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=_CHILD_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------------- parent
def test_importing_hooked_av_does_not_import_nnsight():
    code = (
        "import sys\n"
        "import hooked_av, hooked_av.integrations, hooked_av.integrations.nnsight, model_zoo.qwen2_5_omni\n"
        "assert 'nnsight' not in sys.modules, 'importing hooked_av imported nnsight'\n"
        "assert not hasattr(object(), 'save'), 'object() has a .save: nnsight patched builtins'\n"
        # positive control: the check above can fail, and wrap() is where nnsight gets imported
        "from model_zoo.tiny import tiny_hf_thinker\n"
        "from hooked_av.integrations.nnsight import wrap\n"
        "wrap(hooked_av.HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)))\n"
        "assert 'nnsight' in sys.modules and hasattr(object(), 'save')\n"
        "print('ok')\n"
    )
    proc = _python(["-c", code])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]


@pytest.fixture(scope="module")
def child_results() -> dict[str, str | None]:
    proc = _python([str(Path(__file__).resolve()), "--nnsight-checks"])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"nnsight child process failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(_MARKER):])


def _assert_check(results: dict[str, str | None], name: str) -> None:
    assert name in results, f"check {name!r} did not run in the child; ran: {sorted(results)}"
    if results[name] is not None:
        pytest.fail(f"{name} failed in the nnsight child process:\n{results[name]}", pytrace=False)


def test_resid_pre_and_logits_match_run_with_cache(child_results):
    _assert_check(child_results, "resid_pre_and_logits_match_run_with_cache")


def test_eager_attention_pattern_matches_run_with_cache(child_results):
    _assert_check(child_results, "eager_attention_pattern_matches_run_with_cache")


def test_blockwise_patterns_read_with_tracer_iter(child_results):
    _assert_check(child_results, "blockwise_patterns_read_with_tracer_iter")


def test_edit_matches_run_with_hooks(child_results):
    _assert_check(child_results, "edit_matches_run_with_hooks")


def test_sink_hook_reachable(child_results):
    _assert_check(child_results, "sink_hook_reachable")


def test_tower_hooks_reachable(child_results):
    _assert_check(child_results, "tower_hooks_reachable")


def test_envoy_resolves_names_and_rejects_typos(child_results):
    _assert_check(child_results, "envoy_resolves_names_and_rejects_typos")


def test_unwrap_restores_model(child_results):
    _assert_check(child_results, "unwrap_restores_model")


# ----------------------------------------------------------------------------------------------------------- child
# Everything below runs only in the child process (`python tests/test_nnsight.py --nnsight-checks`).

def _setup():
    import torch

    from hooked_av import HookedAVModel, SinkConstants
    from model_zoo.tiny import build_inputs, tiny_hf_thinker

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0, attn="eager"), sinks=SinkConstants(dims=(3, 17)))
    inputs = build_inputs(kind="av", grid=(5, 4, 4), frames=730)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    return model, inputs, cache


def check_resid_pre_and_logits_match_run_with_cache(model, inputs, cache):
    import torch

    from hooked_av.integrations.nnsight import wrapped_model

    with wrapped_model(model) as traced:
        with traced.trace(**inputs):
            resid = traced.blocks[1].hook_resid_pre.output.save()
            logits = traced.output.save()
    # run_with_cache hooks the pattern, so it runs eager attention; the plain trace runs sdpa: close, not equal
    torch.testing.assert_close(resid, cache["blocks.1.hook_resid_pre"])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(**inputs))
    assert logits.shape == (*inputs["input_ids"].shape, model.cfg.d_vocab)


def check_eager_attention_pattern_matches_run_with_cache(model, inputs, cache):
    import torch

    from hooked_av.integrations.nnsight import wrapped_model

    t = inputs["input_ids"].shape[1]
    expected = cache["blocks.0.attn.hook_pattern"]
    assert expected.shape == (1, model.cfg.n_heads, t, t)
    # without eager attention the pattern hook point is never called, so nnsight cannot reach it
    with wrapped_model(model, eager_attention=False) as traced:
        try:
            with traced.trace(**inputs):
                traced.blocks[0].attn.hook_pattern.output.save()
        except Exception as error:  # nnsight reports the never-reached location
            assert type(error).__name__ == "OutOfOrderError" and "hook_pattern" in str(error), repr(error)
        else:
            raise AssertionError("hook_pattern was reachable under sdpa attention")
    # a small configured block size: single_attention_block must still give the whole map in one call
    model.cfg.eager_attn_block_rows = 16
    try:
        with wrapped_model(model, eager_attention=True) as traced:
            assert all(block.attn.force_eager for block in model.blocks)
            with traced.trace(**inputs):
                scores = traced.blocks[0].attn.hook_attn_scores.output.save()
                pattern = traced.blocks[0].attn.hook_pattern.output.save()
        assert not any(block.attn.force_eager for block in model.blocks), "force_eager not restored"
        assert model.cfg.eager_attn_block_rows == 16, "eager_attn_block_rows not restored"
    finally:
        model.cfg.eager_attn_block_rows = None
    torch.testing.assert_close(pattern, expected)
    torch.testing.assert_close(scores, cache["blocks.0.attn.hook_attn_scores"])
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, model.cfg.n_heads, t))


def check_blockwise_patterns_read_with_tracer_iter(model, inputs, cache):
    import nnsight
    import torch

    from hooked_av.integrations.nnsight import wrapped_model

    t = inputs["input_ids"].shape[1]
    rows = 16
    n_blocks = -(-t // rows)
    model.cfg.eager_attn_block_rows = rows
    try:
        with wrapped_model(model, eager_attention=True, single_attention_block=False) as traced:
            with traced.trace(**inputs) as tracer:
                blocks = nnsight.save([])
                for _ in tracer.iter[:n_blocks]:
                    blocks.append(traced.blocks[1].attn.hook_pattern.output)
    finally:
        model.cfg.eager_attn_block_rows = None
    assert len(blocks) == n_blocks and blocks[0].shape[-2] == rows
    torch.testing.assert_close(torch.cat(blocks, dim=-2), cache["blocks.1.attn.hook_pattern"])


def check_edit_matches_run_with_hooks(model, inputs, cache):
    import torch

    from hooked_av.integrations.nnsight import wrapped_model

    with torch.no_grad():
        clean = model(**inputs)
        hooked = model.run_with_hooks(
            **inputs, fwd_hooks=[("blocks.1.hook_attn_out", lambda t, hook: torch.zeros_like(t))])
    assert (hooked - clean).abs().max() > 1e-3, "zeroing attn_out did not change the logits"
    with wrapped_model(model) as traced:
        with traced.trace(**inputs):
            out = traced.blocks[1].hook_attn_out.output
            traced.blocks[1].hook_attn_out.output = torch.zeros_like(out)
            edited = traced.output.save()
        with traced.trace(**inputs):
            traced.blocks[1].hook_attn_out.output[:] = 0  # in-place form
            edited_inplace = traced.output.save()
    torch.testing.assert_close(edited, hooked)
    torch.testing.assert_close(edited_inplace, hooked)
    # the edit lasted for one trace only
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), clean)


def check_sink_hook_reachable(model, inputs, cache):
    import torch

    from hooked_av.integrations.nnsight import wrapped_model

    with wrapped_model(model, sink_hooks=True) as traced:
        with traced.trace(**inputs):
            sink = traced.blocks[2].hook_sink.output.save()
    expected = cache["blocks.2.hook_sink"]
    assert expected.shape == (*inputs["input_ids"].shape, 2)
    torch.testing.assert_close(sink, expected)
    assert not any(block.always_run_sink_hook for block in model.blocks), "always_run_sink_hook not restored"
    with wrapped_model(model, sink_hooks=False) as traced:
        try:
            with traced.trace(**inputs):
                traced.blocks[2].hook_sink.output.save()
        except Exception as error:
            assert type(error).__name__ == "OutOfOrderError" and "hook_sink" in str(error), repr(error)
        else:
            raise AssertionError("hook_sink was reachable without sink_hooks")


def check_tower_hooks_reachable(model, inputs, cache):
    import torch

    from hooked_av.integrations.nnsight import envoy, wrapped_model

    with wrapped_model(model) as traced:
        with traced.trace(**inputs):
            audio = envoy(traced, "audio_tower.blocks.1.hook_resid_post").output.save()
            video = envoy(traced, "video_tower.hook_out").output.save()
            embed = envoy(traced, "hook_embed").output.save()
    torch.testing.assert_close(audio, cache["audio_tower.blocks.1.hook_resid_post"])
    torch.testing.assert_close(video, cache["video_tower.hook_out"])
    torch.testing.assert_close(embed, cache["hook_embed"])


def check_envoy_resolves_names_and_rejects_typos(model, inputs, cache):
    from hooked_av.hook_names import UnknownHookNameError
    from hooked_av.integrations.nnsight import envoy, wrap, wrapped_model

    with wrapped_model(model) as traced:
        assert envoy(traced, "blocks.1.attn.hook_pattern") is traced.blocks[1].attn.hook_pattern
        assert envoy(traced, "ln_final.hook_normalized") is traced.ln_final.hook_normalized
        for name in model.hook_dict:
            assert envoy(traced, name)._module is model.hook_dict[name], name
        try:
            envoy(traced, "blocks.1.hook_resid_pree")
        except UnknownHookNameError as error:
            assert "blocks.1.hook_resid_pre" in str(error), str(error)
        else:
            raise AssertionError("a misspelt hook name resolved")
        try:
            wrap(traced)
        except TypeError:
            pass
        else:
            raise AssertionError("wrap accepted an nnsight wrapper")


def check_unwrap_restores_model(model, inputs, cache):
    import torch

    from hooked_av.integrations.nnsight import unwrap, wrap

    with torch.no_grad():
        before = model(**inputs)
    model.blocks[0].attn.force_eager = True  # a user setting that must survive wrap/unwrap
    try:
        traced = wrap(model, eager_attention=True, sink_hooks=True)
        assert all(b.attn.force_eager and b.always_run_sink_hook for b in model.blocks)
        assert model.cfg.eager_attn_block_rows is not None
        assert unwrap(traced) is model
        assert unwrap(traced) is model  # idempotent
        assert [b.attn.force_eager for b in model.blocks] == [True] + [False] * (model.cfg.n_layers - 1)
        assert not any(b.always_run_sink_hook for b in model.blocks)
        assert model.cfg.eager_attn_block_rows is None
    finally:
        model.blocks[0].attn.force_eager = False
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), before)
        _, again = model.run_with_cache(**inputs, names_filter=["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(again["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_pre"])


def _child_main() -> None:
    model, inputs, cache = _setup()
    results: dict[str, str | None] = {}
    for name, fn in list(globals().items()):
        if not name.startswith("check_"):
            continue
        try:
            fn(model, inputs, cache)
            results[name.removeprefix("check_")] = None
        except BaseException:  # noqa: BLE001 - report every failure to the parent
            results[name.removeprefix("check_")] = traceback.format_exc()
    print(_MARKER + json.dumps(results), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--nnsight-checks"]:
        _child_main()
    else:
        sys.exit("usage: python tests/test_nnsight.py --nnsight-checks (run by pytest; see the module docstring)")
