"""Checkpoint round trips, presets and the errors for bad checkpoints."""

import json

import pytest
import torch

from hooked_av import HookedAVModel
from hooked_av.checkpoint import CheckpointError
from model_zoo.tiny import build_inputs

AV = dict(kind="av", grid=(5, 4, 4), frames=730)


def test_save_load_round_trip_single_file(tmp_path, hf_thinker, model):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = HookedAVModel.from_pretrained(str(tmp_path))
    inp = build_inputs(**AV)
    with torch.no_grad():  # the towers may run another attention kernel (sdpa vs eager): float tolerance
        torch.testing.assert_close(loaded(**inp), model(**inp), atol=1e-5, rtol=0)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    # transformers loads what we wrote, and computes the same logits
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    hf = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(**inp).logits - model(**inp)).abs().max() <= 1e-4


def test_load_transformers_checkpoint_sharded(tmp_path, hf_thinker, model):
    hf_thinker.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = HookedAVModel.from_pretrained(str(tmp_path), dtype=torch.float32)
    inp = build_inputs(**AV)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp), model(**inp), atol=1e-5, rtol=0)


def test_streaming_load_keeps_one_copy(tmp_path, model):
    """Every loaded parameter owns its storage: no tensor is a view into a whole-shard buffer kept alive."""
    model.save_pretrained(tmp_path, max_shard_bytes=64 * 1024)
    loaded = HookedAVModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    total = sum(p.numel() * p.element_size() for p in loaded.parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in loaded.parameters()}
    assert sum(storages.values()) <= total * 1.01
    assert not any(p.is_meta for p in loaded.parameters())


def test_bfloat16_load_runs(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = HookedAVModel.from_pretrained(str(tmp_path), dtype="bfloat16")
    with torch.no_grad():
        logits = loaded(**build_inputs(**AV))
        ref = model(**build_inputs(**AV))
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.2 * ref.abs().max()


def test_preset_rejects_checkpoint_of_other_shape(tmp_path, model):
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="qwen2.5-omni-7b.*n_layers: preset 28, checkpoint 3"):
        HookedAVModel.from_pretrained("qwen2.5-omni-7b", checkpoint=str(tmp_path))


def test_checkpoint_of_other_family_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama'"):
        HookedAVModel.from_pretrained("qwen2.5-omni-7b", checkpoint=str(tmp_path))


def test_missing_weights_and_files_are_reported(tmp_path, model):
    with pytest.raises(CheckpointError, match="no config.json"):
        HookedAVModel.from_pretrained(str(tmp_path))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*blocks\.1\.mlp\.up_proj\.weight"):
        HookedAVModel.from_pretrained(str(tmp_path))


def test_preset_needs_checkpoint_and_names_presets():
    with pytest.raises(ValueError, match="checkpoint="):
        HookedAVModel.from_pretrained("qwen2.5-omni-7b")
    with pytest.raises(ValueError, match="qwen2.5-omni-3b"):
        HookedAVModel.from_pretrained("qwen2.5-omni-70b")


def test_presets_carry_sink_constants_with_provenance():
    from model_zoo.qwen2_5_omni import PRESETS

    s7, s3 = PRESETS["qwen2.5-omni-7b"]["sinks"], PRESETS["qwen2.5-omni-3b"]["sinks"]
    assert s7.dims == (458, 2570) and s7.tau == 25 and s7.calibrated and "sink.py" in s7.provenance
    assert not s3.calibrated and s3.dims == () and "not calibrated" in s3.provenance
    assert PRESETS["qwen2.5-omni-7b"]["n_layers"] == 28 and PRESETS["qwen2.5-omni-3b"]["n_layers"] == 36


def test_from_hf_model_rejects_other_classes():
    with pytest.raises(TypeError, match="Qwen2_5OmniThinkerForConditionalGeneration"):
        HookedAVModel.from_hf_model(torch.nn.Linear(2, 2))
