"""AnyRecon's DiffSynth-named LoRA -> diffusers/PEFT names, on synthetic checkpoints of the real layout."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from backend.generators.anyrecon_lora import (
    WAN_I2V_14B,
    convert_anyrecon_lora,
    convert_module_name,
    fuse_lora_,
    load_lora_file,
    lora_rank,
)

RANK = 2
# DiffSynth WanModel (diffsynth/models/wan_video_dit.py) Linear modules per block: (name, out, in) in units of
# dim / ffn_dim; the I2V model's cross-attention has k_img / v_img.
BLOCK_LINEARS = [
    ("self_attn.q", "d", "d"),
    ("self_attn.k", "d", "d"),
    ("self_attn.v", "d", "d"),
    ("self_attn.o", "d", "d"),
    ("cross_attn.q", "d", "d"),
    ("cross_attn.k", "d", "d"),
    ("cross_attn.v", "d", "d"),
    ("cross_attn.o", "d", "d"),
    ("cross_attn.k_img", "d", "d"),
    ("cross_attn.v_img", "d", "d"),
    ("ffn.0", "f", "d"),
    ("ffn.2", "d", "f"),
]


def diffsynth_lora(
    num_layers: int,
    dim: int,
    ffn_dim: int,
    *,
    prefix: str = "",
    device: str = "cpu",
    seed: int = 0,
    adapter: str = ".default",
) -> dict[str, torch.Tensor]:
    """A synthetic LoRA with DiffSynth's key names and shapes (A: [r, in], B: [out, r])."""
    g = torch.Generator().manual_seed(seed)
    size = {"d": dim, "f": ffn_dim}
    sd = {}
    for i in range(num_layers):
        for name, out_u, in_u in BLOCK_LINEARS:
            key = f"{prefix}blocks.{i}.{name}"
            if device == "meta":
                a = torch.empty(RANK, size[in_u], device="meta")
                b = torch.empty(size[out_u], RANK, device="meta")
            else:
                a = torch.randn(RANK, size[in_u], generator=g) * 0.1
                b = torch.randn(size[out_u], RANK, generator=g) * 0.1
            sd[f"{key}.lora_A{adapter}.weight"] = a
            sd[f"{key}.lora_B{adapter}.weight"] = b
    return sd


def test_module_names() -> None:
    assert convert_module_name("blocks.3.self_attn.q") == "blocks.3.attn1.to_q"
    assert convert_module_name("diffusion_model.blocks.39.self_attn.o.weight") == "blocks.39.attn1.to_out.0.weight"
    assert convert_module_name("blocks.0.cross_attn.k_img") == "blocks.0.attn2.add_k_proj"
    assert convert_module_name("blocks.0.cross_attn.norm_k_img.weight") == "blocks.0.attn2.norm_added_k.weight"
    assert convert_module_name("blocks.1.ffn.0.bias") == "blocks.1.ffn.net.0.proj.bias"
    assert convert_module_name("blocks.1.norm3.weight") == "blocks.1.norm2.weight"
    assert convert_module_name("blocks.1.modulation") == "blocks.1.scale_shift_table"
    assert convert_module_name("head.head.weight") == "proj_out.weight"
    assert convert_module_name("head.modulation") == "scale_shift_table"
    assert convert_module_name("img_emb.proj.1.weight") == "condition_embedder.image_embedder.ff.net.0.proj.weight"
    assert convert_module_name("time_projection.1.weight") == "condition_embedder.time_proj.weight"
    with pytest.raises(ValueError, match="unknown DiffSynth block module"):
        convert_module_name("blocks.0.self_attn.qkv")
    with pytest.raises(ValueError, match="unknown DiffSynth module"):
        convert_module_name("vace_blocks.0.proj")


def test_real_14b_layout_names_and_shapes() -> None:
    """Every key of a LoRA shaped like the real 14B I2V model lands on a module of that shape."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        tr = WanTransformer3DModel(**WAN_I2V_14B)
    sd = diffsynth_lora(40, 5120, 13824, prefix="diffusion_model.", device="meta")
    lora = convert_anyrecon_lora(sd)
    assert len(lora) == len(sd) == 40 * len(BLOCK_LINEARS) * 2
    modules = dict(tr.named_modules())
    for key, t in lora.items():
        name, ab = key.rsplit(".lora_", 1)
        lin = modules[name]
        if ab.startswith("A"):
            assert t.shape == (RANK, lin.in_features), key
        else:
            assert t.shape == (lin.out_features, RANK), key
    assert lora_rank(lora) == RANK


def test_fused_equals_peft_adapter_and_diffsynth_merge() -> None:
    """Merging (DiffSynth's W += B A) == diffusers' PEFT adapter from the converted keys."""
    from backend.generators.tiny import tiny_anyrecon_components

    base = tiny_anyrecon_components(0).transformer
    cfg = base.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    sd = diffsynth_lora(cfg.num_layers, dim, cfg.ffn_dim, adapter="")
    lora = convert_anyrecon_lora(sd)
    fused = copy.deepcopy(base)
    assert fuse_lora_(fused, lora) == len(lora) // 2
    w0 = base.blocks[1].ffn.net[0].proj.weight
    expect = w0 + sd["blocks.1.ffn.0.lora_B.weight"] @ sd["blocks.1.ffn.0.lora_A.weight"]
    torch.testing.assert_close(fused.blocks[1].ffn.net[0].proj.weight, expect)

    adapted = copy.deepcopy(base)
    adapted.load_lora_adapter(lora, prefix=None, adapter_name="anyrecon")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 36, 3, 4, 4, generator=g)
    kw = dict(
        timestep=torch.tensor([750.0]),
        encoder_hidden_states=torch.randn(1, 512, cfg.text_dim, generator=g),
        encoder_hidden_states_image=torch.randn(1, 17, cfg.image_dim, generator=g),
        return_dict=False,
    )
    with torch.no_grad():
        y_base, y_fused, y_adapted = base(x, **kw)[0], fused(x, **kw)[0], adapted(x, **kw)[0]
    torch.testing.assert_close(y_fused, y_adapted, atol=1e-5, rtol=1e-4)
    assert (y_fused - y_base).abs().max() > 1e-4


def test_file_formats_prefixes_and_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file

    sd = diffsynth_lora(1, 8, 16, prefix="dit.")
    sd["dit.blocks.0.self_attn.q.alpha"] = torch.tensor(2.0)  # ignored, as DiffSynth's loader does
    torch.save(sd, tmp_path / "full_attention.ckpt")
    save_file(sd, str(tmp_path / "lora.safetensors"))
    for name in ("full_attention.ckpt", "lora.safetensors"):
        lora = convert_anyrecon_lora(load_lora_file(tmp_path / name))
        assert "blocks.0.attn1.to_q.lora_A.weight" in lora and len(lora) == 2 * len(BLOCK_LINEARS)
    old = {
        "blocks.0.ffn.2.lora_down.weight": torch.zeros(RANK, 16),
        "blocks.0.ffn.2.lora_up.weight": torch.zeros(8, RANK),
        "blocks.0.norm3.weight": torch.ones(8),
    }
    old["diffusion_model.some_new_head.bias"] = torch.zeros(3)  # not a DiffSynth name at all
    with caplog.at_level("WARNING", logger="backend.generators.anyrecon_lora"):
        lora = convert_anyrecon_lora(old)
    # AnyRecon's loader merges LoRA pairs only: a full weight (or anything else) is skipped, by name
    assert set(lora) == {"blocks.0.ffn.net.2.lora_A.weight", "blocks.0.ffn.net.2.lora_B.weight"}
    assert "2 keys are not LoRA pairs" in caplog.text
    assert "blocks.0.norm3.weight" in caplog.text and "diffusion_model.some_new_head.bias" in caplog.text
    from backend.generators.tiny import tiny_anyrecon_components

    tr = tiny_anyrecon_components(0).transformer
    norm_before = tr.blocks[0].norm2.weight.clone()
    fuse_lora_(tr, convert_anyrecon_lora({**diffsynth_lora(2, 24, 32), "blocks.0.norm3.weight": torch.zeros(24)}))
    torch.testing.assert_close(tr.blocks[0].norm2.weight, norm_before)  # the full weight did not overwrite
    # a pair of the transposed shape holds as many numbers as the weight: refused, not reshaped onto it
    w = tr.blocks[0].ffn.net[0].proj.weight
    transposed = {
        "blocks.0.ffn.net.0.proj.lora_A.weight": torch.zeros(RANK, w.shape[0]),
        "blocks.0.ffn.net.0.proj.lora_B.weight": torch.zeros(w.shape[1], RANK),
    }
    with pytest.raises(ValueError, match=r"blocks.0.ffn.net.0.proj weight is"):
        fuse_lora_(tr, transposed)
    with pytest.raises(ValueError, match="no partner"):
        convert_anyrecon_lora({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(RANK, 8)})
    with pytest.raises(ValueError, match="not found"):
        load_lora_file(tmp_path / "missing.ckpt")
