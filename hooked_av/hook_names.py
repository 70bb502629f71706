"""The uniform hook-naming scheme shared by every model of the zoo.

Names read as attribute paths, TransformerLens style (`blocks.3.attn.hook_pattern`), so `ActivationCache`,
`transformer_lens.patching` and TL habits carry over. Recipes build names with the functions below instead of
scattering string literals; `check_hook_name` turns a typo into an error that lists the closest valid names.

Decoder (per layer `l`):
    blocks.{l}.hook_resid_pre      [batch, pos, d_model]   residual stream entering block l
    blocks.{l}.hook_sink           [batch, pos, n_sink]    |rms-normalised resid_pre| at the model's sink dims
    blocks.{l}.ln1.hook_scale      [batch, pos, 1]         1 / rms of the block input (float32)
    blocks.{l}.ln1.hook_normalized [batch, pos, d_model]   normalised input, before the learned gain
    blocks.{l}.attn.hook_q/k/v     [batch, pos, head, d_head]   (k, v: key/value heads under GQA)
    blocks.{l}.attn.hook_rot_q/k   [batch, pos, head, d_head]   after (multimodal) rotary embedding
    blocks.{l}.attn.hook_attn_scores [batch, head, q_pos, k_pos] pre-softmax, scaled, masked
    blocks.{l}.attn.hook_pattern   [batch, head, q_pos, k_pos]
    blocks.{l}.attn.hook_z         [batch, pos, head, d_head]
    blocks.{l}.hook_attn_out, hook_resid_mid, ln2.*, mlp.hook_pre/pre_linear/post, hook_mlp_out, hook_resid_post
Sites that only some models have (`OPTIONAL_BLOCK_SITES`):
    blocks.{l}.attn.q_norm.hook_scale/hook_normalized, attn.k_norm.*   per-head q/k RMSNorm (Qwen3), between
                                   hook_q/hook_k (raw projections) and hook_rot_q/hook_rot_k
    blocks.{l}.mlp.hook_router_logits  [batch, pos, n_experts]       MoE blocks, instead of mlp.hook_pre/pre_linear/post
    blocks.{l}.mlp.hook_expert_indices [batch, pos, top_k]           chosen experts (long)
    blocks.{l}.mlp.hook_expert_weights [batch, pos, top_k]           their routing weights
    blocks.{l}.mlp.hook_expert_out     [batch, pos, top_k, d_model]  each chosen expert's output, before weighting
    blocks.{l}.hook_deepstack      [batch, pos, d_model]   DeepStack write added after hook_resid_post (Qwen3-Omni,
                                   early layers): resid_pre[l + 1] = resid_post[l] + deepstack[l]
Top level: hook_embed (merged embeddings entering block 0), ln_final.hook_scale/hook_normalized.
Towers: {audio,video,image}_tower.hook_in, .blocks.{l}.hook_resid_post, .hook_out.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: Sites of a decoder block, relative to `blocks.{l}.`.
BLOCK_SITES: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_sink",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)

#: Dense gated-MLP sites, which a mixture-of-experts block replaces by `MOE_SITES`.
DENSE_MLP_SITES: tuple[str, ...] = ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")
#: Per-head RMSNorm on queries and keys (models with `cfg.qk_norm`).
QK_NORM_SITES: tuple[str, ...] = (
    "attn.q_norm.hook_scale",
    "attn.q_norm.hook_normalized",
    "attn.k_norm.hook_scale",
    "attn.k_norm.hook_normalized",
)
#: Router and experts of a mixture-of-experts MLP (the blocks in `cfg.moe_layers`).
MOE_SITES: tuple[str, ...] = (
    "mlp.hook_router_logits",
    "mlp.hook_expert_indices",
    "mlp.hook_expert_weights",
    "mlp.hook_expert_out",
)
#: The DeepStack residual write (the blocks in `cfg.deepstack_layers`).
DEEPSTACK_SITES: tuple[str, ...] = ("hook_deepstack",)
#: Sites that exist only on some models or layers; `block` accepts them, the model's hook_dict says where.
OPTIONAL_BLOCK_SITES: tuple[str, ...] = QK_NORM_SITES + MOE_SITES + DEEPSTACK_SITES

#: Short names accepted by `act_name` / `ActivationCache[...]`, mapped to their site.
SHORT_NAMES: dict[str, str] = {site.split(".")[-1].removeprefix("hook_"): site for site in BLOCK_SITES}
SHORT_NAMES.update({"scale": "ln1.hook_scale", "normalized": "ln1.hook_normalized"})
SHORT_NAMES.update({site.split(".")[-1].removeprefix("hook_"): site for site in MOE_SITES + DEEPSTACK_SITES})

TOWERS: tuple[str, ...] = ("audio_tower", "video_tower", "image_tower")
#: Sites whose tensors arrive in query-row blocks when eager attention runs blockwise.
ATTENTION_MAP_SITES: tuple[str, ...] = ("attn.hook_attn_scores", "attn.hook_pattern")


class UnknownHookNameError(KeyError):
    """A hook name that the model does not have; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly instead
        return str(self.args[0])


def embed() -> str:
    return "hook_embed"


def block(layer: int, site: str) -> str:
    """`blocks.{layer}.{site}`; `site` is a full site ('attn.hook_pattern') or a short name ('pattern')."""
    site = SHORT_NAMES.get(site, site)
    if site not in BLOCK_SITES + OPTIONAL_BLOCK_SITES:
        raise UnknownHookNameError(_unknown_message(site, BLOCK_SITES + OPTIONAL_BLOCK_SITES, what="block site"))
    return f"blocks.{layer}.{site}"


def resid_pre(layer: int) -> str:
    return block(layer, "hook_resid_pre")


def resid_mid(layer: int) -> str:
    return block(layer, "hook_resid_mid")


def resid_post(layer: int) -> str:
    return block(layer, "hook_resid_post")


def sink(layer: int) -> str:
    return block(layer, "hook_sink")


def ln1_normalized(layer: int) -> str:
    return block(layer, "ln1.hook_normalized")


def attn_scores(layer: int) -> str:
    return block(layer, "attn.hook_attn_scores")


def pattern(layer: int) -> str:
    return block(layer, "attn.hook_pattern")


def attn_out(layer: int) -> str:
    return block(layer, "hook_attn_out")


def mlp_out(layer: int) -> str:
    return block(layer, "hook_mlp_out")


def router_logits(layer: int) -> str:
    return block(layer, "mlp.hook_router_logits")


def expert_weights(layer: int) -> str:
    return block(layer, "mlp.hook_expert_weights")


def expert_out(layer: int) -> str:
    return block(layer, "mlp.hook_expert_out")


def deepstack(layer: int) -> str:
    return block(layer, "hook_deepstack")


def ln_final(site: str = "hook_normalized") -> str:
    return f"ln_final.{site}"


def tower(name: str, site: str, layer: int | None = None) -> str:
    """`{name}.hook_in`, `{name}.hook_out` or `{name}.blocks.{layer}.hook_resid_post`."""
    if name not in TOWERS:
        raise UnknownHookNameError(_unknown_message(name, TOWERS, what="tower"))
    if layer is None:
        return f"{name}.{site}"
    return f"{name}.blocks.{layer}.{site}"


def act_name(name: str, layer: int | None = None) -> str:
    """TransformerLens-style shorthand: `act_name('pattern', 0) == 'blocks.0.attn.hook_pattern'`."""
    if layer is None:
        return {"embed": "hook_embed", "ln_final": "ln_final.hook_normalized"}.get(name, name)
    return block(layer, name)


def block_sites(layer: int, qk_norm: bool = False, moe_layers: Iterable[int] = (),
                deepstack_layers: Iterable[int] = ()) -> list[str]:
    """The sites of decoder block `layer` in a model with the given options (see `AVModelConfig`)."""
    sites = list(BLOCK_SITES)
    if qk_norm:
        at = sites.index("attn.hook_rot_q")
        sites[at:at] = list(QK_NORM_SITES)
    if layer in set(moe_layers):
        at = sites.index(DENSE_MLP_SITES[0])
        sites = [s for s in sites if s not in DENSE_MLP_SITES]
        sites[at:at] = list(MOE_SITES)
    if layer in set(deepstack_layers):
        sites += list(DEEPSTACK_SITES)
    return sites


def all_names(n_layers: int, tower_layers: dict[str, int] | None = None, *, qk_norm: bool = False,
              moe_layers: Iterable[int] = (), deepstack_layers: Iterable[int] = ()) -> list[str]:
    """Every hook name of a model with `n_layers` decoder blocks and the given towers (name -> n_layers).

    `qk_norm`, `moe_layers` and `deepstack_layers` are the config's options of the same names (Qwen3-Omni)."""
    names = [embed()]
    moe_layers, deepstack_layers = tuple(moe_layers), tuple(deepstack_layers)
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{site}" for site in block_sites(layer, qk_norm, moe_layers, deepstack_layers)]
    names += [ln_final("hook_scale"), ln_final("hook_normalized")]
    for tower_name, n in (tower_layers or {}).items():
        names += [tower(tower_name, "hook_in")]
        names += [tower(tower_name, "hook_resid_post", layer) for layer in range(n)]
        names += [tower(tower_name, "hook_out")]
    return names


def layer_of(name: str) -> int | None:
    """The decoder layer of a `blocks.{l}...` name, else None (tower names have no decoder layer)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def check_hook_name(name: str, valid: Iterable[str]) -> str:
    """Return `name` if it is valid, else raise UnknownHookNameError listing the closest valid names."""
    valid = list(valid)
    if name in valid:
        return name
    raise UnknownHookNameError(_unknown_message(name, valid, what="hook name"))


def _unknown_message(name: str, valid: Iterable[str], what: str) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return f"Unknown {what} {name!r}.{hint} ({len(valid)} valid names; see hooked_av.hook_names.)"
