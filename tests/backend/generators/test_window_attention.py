"""Context-window attention: block mask == dense boolean mask; the processor inside a Wan transformer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.generators.window_attention import (
    WanWindowAttnProcessor,
    WindowLayout,
    attention_lse,
    build_block_mask,
    dense_window_mask,
    paged_attention_available,
    paged_sequences,
    paged_window_table,
    set_window_attention,
    window_attention_split,
    window_density,
)

LAYOUTS = [  # (frames, tokens per frame, memory frames, window, block size)
    (7, 10, 2, 1, 16),  # frames straddle blocks
    (6, 32, 0, 2, 16),  # no memory
    (9, 16, 3, 2, 16),  # frames are whole blocks (as at 512x896: 1792 = 14 x 128)
    (5, 13, 5, 1, 8),  # memory only
    (12, 24, 3, 8, 32),  # window wider than the sequence
]


def _qkv(n_tokens: int, heads: int = 2, dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n_tokens, dim, generator=g) for _ in range(3)]


def test_dense_mask_semantics() -> None:
    lay = WindowLayout(num_frames=8, tokens_per_frame=1, num_memory=2, window_frames=1)
    m = dense_window_mask(lay)
    assert m[:2, :2].all() and not m[:2, 2:].any()  # memory sees memory only
    assert m[2:, :2].all()  # every sequence frame sees all memory
    assert m[5, 4] and m[5, 6] and m[5, 5] and not m[5, 3] and not m[5, 7]  # +-1 neighbours
    assert m[2, 3] and not m[2, 4]
    assert window_density(lay) == pytest.approx(float(m.float().mean()))


@pytest.mark.parametrize("frames,tpf,mem,win,bs", LAYOUTS)
def test_block_mask_matches_create_block_mask(frames: int, tpf: int, mem: int, win: int, bs: int) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    from backend.generators.window_attention import window_mask_mod

    lay = WindowLayout(frames, tpf, mem, win)
    ours = build_block_mask(lay, "cpu", bs)
    ref = create_block_mask(
        window_mask_mod(lay), None, None, lay.num_tokens, lay.num_tokens, device="cpu", BLOCK_SIZE=bs
    )
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)


@pytest.mark.parametrize("frames,tpf,mem,win,bs", LAYOUTS)
def test_flex_block_mask_equals_dense_mask_attention(frames: int, tpf: int, mem: int, win: int, bs: int) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    lay = WindowLayout(frames, tpf, mem, win)
    q, k, v = _qkv(lay.num_tokens)
    out = flex_attention(q, k, v, block_mask=build_block_mask(lay, "cpu", bs))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_window_mask(lay))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    full = F.scaled_dot_product_attention(q, k, v)
    if not dense_window_mask(lay).all():
        assert (out - full).abs().max() > 1e-3  # the mask changes the result


@pytest.mark.parametrize(
    "frames,tpf,mem,win,batch",
    [
        (7, 10, 2, 1, 1),
        (6, 4, 0, 2, 2),
        (30, 2, 3, 3, 1),
        (5, 3, 5, 1, 1),
        (4, 3, 1, 0, 2),
        (12, 5, 2, 2, 2),
        (6, 3, 1, 8, 1),
    ],
)  # last: window wider than the sequence
def test_split_equals_dense_mask_attention(frames: int, tpf: int, mem: int, win: int, batch: int) -> None:
    lay = WindowLayout(frames, tpf, mem, win)
    q, k, v = (torch.cat([t] * batch) for t in _qkv(lay.num_tokens, seed=2))
    q = q + 0.1 * torch.arange(batch).view(-1, 1, 1, 1)  # batch items differ
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_window_mask(lay))
    out = window_attention_split(*(t.transpose(1, 2) for t in (q, k, v)), lay).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(window_attention_split, backend="eager", fullgraph=True)  # the op traces as one node
    torch.testing.assert_close(
        compiled(*(t.transpose(1, 2) for t in (q, k, v)), lay).transpose(1, 2), ref, atol=1e-5, rtol=1e-5
    )


def _paged_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, used: torch.Tensor, tpf: int, page: int
) -> torch.Tensor:
    """What the paged kernel computes on ``paged_sequences``: sequence r's queries attend to the first
    used[r] keys of its pages. q, k, v head-major [B, heads, L, D]."""
    frames, kp, vp, table, used = paged_sequences(q, k, v, table, used, tpf, page_tokens=page)
    out = []
    for r in range(frames.shape[0]):
        keys, vals = (p[table[r].long()].flatten(0, 1)[: int(used[r])] for p in (kp, vp))
        out.append(
            F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (frames[r], keys, vals))).transpose(0, 1)
        )
    return torch.stack(out).reshape(q.shape)


@pytest.mark.parametrize(
    "frames,tpf,mem,win,batch,page",
    [(7, 4, 2, 1, 1, 2), (6, 4, 0, 2, 2, 4), (12, 6, 3, 2, 2, 3), (5, 2, 5, 1, 1, 1), (6, 4, 1, 8, 1, 2)],
)
def test_paged_table_equals_dense_mask_attention(
    frames: int, tpf: int, mem: int, win: int, batch: int, page: int
) -> None:
    lay = WindowLayout(frames, tpf, mem, win)
    q, k, v = (torch.cat([t] * batch) for t in _qkv(lay.num_tokens, seed=3))  # [B, heads, L, D]
    q = q + 0.1 * torch.arange(batch).view(-1, 1, 1, 1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_window_mask(lay))
    table, used = paged_window_table(lay, page_tokens=page)
    assert table.dtype == used.dtype == torch.int32 and table.shape[0] == frames
    assert torch.equal(used, dense_window_mask(lay)[::tpf].sum(1).to(torch.int32))  # keys per query frame
    out = _paged_reference(q, k, v, table, used, tpf, page)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_needs_whole_pages_and_flash_attention_4() -> None:
    with pytest.raises(ValueError, match="tokens_per_frame"):
        paged_window_table(WindowLayout(4, 6, 1, 1), page_tokens=4)
    if not paged_attention_available():
        with pytest.raises(ValueError, match="flash-attn-4"):
            WanWindowAttnProcessor("window", window_backend="paged")
    WanWindowAttnProcessor("full", window_backend="paged")  # full mode never calls it


def test_apply_rotary_rotates_each_pair() -> None:
    from backend.generators.window_attention import apply_rotary

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 3, 8, generator=g)
    angle = torch.rand(1, 7, 1, 4, generator=g) * 6.3
    cos, sin = (f(angle).repeat_interleave(2, dim=-1) for f in (torch.cos, torch.sin))  # Wan's table layout
    out = apply_rotary(x, cos, sin)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s_ = torch.cos(angle), torch.sin(angle)
    torch.testing.assert_close(out[..., 0::2], x1 * c - x2 * s_)
    torch.testing.assert_close(out[..., 1::2], x1 * s_ + x2 * c)
    assert apply_rotary(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_attention_lse_matches_logsumexp() -> None:
    q, k, v = _qkv(9, seed=4)
    out, lse = attention_lse(q, k[:, :, :7], v[:, :, :7])
    scores = q @ k[:, :, :7].transpose(-1, -2) / q.shape[-1] ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v[:, :, :7])


def _tiny_transformer_inputs(frames: int = 5):
    from backend.generators.tiny import tiny_anyrecon_components

    tr = tiny_anyrecon_components(0).transformer
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 36, frames, 4, 6, generator=g)  # 6 tokens per frame after 2x2 patches
    kw = dict(
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
        encoder_hidden_states_image=torch.randn(1, 17, 4, generator=g),
        return_dict=False,
    )
    return tr, x, kw


def test_processor_in_transformer_matches_stock_and_masks() -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    tr, x, kw = _tiny_transformer_inputs()
    with torch.no_grad():
        stock = tr(x, **kw)[0]
        set_window_attention(tr, "full")
        full = tr(x, **kw)[0]
        proc = set_window_attention(tr, "window", window_frames=4)  # no memory, window covers all 5 frames
        proc.set_layout(5, 6, 0, "cpu")
        wide = tr(x, **kw)[0]
        for backend in ("flex", "split"):
            proc = set_window_attention(tr, "window", window_frames=1, window_backend=backend)
            proc.set_layout(5, 6, 1, "cpu")
            narrow = tr(x, **kw)[0]
            assert (narrow - full).abs().max() > 1e-4, backend
            if backend == "flex":
                narrow_flex = narrow
        for block in tr.blocks:
            block.attn1.set_processor(WanAttnProcessor())
    torch.testing.assert_close(full, stock, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(wide, stock, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(narrow, narrow_flex, atol=1e-5, rtol=1e-4)
    assert all(b.attn2.processor.__class__.__name__ == "WanAttnProcessor" for b in tr.blocks)  # cross-attn untouched


def test_processor_rejects_bad_use() -> None:
    with pytest.raises(ValueError, match="mode"):
        WanWindowAttnProcessor("sparse")
    with pytest.raises(ValueError, match="window_backend"):
        WanWindowAttnProcessor("window", window_backend="xformers")
    with pytest.raises(ValueError, match="num_memory"):
        WindowLayout(num_frames=3, tokens_per_frame=4, num_memory=4)
    tr, x, kw = _tiny_transformer_inputs()
    proc = set_window_attention(tr, "window", window_frames=1)
    proc.set_layout(4, 6, 1, "cpu")  # 24 tokens, the input has 30
    with torch.no_grad(), pytest.raises(ValueError, match="set_layout"):
        tr(x, **kw)
