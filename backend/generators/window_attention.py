"""Context-window self-attention for Wan transformers (DESIGN.md section 1 step 5).

AnyRecon's generator sees one condition video of frames [memory ; sequence], where the memory is the
retrieved captures and the sequence is the carried-over frames followed by the targets. Its sparse model
lets every sequence frame attend to all memory frames and to the sequence frames within +-``window``
frames of it, and lets memory frames attend to the memory only. Tokens are laid out frame-major, as
Wan's patchifier leaves them: token ``i`` belongs to frame ``i // tokens_per_frame``.

This module implements that as a diffusers attention processor for the self-attention (``attn1``)
of every ``WanTransformerBlock``:

- ``full``: every token attends to every token (scaled-dot-product attention, cuDNN or flash kernels
  on CUDA), with the rotary embedding applied in float32 rather than float64;
- ``window``: the same mask, exactly, by one of three kernels (``window_backend``):
  ``flex``, a torch FlexAttention ``BlockMask`` (frames of 1792 tokens, 512x896 at patch 2x2, are
  whole multiples of the 128-token blocks, so no block needs per-element masking; compile it);
  ``split``, the sequence's attention cut into its memory part and its window part, each dense
  cuDNN calls (the windows of all interior frames in one batched call over overlapping views of the
  keys, no copies), merged by their log-sum-exp (``window_attention_split``);
  ``paged`` (fastest on an H200: docs/benchmarks.md), every (head, frame) pair one query sequence
  whose keys are a page table over the frames it attends, all in one FlashAttention-4 call
  (``window_attention_paged``: the keys are only viewed as pages, nothing is masked or merged; q, k, v
  head-major, so that the tiles in flight share their pages in L2). ``auto`` picks ``paged`` where
  FlashAttention-4 runs, else ``split``.

``dense_window_mask`` gives the same mask as a dense boolean matrix for reference and tests.

Cross-attention (``attn2``) keeps diffusers' own processor.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_MODES = ("full", "window")
FULL_BACKENDS = ("auto", "cudnn", "flash", "flex")  # kernels for full attention: torch's choice, or forced
WINDOW_BACKENDS = ("auto", "flex", "split", "paged")  # window kernels: FlexAttention block mask; memory and window
# parts as dense calls merged by their log-sum-exp; one paged FlashAttention-4 call (frames as page tables);
# auto: paged where it runs (FlashAttention-4 installed, sm90/sm100 GPU, frames of whole pages), else split
DEFAULT_WINDOW_FRAMES = 8  # AnyRecon: a target frame sees its neighbours within +-8 frames
DEFAULT_BLOCK_SIZE = 128  # FlexAttention's default tile; 1792 tokens per frame = 14 tiles


@dataclass(frozen=True)
class WindowLayout:
    """Where frames lie in the token sequence of one condition video.

    Attributes:
        num_frames: frames in the condition video (memory + sequence), F.
        tokens_per_frame: tokens per frame after patchifying (latent h/2 * w/2), T.
        num_memory: leading frames that are memory (retrieved captures), M <= F.
        window_frames: a sequence frame attends to sequence frames within +-window_frames.
    """

    num_frames: int
    tokens_per_frame: int
    num_memory: int
    window_frames: int = DEFAULT_WINDOW_FRAMES

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"WindowLayout.num_frames must be >= 1; got {self.num_frames}")
        if self.tokens_per_frame < 1:
            raise ValueError(f"WindowLayout.tokens_per_frame must be >= 1; got {self.tokens_per_frame}")
        if not 0 <= self.num_memory <= self.num_frames:
            raise ValueError(
                f"WindowLayout.num_memory must be in [0, num_frames={self.num_frames}]; got {self.num_memory}"
            )
        if self.window_frames < 0:
            raise ValueError(f"WindowLayout.window_frames must be >= 0; got {self.window_frames}")

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame


def window_mask_mod(layout: WindowLayout) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The FlexAttention ``mask_mod`` of ``layout``: True where query token q may attend to key token k."""
    tpf, mem, win = layout.tokens_per_frame, layout.num_memory, layout.window_frames

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_frame = q_idx // tpf
        k_frame = kv_idx // tpf
        k_is_memory = k_frame < mem
        q_in_sequence = q_frame >= mem
        near = (q_frame - k_frame).abs() <= win
        return k_is_memory | (q_in_sequence & near)

    return mask_mod


def dense_window_mask(layout: WindowLayout, device: torch.device | str = "cpu") -> Tensor:
    """The mask of ``layout`` as a dense matrix (reference for tests; L = F * T tokens).

    Returns:
        keep: True where query token (row) may attend to key token (column). bool [L, L]
    """
    idx = torch.arange(layout.num_tokens, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return window_mask_mod(layout)(zero, zero, idx[:, None], idx[None, :])


def frame_mask(layout: WindowLayout, device: torch.device | str = "cpu") -> Tensor:
    """The mask between frames (the token mask is constant over each frame pair). bool [F, F]"""
    frames = WindowLayout(layout.num_frames, 1, layout.num_memory, layout.window_frames)
    return dense_window_mask(frames, device)


def build_block_mask(layout: WindowLayout, device: torch.device | str, block_size: int = DEFAULT_BLOCK_SIZE):
    """The FlexAttention ``BlockMask`` of ``layout`` (one mask shared by batch and heads).

    Built from the frame mask, never from the dense [L, L] token mask (8e9 entries at 89,600 tokens):
    a (query block, key block) pair is *full* when every frame pair it covers is kept, *partial*
    (masked element-wise by the mask_mod) when some are, and skipped when none are.
    """
    from torch.nn.attention.flex_attention import BlockMask

    tpf, n_tok = layout.tokens_per_frame, layout.num_tokens
    n_blk = -(-n_tok // block_size)
    fm = frame_mask(layout, device).long()
    prefix = torch.zeros(layout.num_frames + 1, layout.num_frames + 1, dtype=torch.long, device=device)
    prefix[1:, 1:] = fm.cumsum(0).cumsum(1)  # 2-D prefix sums: kept frame pairs in any rectangle
    start = torch.arange(n_blk, device=device) * block_size
    end = torch.clamp(start + block_size, max=n_tok) - 1  # last token of each block
    f0, f1 = start // tpf, end // tpf  # first and last frame each block touches
    q0, q1, k0, k1 = f0[:, None], f1[:, None] + 1, f0[None, :], f1[None, :] + 1
    kept = prefix[q1, k1] - prefix[q0, k1] - prefix[q1, k0] + prefix[q0, k0]  # [Qb, Kb]
    area = (q1 - q0) * (k1 - k0)
    is_whole = start + block_size <= n_tok  # blocks past the sequence end are padded: never full
    full = (kept == area) & is_whole[:, None] & is_whole[None, :]
    partial = (kept > 0) & ~full

    def to_indices(sel: Tensor) -> tuple[Tensor, Tensor]:
        counts = sel.sum(-1).to(torch.int32)
        order = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=window_mask_mod(layout),
        seq_lengths=(n_tok, n_tok),
    )


def window_density(layout: WindowLayout) -> float:
    """Fraction of (query, key) pairs the window keeps (full attention: 1); the same over frames and tokens."""
    return float(frame_mask(layout).float().mean())


def attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Dense attention that also returns the log-sum-exp of each query's scores.

    CUDA: the cuDNN kernel (on contiguous copies where it refuses the strides), else the flash
    kernel; CPU: torch's flash kernel for CPU. The scale is 1/sqrt(D), as in ``F.scaled_dot_product_attention``.

    Args:
        q: [B, heads, Lq, D]; k, v: [B, heads, Lk, D] (any strides with a unit last stride).

    Returns:
        (out, lse): attention output [B, heads, Lq, D] in q's dtype, and log(sum_k exp(q.k * scale))
        float32 [B, heads, Lq].
    """
    if q.is_cuda:
        for copy in (False, True):  # cuDNN may refuse strides (overlapping window views): retry on copies
            try:
                args = (q.contiguous(), k.contiguous(), v.contiguous()) if copy else (q, k, v)
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(*args, None, True)
                LSE_KERNELS["cudnn_copied" if copy else "cudnn"] += 1
                return r[0], r[1].reshape(q.shape[:3]).float()
            except RuntimeError:
                pass
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
        LSE_KERNELS["flash"] += 1
    else:
        r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return r[0], r[1].reshape(q.shape[:3]).float()


LSE_KERNELS: Counter = Counter()  # CUDA calls of attention_lse per kernel (benchmarks report it)


def _runs(x: Tensor, first: int, count: int, step: int, length: int) -> Tensor:
    """``count`` runs of ``length`` tokens of ``x`` [heads, N, ...], run r starting at token
    ``first + r * step``: one strided view, overlapping where step < length (no copy).

    Returns:
        a view. [count, heads, length, ...]
    """
    base = x[:, first:]
    return base.as_strided(
        (count, x.shape[0], length, *x.shape[2:]), (step * base.stride(1), *base.stride()), base.storage_offset()
    )


def window_attention_parts(
    q: Tensor, k: Tensor, v: Tensor, layout: WindowLayout
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The window mask's attention as dense parts, before merging (``merge_window_parts``).

    One call lets every query attend to the memory: that is the whole answer for memory queries
    and the memory part for sequence queries. The window part of the sequence's queries follows:
    frames whose window lies inside the sequence (+-w) in one batched call whose keys are
    overlapping strided views of the sequence's keys (frame f's window starts one frame after
    frame f-1's), the frames at either end in pairs of equal window length (frame s and frame
    S-1-s), again as strided views. Attention over a union of key sets is the log-sum-exp weighted
    mean of the attention over each, so nothing is masked and no key is copied.

    Args:
        q, k, v: queries, keys, values after the rotary embedding, token-major. [B, L, heads, D]
        layout: frame layout (L = layout.num_tokens).

    Returns:
        (out_memory, out_a, lse_a, out_b, lse_b): the memory queries' output [B, heads, M*T, D];
        for the sequence's S*T queries, the memory part and the window part, each an output
        [B, heads, S*T, D] and a log-sum-exp float32 [B, heads, S*T] (-inf where a part is empty).
    """
    T, M, n, w = layout.tokens_per_frame, layout.num_memory, layout.num_frames, layout.window_frames
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, L, D] views
    B, Hd, L, D = q.shape
    m_tok, seq = M * T, n - M
    s_tok = seq * T
    if M:
        o, lse = attention_lse(q, k[:, :, :m_tok], v[:, :, :m_tok])
        out_mem, out_a, lse_a = o[:, :, :m_tok], o[:, :, m_tok:], lse[:, :, m_tok:]
    else:
        out_mem = q.new_empty(B, Hd, 0, D)
        out_a = torch.zeros_like(q)
        lse_a = torch.full((B, Hd, s_tok), float("-inf"), device=q.device)
    out_b = torch.empty_like(q[:, :, m_tok:])
    lse_b = torch.empty(B, Hd, s_tok, device=q.device)

    def window_call(i: int, first: int, count: int, step: int, lo: int, lo_step: int, length: int) -> None:
        """Frames first + r*step (r < count) attend to their windows of ``length`` frames from lo + r*lo_step."""
        qs, ks, vs = (x[i, :, m_tok:] for x in (q, k, v))
        o, lse = attention_lse(
            _runs(qs, first * T, count, step * T, T),
            _runs(ks, lo * T, count, lo_step * T, length * T),
            _runs(vs, lo * T, count, lo_step * T, length * T),
        )
        _runs(out_b[i], first * T, count, step * T, T).copy_(o)
        _runs(lse_b[i], first * T, count, step * T, T).copy_(lse)

    for i in range(B if seq else 0):
        if seq >= 2 * w + 1:  # frames w .. seq-w-1 have whole windows, starting at frames 0 .. seq-2w-1
            window_call(i, w, seq - 2 * w, 1, 0, 1, 2 * w + 1)
            ends = range(w)
        else:
            ends = range((seq + 1) // 2)
        for s in ends:  # frame s and its mirror seq-1-s have windows of the same length
            lo, hi = max(0, s - w), min(seq, s + w + 1)
            mirror = seq - 1 - s
            if mirror == s:
                window_call(i, s, 1, 1, lo, 1, hi - lo)
            else:
                window_call(i, s, 2, mirror - s, lo, max(0, mirror - w) - lo, hi - lo)
    return out_mem, out_a, lse_a, out_b, lse_b


def merge_window_parts(out_memory: Tensor, out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Join ``window_attention_parts``: softmax over the union of both key sets, in float32.

    Returns:
        attention output, token-major. [B, L, heads, D]
    """
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).unsqueeze(-1)  # [B, heads, S*T, 1]
    wb = torch.exp(lse_b - lse).unsqueeze(-1)
    seq = out_a.float() * wa + out_b.float() * wb
    return torch.cat([out_memory, seq.to(out_memory.dtype)], dim=2).transpose(1, 2)


def _token_major(x: Tensor) -> Tensor:
    """x [B, heads, L, D] stored token-major ([B, L, heads, D] contiguous; free when it already is)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("reconloop::window_attention_parts", mutates_args=())
def _window_parts_op(
    q: Tensor, k: Tensor, v: Tensor, num_frames: int, tokens_per_frame: int, num_memory: int, window_frames: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``window_attention_parts`` as one opaque op, so that compiled blocks keep a single graph."""
    layout = WindowLayout(num_frames, tokens_per_frame, num_memory, window_frames)
    om, oa, la, ob, lb = window_attention_parts(q, k, v, layout)
    om = om.clone()  # a view of the same call's output as oa: outputs must not alias (a small copy)
    return _token_major(om), _token_major(oa), la.contiguous(), _token_major(ob), lb.contiguous()


@_window_parts_op.register_fake
def _(q, k, v, num_frames, tokens_per_frame, num_memory, window_frames):
    B, L, Hd, D = q.shape
    m = num_memory * tokens_per_frame
    s = L - m

    def out(n: int) -> Tensor:
        return q.new_empty(B, n, Hd, D).transpose(1, 2)

    lse = q.new_empty(B, Hd, s, dtype=torch.float32)
    return out(m), out(s), lse, out(s), torch.empty_like(lse)


def window_attention_split(q: Tensor, k: Tensor, v: Tensor, layout: WindowLayout) -> Tensor:
    """The window mask of ``layout``, exactly: dense memory and window parts merged by log-sum-exp.

    Args:
        q, k, v: queries, keys, values after the rotary embedding, token-major. [B, L, heads, D]
        layout: frame layout (L = layout.num_tokens).

    Returns:
        attention output, token-major. [B, L, heads, D]
    """
    parts = torch.ops.reconloop.window_attention_parts(
        q, k, v, layout.num_frames, layout.tokens_per_frame, layout.num_memory, layout.window_frames
    )
    return merge_window_parts(*parts)


PAGE_TOKENS = 128  # FlashAttention-4's key tile on sm90/sm100: pages of one tile load by TMA


def paged_window_table(
    layout: WindowLayout, page_tokens: int = PAGE_TOKENS, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """The window mask as a page table: each query frame reads the pages of the frames it attends.

    One head's keys [L, D] are viewed as pages of ``page_tokens`` tokens, [L/page, page, D] (no
    copy); its queries as one sequence per frame, [F, T, D]. Frame i then attends to exactly the
    keys of its table row: memory frames first, then its window. (B videos of H heads, head-major,
    stack B*H tables, sequence s's pages offset by s * L/page: ``_batched``.)

    Returns:
        (table, used): page indices int32 [F, P] (P: the most pages any frame reads; the unused
        tail of a row points at page 0) and the number of keys each frame reads, int32 [F].
    """
    T = layout.tokens_per_frame
    if T % page_tokens:
        raise ValueError(f"paged window attention: tokens_per_frame ({T}) must be a multiple of {page_tokens}")
    per_frame = T // page_tokens
    fm = frame_mask(layout)  # [F, F]
    frames = fm.sum(1)  # frames each query frame attends
    width = int(frames.max())
    order = torch.argsort(fm.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]  # attended, ascending
    pages = (order[:, :, None] * per_frame + torch.arange(per_frame)).flatten(1)  # [F, width * per_frame]
    valid = torch.arange(pages.shape[1]) < (frames * per_frame)[:, None]
    pages = torch.where(valid, pages, 0)
    return pages.to(torch.int32).to(device), (frames * T).to(torch.int32).to(device)


def _batched(table: Tensor, used: Tensor, batch: int, pages_per_item: int) -> tuple[Tensor, Tensor]:
    """The page table of ``batch`` sequences (videos, or heads of videos) stacked along the page axis.
    ([batch*F, P], [batch*F])"""
    if batch == 1:
        return table, used
    offsets = torch.arange(batch, device=table.device, dtype=table.dtype) * pages_per_item
    return (table[None] + offsets[:, None, None]).flatten(0, 1), used.repeat(batch)


@functools.cache
def _flash_attention_4_importable() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        return False
    return True


def paged_attention_available(device: torch.device | str | None = None) -> bool:
    """Whether FlashAttention-4 (package ``flash-attn-4``, module ``flash_attn.cute``) can be imported,
    and, given a device, whether it is a CUDA GPU the paged kernel supports (sm90, sm100)."""
    if not _flash_attention_4_importable():
        return False
    if device is None:
        return True
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


def paged_sequences(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, used: Tensor, tokens_per_frame: int, page_tokens: int = PAGE_TOKENS
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Head-major q, k, v [B, heads, L, D] as the paged kernel reads them (views, no copies).

    Returns:
        queries, one sequence per (video, head, frame), frames fastest [B*heads*F, T, 1, D]; key and
        value pages [B*heads*L/page, page, 1, D]; the page table of every sequence [B*heads*F, P] and
        the keys each reads [B*heads*F] (``_batched``).
    """
    B, Hd, L, D = q.shape
    seqs = B * Hd
    table, used = _batched(table, used, seqs, L // page_tokens)
    frames = q.reshape(seqs * L // tokens_per_frame, tokens_per_frame, 1, D)
    k_pages, v_pages = (t.reshape(seqs * L // page_tokens, page_tokens, 1, D) for t in (k, v))
    return frames, k_pages, v_pages, table, used


@torch.library.custom_op("reconloop::window_attention_paged", mutates_args=())
def _window_paged_op(q: Tensor, k: Tensor, v: Tensor, table: Tensor, used: Tensor, tokens_per_frame: int) -> Tensor:
    """One FlashAttention-4 call over (head, frame) pairs as paged sequences (CUDA, sm90/sm100)."""
    from flash_attn.cute import flash_attn_varlen_func

    frames, k_pages, v_pages, table, used = paged_sequences(q, k, v, table, used, tokens_per_frame)
    out = flash_attn_varlen_func(frames, k_pages, v_pages, seqused_k=used, page_table=table)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(q.shape)


@_window_paged_op.register_fake
def _(q, k, v, table, used, tokens_per_frame):
    return torch.empty_like(q)


def window_attention_paged(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, used: Tensor, tokens_per_frame: int
) -> Tensor:
    """The window mask exactly, by one paged FlashAttention-4 call (``paged_window_table``).

    Every (head, frame) pair is one query sequence with one head, whose keys are the pages its
    table row lists. The pairs are ordered head-major, frames fastest, and FlashAttention-4's
    persistent scheduler runs its tiles in that order: the tiles in flight at once are neighbouring
    frames of one head, which read the same memory pages and mostly the same window pages, so they
    share them in L2. (Token-major q, k, v, one sequence per frame with all heads, put the tiles of
    about nine heads of one frame in flight: 2.6-2.9 % slower, docs/benchmarks.md.)

    Args:
        q, k, v: queries, keys, values after the rotary embedding, head-major, made contiguous here
            (for q and k compiled blocks fold that into the rotary kernel's stores; v and the output
            cost one copy each, 0.44 ms per layer at full size). [B, heads, L, D]
        table, used: ``paged_window_table`` of this layout (one video; each sequence is offset inside).

    Returns:
        attention output, head-major. [B, heads, L, D]
    """
    q, k, v = (t.contiguous() for t in (q, k, v))
    return torch.ops.reconloop.window_attention_paged(q, k, v, table, used, tokens_per_frame)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) by the rotary angles, in float32.

    Written as ``x * cos + swap(x) * sign * sin`` (swap exchanges each pair, sign is (-1, +1)), which
    is the same arithmetic as rotating each pair but compiles to one contiguous store per element
    (an unbind/stack form ran 2.7x slower than the norm fused with it, docs/benchmarks.md).

    Args:
        x: queries or keys. [B, L, heads, D]
        cos, sin: Wan's rotary tables, each angle repeated for both channels of a pair. [1, L, 1, D]

    Returns:
        rotated x, in x's dtype. [B, L, heads, D]
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x[2i+1], x[2i])
    sign = torch.arange(x.shape[-1], device=x.device) % 2 * 2 - 1  # -1, +1, -1, ... (no host copy)
    return (xf * cos.float() + swapped * (sin.float() * sign)).type_as(x)


class WanWindowAttnProcessor:
    """Self-attention processor for ``WanAttention`` (``attn1``): ``full`` or ``window`` attention.

    One instance is shared by all blocks. Before each forward pass over a new condition video call
    ``set_layout`` (the window mode needs it; the full mode ignores it). The block mask is built once
    per layout and reused by every layer and step.

    Args:
        mode: ``full`` or ``window``.
        window_frames: +-frames a sequence frame sees (``window`` mode).
        compile: wrap ``flex_attention`` in ``torch.compile`` (needed for speed on GPU; on CPU the
            uncompiled version runs the dense reference math).
        block_size: FlexAttention tile size in tokens.
        full_backend: kernel for ``full`` mode on CUDA: ``auto`` (torch's choice), ``cudnn``, ``flash``
            (scaled-dot-product attention backends, others as fallback) or ``flex`` (FlexAttention, no mask).
        kernel_options: passed to ``flex_attention`` (tile sizes, warps, stages).
        window_backend: ``flex`` (the block mask), ``split`` (``window_attention_split``: memory
            and window parts as dense calls merged by log-sum-exp), ``paged`` (``window_attention_paged``:
            one FlashAttention-4 call; needs the ``flash-attn-4`` package and an sm90/sm100 GPU) or
            ``auto`` (``paged`` where it runs, else ``split``; the fastest measured, docs/benchmarks.md).
    """

    def __init__(
        self,
        mode: str = "window",
        window_frames: int = DEFAULT_WINDOW_FRAMES,
        *,
        compile: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        full_backend: str = "auto",
        kernel_options: dict | None = None,
        window_backend: str = "auto",
    ) -> None:
        if window_backend not in WINDOW_BACKENDS:
            raise ValueError(f"window_backend must be one of {WINDOW_BACKENDS}; got {window_backend!r}")
        if window_backend == "paged" and mode == "window" and not paged_attention_available():
            raise ValueError(
                "window_backend 'paged' needs FlashAttention-4: pip install flash-attn-4 (CUDA sm90/sm100)"
            )
        self.window_backend = window_backend
        self.backend = window_backend  # the kernel in use: "auto" resolves in set_layout
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}; got {mode!r}")
        if full_backend not in FULL_BACKENDS:
            raise ValueError(f"full_backend must be one of {FULL_BACKENDS}; got {full_backend!r}")
        self.full_backend = full_backend
        self.kernel_options = kernel_options
        if window_frames < 0:
            raise ValueError(f"window_frames must be >= 0; got {window_frames}")
        self.mode = mode
        self.window_frames = window_frames
        self.block_size = block_size
        self.is_compiled = compile
        self.layout: WindowLayout | None = None
        self._block_mask = None
        self._mask_key: tuple | None = None
        self._flex = None
        self._page_table: tuple[Tensor, Tensor] | None = None
        # sequence parallelism (``sequence_parallel.enable_sequence_parallel`` sets it): an exchange whose
        # ``to_heads`` turns this rank's token shard of q, k, v into this rank's heads over all tokens and whose
        # ``to_tokens`` turns the attention output back; None: one process
        self.sequence_parallel = None

    def set_layout(self, num_frames: int, tokens_per_frame: int, num_memory: int, device: torch.device | str) -> None:
        """Describe the next condition video's frames; builds (or reuses) the block mask or page table."""
        self.layout = WindowLayout(num_frames, tokens_per_frame, num_memory, self.window_frames)
        if self.window_backend == "auto":
            whole_pages = tokens_per_frame % PAGE_TOKENS == 0
            self.backend = "paged" if whole_pages and paged_attention_available(device) else "split"
        if self.mode != "window" or self.backend == "split":
            return
        key = (self.layout, self.backend, str(device))
        if key != self._mask_key:
            if self.backend == "paged":
                self._page_table = paged_window_table(self.layout, device=device)
            else:
                self._block_mask = build_block_mask(self.layout, device, self.block_size)
            self._mask_key = key

    def _flex_fn(self):
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            self._flex = torch.compile(flex_attention, dynamic=False) if self.is_compiled else flex_attention
        return self._flex

    def _full_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.full_backend == "flex":
            return self._flex_fn()(q.contiguous(), k.contiguous(), v.contiguous(), kernel_options=self.kernel_options)
        if self.full_backend == "auto" or not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        first = SDPBackend.CUDNN_ATTENTION if self.full_backend == "cudnn" else SDPBackend.FLASH_ATTENTION
        order = [first] + [
            b
            for b in (
                SDPBackend.CUDNN_ATTENTION,
                SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH,
            )
            if b != first
        ]
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)

    def _check_layout(self, num_tokens: int) -> None:
        if self.layout is None or self.layout.num_tokens != num_tokens:
            got = None if self.layout is None else self.layout.num_tokens
            raise ValueError(
                f"window attention: set_layout must describe the {num_tokens} tokens of this input; layout has {got}"
            )

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("WanWindowAttnProcessor is for self-attention (attn1); got encoder_hidden_states")
        if attention_mask is not None:
            raise ValueError("WanWindowAttnProcessor builds its own mask; got attention_mask")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, L, heads, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary(query, *rotary_emb)
            key = apply_rotary(key, *rotary_emb)
        if self.sequence_parallel is not None:  # [B, L/N, heads, D] -> [B, L, heads/N, D]
            query, key, value = self.sequence_parallel.to_heads(query, key, value)
        if self.mode == "window":
            self._check_layout(query.shape[1])
        if self.mode == "window" and self.backend == "split":
            out = window_attention_split(query, key, value, self.layout)  # [B, L, heads, D]
        else:
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, heads, L, D]
            if self.mode == "window" and self.backend == "paged":
                out = window_attention_paged(q, k, v, *self._page_table, self.layout.tokens_per_frame)
            elif self.mode == "full":
                out = self._full_attention(q, k, v)
            else:
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # 4-D buffers (inductor's flex lowering)
                out = self._flex_fn()(q, k, v, block_mask=self._block_mask, kernel_options=self.kernel_options)
            out = out.transpose(1, 2)
        if self.sequence_parallel is not None:  # [B, L, heads/N, D] -> [B, L/N, heads, D]
            out = self.sequence_parallel.to_tokens(out)
        out = out.flatten(2, 3).type_as(query)  # [B, L, heads * D]
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def set_window_attention(
    transformer,
    mode: str = "window",
    window_frames: int = DEFAULT_WINDOW_FRAMES,
    *,
    compile: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    full_backend: str = "auto",
    kernel_options: dict | None = None,
    window_backend: str = "auto",
) -> WanWindowAttnProcessor:
    """Install one shared ``WanWindowAttnProcessor`` on the self-attention of every block.

    Args:
        transformer: a diffusers ``WanTransformer3DModel``.

    Returns:
        the processor (call its ``set_layout`` before a forward pass in ``window`` mode).

    Example:
        >>> proc = set_window_attention(transformer, "window", 8)
        >>> proc.set_layout(num_frames=50, tokens_per_frame=1792, num_memory=10, device="cuda")
    """
    proc = WanWindowAttnProcessor(
        mode,
        window_frames,
        compile=compile,
        block_size=block_size,
        full_backend=full_backend,
        kernel_options=kernel_options,
        window_backend=window_backend,
    )
    for block in transformer.blocks:
        block.attn1.set_processor(proc)
    return proc
