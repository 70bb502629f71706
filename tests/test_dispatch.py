"""One model over several devices (hooked_av.dispatch): `from_pretrained(device_map=...)` through accelerate's
dispatch. This machine has one device, so the maps here put blocks on "disk" (accelerate keeps their weights in
an offload folder and loads them for each forward, through the same hooks that move inputs between GPUs): the
logits, the cache, a patching hook and the fast tracing recipe must equal the plain model's."""

import pytest
import torch

from hooked_av import HookedAVModel, SinkConstants, hook_names
from hooked_av.dispatch import DeviceMapError, execution_device, parameter, resolve_device_map
from hooked_av.recipes import fast_patching, patching, scoring
from model_zoo.tiny import build_inputs

SINKS = SinkConstants(dims=(7, 11), tau=1.5)
#: the embedding, the first block and the unembedding in memory; the towers, blocks 1-2 and the final norm on disk
SPLIT = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "ln_final": "disk",
         "unembed": "cpu", "": "disk"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny thinker with its decoder weights scaled up (so that restorations move the logits well above float
    noise), saved as a checkpoint."""
    from model_zoo.tiny import tiny_hf_thinker

    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0), sinks=SINKS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks") and p.ndim == 2:
                p.mul_(4.0)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(checkpoint):
    return HookedAVModel.from_pretrained(str(checkpoint), sinks=SINKS)


@pytest.fixture(scope="module")
def split(checkpoint, tmp_path_factory):
    return HookedAVModel.from_pretrained(str(checkpoint), sinks=SINKS, device_map=SPLIT,
                                         offload_folder=str(tmp_path_factory.mktemp("offload")))


def test_offloaded_blocks_are_dispatched(split):
    # '' ("the rest") is spelled out as the modules no other entry names, as accelerate needs a partition
    assert "" not in split.hf_device_map
    assert {k: split.hf_device_map[k] for k in SPLIT if k} == {k: v for k, v in SPLIT.items() if k}
    assert split.hf_device_map["audio_encoder"] == split.hf_device_map["vision_encoder"] == "disk"
    assert all(p.is_meta for p in split.blocks[1].parameters())  # on disk between forwards
    assert not any(p.is_meta for p in split.blocks[0].parameters())
    assert execution_device(split.blocks[2]) == torch.device("cpu")
    assert split.device == torch.device("cpu")
    torch.testing.assert_close(parameter(split.blocks[1].ln1), parameter(split.blocks[1].ln1))
    assert not parameter(split.blocks[1].ln1).is_meta


def test_logits_cache_and_hooks_equal_the_plain_model(plain, split):
    inputs = plain.prepare_inputs(**build_inputs("av", seed=5))
    with torch.no_grad():
        ref_logits, ref_cache = plain.run_with_cache(inputs)
        logits, cache = split.run_with_cache(inputs)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    names = [hook_names.resid_pre(0), hook_names.pattern(1), hook_names.sink(2), hook_names.resid_post(2)]
    for name in names:
        torch.testing.assert_close(cache[name], ref_cache[name], rtol=0, atol=0, msg=name)
    assert set(cache.keys()) == set(ref_cache.keys())

    audio = inputs.modality_map.positions("audio")

    def ablate(x, hook):  # zero the audio rows of an offloaded block's attention output
        x[:, audio] = 0
        return x

    hooks = [(hook_names.attn_out(1), ablate)]
    with torch.no_grad():
        want = plain.run_with_hooks(inputs, fwd_hooks=hooks)
        got = split.run_with_hooks(inputs, fwd_hooks=hooks)
    assert (want - ref_logits).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fast_tracing_across_offloaded_blocks_equals_the_plain_model(plain, split):
    raw = build_inputs("av", seed=5)
    clean = plain.prepare_inputs(**raw)
    corrupt = plain.prepare_inputs(**dict(raw, pixel_values_videos=torch.zeros_like(raw["pixel_values_videos"])))
    audio = clean.modality_map.positions("audio").tolist()
    subsets = [audio, audio[::4], audio[:1]]
    answers = {"clean": scoring.AnswerCandidates("A", (3, 40)), "corrupt": scoring.AnswerCandidates("B", (17,))}
    for site in ("before_attn", "kv"):
        want = fast_patching.fast_patched_probs(plain, clean, corrupt, subsets, answers, site=site)
        got = fast_patching.fast_patched_probs(split, clean, corrupt, subsets, answers, site=site)
        for name in answers:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=f"{site} {name}")
    acts = patching.capture(split, clean, audio, site="resid_pre", layers=[1, 2])
    with torch.no_grad(), patching.restored(split, acts, [audio]):
        restored = split(corrupt, return_type="last_logits")
    with torch.no_grad(), patching.restored(plain, patching.capture(plain, clean, audio, site="resid_pre",
                                                                     layers=[1, 2]), [audio]):
        torch.testing.assert_close(restored, plain(corrupt, return_type="last_logits"), rtol=0, atol=0)


def test_device_map_strategies_and_single_devices(checkpoint, plain):
    one = HookedAVModel.from_pretrained(str(checkpoint), sinks=SINKS, device_map="cpu")
    assert one.hf_device_map == {"": "cpu"}
    auto = resolve_device_map(plain, "auto", max_memory={"cpu": "1GiB"})
    assert set(auto.values()) == {"cpu"}
    # a decoder block is never split across devices
    assert not any(k.startswith("blocks.") and k.count(".") > 1 for k in auto), auto
    inputs = plain.prepare_inputs(**build_inputs("av", seed=1))
    with torch.no_grad():
        torch.testing.assert_close(one(inputs), plain(inputs), rtol=0, atol=0)


def test_bad_device_maps_get_clear_errors(checkpoint, plain):
    with pytest.raises(DeviceMapError, match=r"'block\.1', which is not a module .*closest: blocks\.1"):
        resolve_device_map(plain, {"block.1": "cpu", "": "cpu"})
    with pytest.raises(DeviceMapError, match="without a device"):
        resolve_device_map(plain, {"blocks": "cpu"})
    with pytest.raises(DeviceMapError, match="offload_folder"):
        HookedAVModel.from_pretrained(str(checkpoint), device_map={"blocks.1": "disk", "": "cpu"})
    with pytest.raises(ValueError, match="device= or device_map=, not both"):
        HookedAVModel.from_pretrained(str(checkpoint), device="meta", device_map="cpu")
