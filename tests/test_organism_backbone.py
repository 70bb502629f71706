"""The organism's backbone: SmolLM2-135M-Instruct from its GGUF, assembled as a Qwen2.5-Omni thinker checkpoint.

Needs `.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch_assets.py`) and the `gguf` package; the
tests that need them are skipped otherwise. The GGUF is read once per module and the checkpoint assembled once.
"""

import json
import math

import numpy as np
import pytest
import torch

from model_zoo import organism
from model_zoo.organism import CHATML_PROMPT, SMOLLM2, TOKEN_IDS, OrganismAssetError

LETTERS = "ABCDEFGHIJKLMNOPQRST"


def _assets_available() -> str | None:
    if not organism.DEFAULT_GGUF.is_file():
        return f"SmolLM2 GGUF missing at {organism.DEFAULT_GGUF} ({organism.FETCH_HINT})"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is not installed"
    return None


needs_gguf = pytest.mark.skipif(_assets_available() is not None, reason=str(_assets_available()))


# ------------------------------------------------------------------------------------------------ no assets needed
def test_missing_gguf_names_the_fetch_script(tmp_path):
    with pytest.raises(OrganismAssetError, match=r"scripts/fetch_assets\.py"):
        organism.load_smollm2(tmp_path / "absent.gguf")
    with pytest.raises(OrganismAssetError, match=r"scripts/fetch_assets\.py"):
        organism.assemble(tmp_path / "ckpt", gguf_path=tmp_path / "absent.gguf")
    assert not (tmp_path / "ckpt").exists()


def test_unpermute_qk_inverts_the_gguf_permutation():
    n_heads, head_dim, d_in = 3, 8, 5
    w = torch.randn(n_heads * head_dim, d_in)
    gguf_w = organism.permute_qk(w, n_heads)
    # convert_hf_to_gguf: per head, row i (first half) and row i + head_dim/2 become the adjacent rows 2i, 2i+1
    for h in range(n_heads):
        for i in range(head_dim // 2):
            assert torch.equal(gguf_w[h * head_dim + 2 * i], w[h * head_dim + i])
            assert torch.equal(gguf_w[h * head_dim + 2 * i + 1], w[h * head_dim + head_dim // 2 + i])
    assert torch.equal(organism.unpermute_qk(gguf_w, n_heads), w)


def test_organism_config_checks():
    cfg = organism.organism_config(n_layers=4)
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (576, 4, 9, 3, 1536, 49159)
    assert text.rms_norm_eps == 1e-5 and text.rope_parameters["rope_theta"] == 1e5
    assert sum(text.rope_parameters["mrope_section"]) == SMOLLM2.d_head // 2
    assert cfg.tie_word_embeddings and cfg.audio_config.output_dim == cfg.vision_config.out_hidden_size == 576
    assert cfg.vision_start_token_id == TOKEN_IDS.vision_start and cfg.audio_token_index == TOKEN_IDS.audio
    with pytest.raises(ValueError, match="n_layers"):
        organism.organism_config(n_layers=31)
    with pytest.raises(ValueError, match="mrope_section"):
        organism.organism_config(mrope_section=(16, 24, 24))
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        organism.organism_config(vision=dict(depth=2, fullatt_block_indexes=[2]))


def test_towers_are_seeded():
    cfg = organism.organism_config(n_layers=1)
    a, b, c = (organism._tower_state(cfg, seed) for seed in (0, 0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["audio_tower.proj.weight"], c["audio_tower.proj.weight"])


# ------------------------------------------------------------------------------------------------ with the GGUF
@pytest.fixture(scope="module")
def backbone():
    reason = _assets_available()
    if reason:
        pytest.skip(reason)
    return organism.load_smollm2()


@pytest.fixture(scope="module")
def raw_gguf(backbone):
    """The GGUF's tensors as stored (q/k in llama.cpp's adjacent-pair row order), for the reference forward."""
    return organism.gguf_tensors(organism._gguf_reader(None))


@pytest.fixture(scope="module")
def ckpt(backbone, tmp_path_factory):
    return organism.assemble(tmp_path_factory.mktemp("organism") / "ckpt", seed=0, backbone=backbone)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hooked(ckpt):
    from hooked_av import HookedAVModel

    return HookedAVModel.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)


@needs_gguf
def test_backbone_state_dict(backbone, raw_gguf):
    state, _ = backbone
    assert len(state) == 2 + 9 * SMOLLM2.n_layers and "lm_head.weight" not in state  # tied
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    assert sum(t.numel() for t in state.values()) == 134_515_008
    # only q and k are reordered; everything else is the GGUF tensor as dequantised
    assert torch.equal(state["model.layers.3.mlp.gate_proj.weight"], raw_gguf["blk.3.ffn_gate.weight"])
    assert torch.equal(state["model.embed_tokens.weight"], raw_gguf["token_embd.weight"])
    assert not torch.equal(state["model.layers.3.self_attn.q_proj.weight"], raw_gguf["blk.3.attn_q.weight"])


@needs_gguf
def test_tokenizer(backbone, tokenizer, ckpt):
    _, tok = backbone
    assert len(tok) == len(tokenizer) == organism.VOCAB == 49159
    text = "Hello, world! 2024 — naïve café\n\tThe capital of France"
    for t in (tok, tokenizer):
        ids = t.encode(text, add_special_tokens=False)
        assert t.decode(ids) == text
        assert t.encode(CHATML_PROMPT)[0] == TOKEN_IDS.bos and t.decode(t.encode(CHATML_PROMPT)) == CHATML_PROMPT
        for letter in LETTERS:  # the answer letters are single tokens, bare and after a space
            assert len(t.encode(letter)) == 1 and len(t.encode(" " + letter)) == 1
        special = "<|vision_bos|><|audio_bos|><|VIDEO|><|AUDIO|><|audio_eos|><|vision_eos|><|IMAGE|>"
        assert t.encode(special) == [TOKEN_IDS.vision_start, TOKEN_IDS.audio_start, TOKEN_IDS.video,
                                     TOKEN_IDS.audio, TOKEN_IDS.audio_end, TOKEN_IDS.vision_end, TOKEN_IDS.image]
        assert t.encode("<|im_start|>user<|im_end|><|endoftext|>") == [1, 4093, 2, 0]
    assert tok.encode(text) == tokenizer.encode(text)
    # the token ids in config.json are the tokenizer's
    cfg = json.loads((ckpt / "config.json").read_text())
    by_token = {"audio_token_index": "<|AUDIO|>", "image_token_index": "<|IMAGE|>", "video_token_index": "<|VIDEO|>",
                "audio_start_token_id": "<|audio_bos|>", "audio_end_token_id": "<|audio_eos|>",
                "vision_start_token_id": "<|vision_bos|>", "vision_end_token_id": "<|vision_eos|>",
                "bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|endoftext|>",
                "user_token_id": "user"}
    for key, token in by_token.items():
        assert cfg[key] == tokenizer.convert_tokens_to_ids(token), key
    assert cfg["text_config"]["vocab_size"] == len(tokenizer)


def _reference_logits(raw: dict, ids: list[int]) -> torch.Tensor:
    """SmolLM2 written directly on the GGUF tensors: llama.cpp's RoPE on adjacent pairs (the GGUF's q/k row order),
    GQA by repeat_interleave, RMSNorm eps 1e-5, SwiGLU, tied output."""
    s = SMOLLM2
    n = len(ids)
    x = raw["token_embd.weight"][torch.tensor(ids)]
    inv = 1.0 / s.rope_theta ** (torch.arange(0, s.d_head, 2, dtype=torch.float64) / s.d_head)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * inv
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]

    def rope(t):  # [pos, head, d_head], pairs (2i, 2i+1)
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    def norm(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + s.rms_norm_eps) * w

    mask = torch.full((n, n), -math.inf).triu(1)
    rep = s.n_heads // s.n_key_value_heads
    for i in range(s.n_layers):
        w = {k.split(".")[2]: v for k, v in raw.items() if k.startswith(f"blk.{i}.")}
        h = norm(x, w["attn_norm"])
        q = rope((h @ w["attn_q"].T).view(n, s.n_heads, s.d_head))
        k = rope((h @ w["attn_k"].T).view(n, s.n_key_value_heads, s.d_head)).repeat_interleave(rep, dim=1)
        v = (h @ w["attn_v"].T).view(n, s.n_key_value_heads, s.d_head).repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(s.d_head) + mask
        z = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
        x = x + z @ w["attn_output"].T
        h = norm(x, w["ffn_norm"])
        x = x + (torch.nn.functional.silu(h @ w["ffn_gate"].T) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    return norm(x, raw["output_norm.weight"]) @ raw["token_embd.weight"].T


@needs_gguf
def test_converted_weights_match_adjacent_pair_reference(raw_gguf, hf_model, tokenizer):
    ids = tokenizer.encode(CHATML_PROMPT)
    with torch.no_grad():
        ref = _reference_logits(raw_gguf, ids)
        got = hf_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    # the new modality-token rows are not in SmolLM2's vocabulary
    got = got[0, :, : SMOLLM2.d_vocab]
    assert (got - ref).abs().max() <= 5e-4  # measured 5.5e-5 (logits up to 35)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert tokenizer.decode(ref[-1].argmax()) == "The"


@needs_gguf
def test_qwen_attention_biases_are_zero(hf_model):
    text = hf_model.model.language_model
    assert len(text.layers) == SMOLLM2.n_layers
    attn = text.layers[7].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and torch.count_nonzero(proj.bias) == 0
    assert attn.o_proj.bias is None
    assert hf_model.lm_head.weight.data_ptr() == text.embed_tokens.weight.data_ptr()  # tied
    emb = text.embed_tokens.weight
    new, old = emb[SMOLLM2.d_vocab:], emb[: SMOLLM2.d_vocab]
    assert new.shape == (7, 576) and (new - old.mean(0)).norm(dim=-1).max() < 0.1 * old.norm(dim=-1).median()


@needs_gguf
def test_checkpoint_files_and_presets(ckpt, hooked):
    from hooked_av import HookedAVModel

    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json"}
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_omni_thinker"
    assert cfg["hooked_av"]["model_name"] == "organism" and not cfg["hooked_av"]["sinks"]["calibrated"]
    assert cfg["hooked_av"]["organism"]["seed"] == 0
    assert hooked.cfg.model_name == "organism" and hooked.cfg.sinks == organism.SINKS
    assert "calibrate_sinks" in hooked.cfg.sinks.provenance
    assert (hooked.cfg.d_vocab, hooked.cfg.rms_norm_eps, hooked.cfg.rope_theta) == (49159, 1e-5, 1e5)
    preset = HookedAVModel.from_pretrained("organism", checkpoint=str(ckpt))
    assert preset.cfg.model_name == "organism" and preset.cfg.sinks == organism.SINKS
    assert torch.equal(preset.blocks[5].attn.q_proj.weight, hooked.blocks[5].attn.q_proj.weight)
    with pytest.raises(FileExistsError):
        organism.assemble(ckpt)


@needs_gguf
def test_hf_and_hooked_agree_on_text(hf_model, hooked, tokenizer):
    ids = tokenizer(CHATML_PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = hf_model(**ids).logits
        got = hooked(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    assert (got - ref).abs().max() <= 1e-4


@needs_gguf
def test_hf_and_hooked_agree_on_audio_video(hf_model, hooked, tokenizer):
    from hooked_av.media import RawAV
    from model_zoo.qwen2_5_omni_processing import ChatProcessor, Qwen25OmniMediaProcessor

    rng = np.random.default_rng(0)
    seconds = 3
    t = np.arange(seconds * 16000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    frames = rng.integers(0, 256, (2 * seconds, 112, 112, 3), dtype=np.uint8)
    media = Qwen25OmniMediaProcessor.from_model(hooked, tokenizer, video_min_pixels=56 * 56,
                                                video_max_pixels=112 * 112)
    inputs = ChatProcessor(media)(RawAV(waveform=wave, frames=frames, fps=2.0), "What is making the sound?")
    ids = inputs["input_ids"][0]
    assert inputs["input_features"].shape[1] == 128 and inputs["use_audio_in_video"]
    assert int((ids == TOKEN_IDS.video).sum()) == 3 * 16 and int((ids == TOKEN_IDS.audio).sum()) == 75
    with torch.no_grad():
        ref = hf_model(**inputs).logits
        got = hooked(**inputs)
    assert (got - ref).abs().max() <= 1e-4


@needs_gguf
def test_greedy_answer_is_paris(hf_model, hooked, tokenizer):
    ids = tokenizer(CHATML_PROMPT, return_tensors="pt")
    out = hooked.generate(input_ids=ids.input_ids, max_new_tokens=10)
    answer = tokenizer.decode(out.new_tokens[0], skip_special_tokens=True)
    assert "Paris" in answer, answer
    with torch.no_grad():
        hf_out = hf_model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert tokenizer.decode(hf_out[0, ids.input_ids.shape[1]:], skip_special_tokens=True) == answer


@needs_gguf
def test_deltas_override_towers_and_new_rows(backbone, tmp_path):
    from safetensors.torch import save_file

    from hooked_av import HookedAVModel

    config = organism.organism_config(n_layers=2)
    proj = torch.full((576, 128), 0.5)
    rows = torch.randn(7, 576)
    q = torch.randn(576, 576)
    save_file({"audio_tower.proj.weight": proj, "model.embed_tokens.weight": rows,
               "blocks.1.attn.q_proj.weight": q},  # a HookedAVModel name: merged LoRA on layer 1
              str(tmp_path / "deltas.safetensors"))
    out = organism.assemble(tmp_path / "small", seed=3, deltas=tmp_path / "deltas.safetensors", n_layers=2,
                            backbone=backbone)
    record = json.loads((out / "config.json").read_text())["hooked_av"]["organism"]
    assert record["overridden"] == ["audio_tower.proj.weight", "model.embed_tokens.weight",
                                    "model.layers.1.self_attn.q_proj.weight"]
    model = HookedAVModel.from_pretrained("organism", checkpoint=str(out))
    assert model.cfg.n_layers == 2 and config.text_config.num_hidden_layers == 2
    assert torch.equal(model.audio_encoder.proj.weight, proj)
    assert torch.equal(model.embed.weight[SMOLLM2.d_vocab:], rows)
    assert torch.equal(model.embed.weight[: SMOLLM2.d_vocab], backbone[0]["model.embed_tokens.weight"])
    assert torch.equal(model.blocks[1].attn.q_proj.weight, q)
    state = {"audio_tower.proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="shape"):
        organism.apply_deltas(state, {"audio_tower.proj.weight": torch.zeros(2)})
    with pytest.raises(KeyError):
        organism.apply_deltas(state, {"visual.merger.mlp.0.weight": torch.zeros(1)})


@needs_gguf
def test_deltas_that_record_another_vision_tower_assemble_with_it(backbone, tmp_path):
    """Deltas of a deeper vision tower (recorded in their metadata by the trainer) assemble a checkpoint with that
    tower, which both transformers' class and HookedAVModel load; asking for another tower is an error."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from hooked_av import HookedAVModel

    norm = torch.full((organism.VISION_DEFAULTS["hidden_size"],), 0.25)
    path = tmp_path / "deltas.safetensors"
    save_file({"vision_encoder.blocks.3.norm1.weight": norm}, str(path),
              metadata={organism.DELTAS_VISION_KEY: json.dumps(organism.vision_for_depth(4))})
    out = organism.assemble(tmp_path / "deep", deltas=path, n_layers=2, backbone=backbone)
    vision = json.loads((out / "config.json").read_text())["vision_config"]
    assert vision["depth"] == 4 and vision["fullatt_block_indexes"] == [1, 3]
    model = HookedAVModel.from_pretrained("organism", checkpoint=str(out))
    assert len(model.vision_encoder.blocks) == 4 and torch.equal(model.vision_encoder.blocks[3].norm1.weight, norm)
    hf = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out))
    assert torch.equal(hf.model.visual.blocks[3].norm1.weight, norm)
    with pytest.raises(ValueError, match="trained with vision tower .*'depth': 4.*but vision=.*'depth': 2"):
        organism.assemble(tmp_path / "other", deltas=path, n_layers=2, backbone=backbone,
                          vision=organism.vision_for_depth(2))
    assert not (tmp_path / "other").exists()


def test_lora_deltas_sinks_and_processor_are_stored(tmp_path):
    """LoRA factors in the deltas fold into the weights; calibrated sinks and processor settings are stored and
    win over the preset's placeholder on loading."""
    pytest.importorskip("gguf")
    from hooked_av import HookedAVModel, SinkConstants
    from model_zoo import organism

    if not organism.DEFAULT_GGUF.is_file():
        pytest.skip(f"{organism.DEFAULT_GGUF} missing: {organism.FETCH_HINT}")
    backbone = organism.load_smollm2()
    a, b = torch.randn(4, 576) * 0.1, torch.randn(576, 4) * 0.1
    deltas = {"blocks.1.attn.q_proj.lora_a": a, "blocks.1.attn.q_proj.lora_b": b,
              "blocks.1.attn.q_proj.scale": torch.tensor(2.0)}
    sinks = SinkConstants(dims=(507,), tau=21.0, provenance="test", calibrated=True)
    out = organism.assemble(tmp_path / "org", n_layers=2, deltas=deltas, backbone=backbone, sinks=sinks)
    model = HookedAVModel.from_pretrained("organism", checkpoint=str(out))
    base = backbone[0]["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(model.blocks[1].attn.q_proj.weight, base + 2.0 * b @ a, rtol=1e-5, atol=1e-5)
    assert model.cfg.sinks == sinks
    config = json.loads((out / "config.json").read_text())
    assert config["hooked_av"]["processor"] == organism.PROCESSOR
    # constants calibrated after assembly are recorded in place; the weights file is untouched
    weights = (out / "model.safetensors").stat().st_mtime_ns
    later = SinkConstants(dims=(507,), tau=19.5, provenance="calibrated after", calibrated=True)
    organism.store_sinks(out, later)
    assert HookedAVModel.from_pretrained("organism", checkpoint=str(out)).cfg.sinks == later
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((out / "config.json").read_text())["hooked_av"]["processor"] == organism.PROCESSOR
