"""Sparse attention: AnyRecon's block pattern against a reference built from its token partition, the
window_ours mask, their exact kernels against dense masked attention; the processor inside a Wan transformer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from backend.generators.window_attention import (
    WanWindowAttnProcessor,
    WindowLayout,
    attention_lse,
    attention_lse_math,
    block_frame_mask,
    dense_window_mask,
    lse_path,
    mask_attention_split,
    paged_attention_available,
    paged_sequences,
    paged_window_table,
    set_window_attention,
    window_attention_split,
    window_density,
)


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


def anyrecon_block_token_mask(f: int, h: int, w: int) -> torch.Tensor:
    """Reference: AnyRecon's block attention between tokens, built as its SelfAttention does it.

    Tokens of an f x h x w grid are cut into windows of 8 frames x 4 x 4 tokens, each one 128-token
    block of the sparse kernel; block (bt, bh, bw) attends to block (ct, ch, cw) when the temporal
    mask of build_local_block_mask_3d(f/8, h/4, w/4, win 18, context_frames=6, temp_window_frames=5,
    block_time_stride=8) keeps (bt, ct) and the spatial mask (all ones there) keeps the rest. Returned
    over the frame-major token order. bool [f*h*w, f*h*w]
    """
    nb = f // 8
    ctx_last = (6 + 8 - 1) // 8 - 1  # the equations of build_local_block_mask_3d, in block units
    radius = (5 + 8 - 1) // 8
    keep_t = [[ct <= ctx_last or abs(bt - ct) <= radius for ct in range(nb)] for bt in range(nb)]
    ti, yi, xi = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    block_t = (ti // 8).flatten()  # the window each frame-major token falls in
    block_id = ((ti // 8) * (h // 4) * (w // 4) + (yi // 4) * (w // 4) + xi // 4).flatten()
    keep_block = torch.zeros(block_id.max() + 1, block_id.max() + 1, dtype=torch.bool)
    bt_of = torch.zeros(block_id.max() + 1, dtype=torch.long)
    bt_of[block_id] = block_t
    for a in range(keep_block.shape[0]):
        for c in range(keep_block.shape[1]):
            keep_block[a, c] = keep_t[int(bt_of[a])][int(bt_of[c])]
    return keep_block[block_id][:, block_id]


@pytest.mark.parametrize("frames", [8, 16, 24, 40])
def test_block_pattern_equals_anyrecons_block_mask(frames: int) -> None:
    h, w = 4, 8
    ref = anyrecon_block_token_mask(frames, h, w)
    lay = WindowLayout(frames, h * w, num_memory=0, pattern="block")
    assert torch.equal(dense_window_mask(lay), ref)
    fm = block_frame_mask(frames)
    assert fm[:8, :16].all() and not fm[:8, 16:].any()  # block 0 (context) sees blocks 0 and 1
    if frames >= 32:
        assert fm[24, :8].all() and fm[24, 16:32].all() and not fm[24, 8:16].any()  # context + blocks 2..4
    assert window_density(lay) == pytest.approx(float(ref.float().mean()))


@pytest.mark.parametrize("frames,tpf,batch", [(24, 3, 1), (33, 2, 2), (6, 4, 1)])
def test_block_split_and_paged_equal_dense_mask_attention(frames: int, tpf: int, batch: int) -> None:
    """The block pattern on both kernels; 33 frames: a last partial block (ours), 6: one block (= full)."""
    lay = WindowLayout(frames, tpf, 0, pattern="block")
    q, k, v = (torch.cat([t] * batch) for t in _qkv(lay.num_tokens, seed=6))
    q = q + 0.1 * torch.arange(batch).view(-1, 1, 1, 1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_window_mask(lay))
    out = mask_attention_split(*(t.transpose(1, 2) for t in (q, k, v)), lay).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    table, used = paged_window_table(lay, page_tokens=1)
    torch.testing.assert_close(_paged_reference(q, k, v, table, used, tpf, 1), ref, atol=1e-5, rtol=1e-5)
    if frames > 16:
        assert (ref - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-3


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
            WanWindowAttnProcessor("block", sparse_kernel="paged")
        with pytest.raises(ValueError, match="flash-attn-4"):
            WanWindowAttnProcessor("full", full_kernel="fa4")
    WanWindowAttnProcessor("full", sparse_kernel="paged")  # full mode never calls it


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
    """Both paths: the kernels (CPU here; cuDNN or flash in half precision on CUDA) and the matrix products
    CUDA float32 takes (cuDNN gave NaN there without an error)."""
    q, k, v = _qkv(9, seed=4)
    scores = q @ k[:, :, :7].transpose(-1, -2) / q.shape[-1] ** 0.5
    for path in (attention_lse, attention_lse_math):
        out, lse = path(q, k[:, :, :7], v[:, :, :7])
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
        torch.testing.assert_close(out, torch.softmax(scores, -1) @ v[:, :, :7])
    on_cuda = [SimpleNamespace(is_cuda=True, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    assert [lse_path(x) for x in on_cuda] == ["math", "cuda", "cuda"] and lse_path(q) == "cpu"


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
        proc = set_window_attention(tr, "window_ours", window_frames=4)  # no memory, window covers all 5 frames
        proc.set_layout(5, 6, 0, "cpu")
        wide = tr(x, **kw)[0]
        proc = set_window_attention(tr, "window_ours", window_frames=1, sparse_kernel="split")
        proc.set_layout(5, 6, 1, "cpu")
        narrow = tr(x, **kw)[0]
        assert (narrow - full).abs().max() > 1e-4
        proc = set_window_attention(tr, "block")
        proc.set_layout(5, 6, 1, "cpu")
        block = tr(x, **kw)[0]  # 5 frames: one block, every frame sees every frame
        for block_ in tr.blocks:
            block_.attn1.set_processor(WanAttnProcessor())
    torch.testing.assert_close(full, stock, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(wide, stock, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(block, stock, atol=1e-5, rtol=1e-4)
    assert all(b.attn2.processor.__class__.__name__ == "WanAttnProcessor" for b in tr.blocks)  # cross-attn untouched


def test_processor_rejects_bad_use() -> None:
    with pytest.raises(ValueError, match="mode"):
        WanWindowAttnProcessor("sparse")
    with pytest.raises(ValueError, match="sparse_kernel"):
        WanWindowAttnProcessor("block", sparse_kernel="flex")
    with pytest.raises(ValueError, match="full_kernel"):
        WanWindowAttnProcessor("full", full_kernel="cudnn")
    with pytest.raises(ValueError, match="pattern"):
        WindowLayout(8, 4, 0, pattern="window")
    with pytest.raises(ValueError, match="num_memory"):
        WindowLayout(num_frames=3, tokens_per_frame=4, num_memory=4)
    tr, x, kw = _tiny_transformer_inputs()
    proc = set_window_attention(tr, "window_ours", window_frames=1)
    proc.set_layout(4, 6, 1, "cpu")  # 24 tokens, the input has 30
    with torch.no_grad(), pytest.raises(ValueError, match="set_layout"):
        tr(x, **kw)
