"""AnyRecon's released LoRA (DiffSynth key names) for diffusers' ``WanTransformer3DModel``.

AnyRecon trains its LoRA with DiffSynth-Studio on DiffSynth's own Wan module tree
(``diffsynth/models/wan_video_dit.py``) and ships it as ``full_attention.ckpt``. Its keys name
DiffSynth modules, in PEFT's A/B form, e.g.

    blocks.7.self_attn.q.lora_A.default.weight      [r, 5120]
    blocks.7.self_attn.q.lora_B.default.weight      [5120, r]
    blocks.7.ffn.0.lora_A.default.weight            [r, 5120]
    blocks.7.ffn.0.lora_B.default.weight            [13824, r]

(sometimes with a ``diffusion_model.`` or ``dit.`` prefix, without ``.default``, or in the older
``lora_down``/``lora_up`` form). DiffSynth's loader merges each pair as ``W += alpha * B @ A`` with
``alpha = 1`` (``run_AnyRecon.py``), whatever rank the pair has; ``.alpha`` entries are ignored there.

This module renames those keys to diffusers' module names, keeps the PEFT form
(``<module>.lora_A.weight`` / ``<module>.lora_B.weight``), and either merges them into the weights
(``fuse_lora_``) or hands them to diffusers' ``load_lora_adapter`` (with ``lora_alpha`` equal to
the rank, PEFT's scale is then 1, as DiffSynth's). Keys that are not LoRA pairs (full weights,
anything else) are skipped with a warning that names them, as DiffSynth's loader ignores them.

Module names, DiffSynth -> diffusers (per block ``blocks.N.``):

| DiffSynth | diffusers |
| --- | --- |
| ``self_attn.{q,k,v,o}`` | ``attn1.{to_q,to_k,to_v,to_out.0}`` |
| ``self_attn.norm_{q,k}`` | ``attn1.norm_{q,k}`` |
| ``cross_attn.{q,k,v,o}`` | ``attn2.{to_q,to_k,to_v,to_out.0}`` |
| ``cross_attn.norm_{q,k}`` | ``attn2.norm_{q,k}`` |
| ``cross_attn.{k_img,v_img,norm_k_img}`` | ``attn2.{add_k_proj,add_v_proj,norm_added_k}`` |
| ``ffn.0``, ``ffn.2`` | ``ffn.net.0.proj``, ``ffn.net.2`` |
| ``norm3`` (cross-attention norm) | ``norm2`` |
| ``modulation`` | ``scale_shift_table`` |

and outside the blocks: ``patch_embedding`` (same), ``text_embedding.{0,2}`` ->
``condition_embedder.text_embedder.linear_{1,2}``, ``time_embedding.{0,2}`` ->
``condition_embedder.time_embedder.linear_{1,2}``, ``time_projection.1`` ->
``condition_embedder.time_proj``, ``img_emb.proj.{0,1,3,4}`` ->
``condition_embedder.image_embedder.{norm1,ff.net.0.proj,ff.net.2,norm2}``, ``head.head`` ->
``proj_out``, ``head.modulation`` -> ``scale_shift_table``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# The transformer the LoRA is for: WanTransformer3DModel's arguments of Wan-AI/Wan2.1-I2V-14B-720P-Diffusers
# (transformer/config.json); the benchmarks build it, the tests check the LoRA's keys against its shapes
WAN_I2V_14B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=1280,
    added_kv_proj_dim=5120,
    rope_max_seq_len=1024,
)

# Per-block module renames (DiffSynth suffix after ``blocks.N.`` -> diffusers suffix).
BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",
}
# Block parameters that are not modules.
BLOCK_PARAMS = {"modulation": "scale_shift_table"}
# Modules outside the blocks.
GLOBAL_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
GLOBAL_PARAMS = {
    "head.modulation": "scale_shift_table",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
# Prefixes DiffSynth and its trainers put in front of module names.
KNOWN_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "dit.", "pipe.dit.", "transformer.")
DIFFSYNTH_LORA_ALPHA = 1.0  # run_AnyRecon.py: model_manager.load_lora(path, lora_alpha=1.0)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LORA_RE = re.compile(r"^(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z_][\w]*)?\.weight$")


def _strip_prefix(key: str) -> str:
    for prefix in KNOWN_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def convert_module_name(name: str) -> str:
    """A DiffSynth Wan module or parameter path -> the diffusers ``WanTransformer3DModel`` path.

    ``blocks.3.self_attn.q`` -> ``blocks.3.attn1.to_q``; ``blocks.3.modulation`` ->
    ``blocks.3.scale_shift_table``. Unknown names raise ``ValueError``.
    """
    name = _strip_prefix(name)
    m = _BLOCK_RE.match(name)
    if m:
        idx, rest = m.groups()
        if rest in BLOCK_PARAMS:
            return f"blocks.{idx}.{BLOCK_PARAMS[rest]}"
        module, _, leaf = rest.rpartition(".")
        if rest in BLOCK_MODULES:  # a module path without parameter name
            return f"blocks.{idx}.{BLOCK_MODULES[rest]}"
        if module in BLOCK_MODULES:
            return f"blocks.{idx}.{BLOCK_MODULES[module]}.{leaf}"
        raise ValueError(f"AnyRecon LoRA: unknown DiffSynth block module {rest!r} in {name!r}")
    if name in GLOBAL_PARAMS:
        return GLOBAL_PARAMS[name]
    if name in GLOBAL_MODULES:
        return GLOBAL_MODULES[name]
    module, _, leaf = name.rpartition(".")
    if module in GLOBAL_MODULES:
        return f"{GLOBAL_MODULES[module]}.{leaf}"
    raise ValueError(f"AnyRecon LoRA: unknown DiffSynth module {name!r}")


def convert_anyrecon_lora(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the LoRA pairs of a DiffSynth-named AnyRecon checkpoint to diffusers names.

    Keys that are not LoRA pairs (full weights, ``.alpha`` scalars: DiffSynth merges with one global
    alpha, ``DIFFSYNTH_LORA_ALPHA``) are skipped, as DiffSynth's loader skips them; a warning names
    them (``.alpha`` entries excepted).

    Args:
        state_dict: DiffSynth keys -> tensors.

    Returns:
        ``<diffusers module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r] (PEFT form, the
        form ``WanTransformer3DModel.load_lora_adapter`` reads).
    """
    lora: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state_dict.items():
        bare = _strip_prefix(key)
        m = _LORA_RE.match(bare)
        if m:
            module, kind = m.groups()
            ab = "lora_A" if kind in ("lora_A", "lora_down") else "lora_B"
            lora[f"{convert_module_name(module)}.{ab}.weight"] = value
        elif not bare.endswith(".alpha"):
            skipped.append(key)
    if skipped:
        logger.warning(
            "AnyRecon LoRA: %d keys are not LoRA pairs and are skipped: %s", len(skipped), ", ".join(skipped)
        )
    for key in lora:
        partner = key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key.replace(".lora_B.", ".lora_A.")
        if partner not in lora:
            raise ValueError(f"AnyRecon LoRA: {key} has no partner {partner}")
    return lora


def load_lora_file(path: str | Path) -> dict[str, Tensor]:
    """Read a LoRA checkpoint (``.safetensors``, or a torch ``.ckpt``/``.pt``/``.pth`` of tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"AnyRecon LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)  # tensors only: no code runs
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"AnyRecon LoRA {path}: expected a dict of tensors; got {type(state).__name__}")
    return state


@torch.no_grad()
def fuse_lora_(
    transformer: torch.nn.Module,
    lora: dict[str, Tensor],
    scale: float = DIFFSYNTH_LORA_ALPHA,
) -> int:
    """Merge converted LoRA pairs into ``transformer`` in place: ``W += scale * B @ A`` (float32 maths).

    Conv weights (``patch_embedding``) take the product reshaped to the kernel. Returns the number of
    weights changed.
    """
    modules = dict(transformer.named_modules())
    changed = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        name = key[: key.index(".lora_A.")]
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        if name not in modules or not hasattr(modules[name], "weight"):
            raise ValueError(f"AnyRecon LoRA: transformer has no module {name!r}")
        weight = modules[name].weight
        a2 = a.reshape(a.shape[0], -1).float().to(weight.device)
        b2 = b.reshape(b.shape[0], -1).float().to(weight.device)
        if b2.shape[0] != weight.shape[0] or a2.shape[1] != weight[0].numel():  # [out, in], not only its size
            raise ValueError(
                f"AnyRecon LoRA: {name} weight is {tuple(weight.shape)}; LoRA gives ({b2.shape[0]}, {a2.shape[1]})"
            )
        delta = (b2 @ a2).reshape(weight.shape)
        weight.copy_((weight.float() + scale * delta).to(weight.dtype))
        changed += 1
    return changed


def lora_rank(lora: dict[str, Tensor]) -> int:
    """The rank of the converted LoRA (the largest lora_A row count)."""
    return max((int(v.shape[0]) for k, v in lora.items() if ".lora_A." in k), default=0)
