"""Sparse and dense self-attention for Wan transformers (DESIGN.md section 1 step 5).

A diffusers attention processor for the self-attention (``attn1``) of every ``WanTransformerBlock``,
in one of three modes. Tokens are laid out frame-major, as Wan's patchifier leaves them: token ``i``
belongs to frame ``i // tokens_per_frame``; each sparse mode is a mask between frames.

- ``full``: every token attends to every token. AnyRecon's released ``full_attention.ckpt`` was
  trained with it. Kernel (``full_kernel``): ``fa4``, one FlashAttention-4 call on the dense
  token-major sequence (package ``flash-attn-4``, sm90/sm100), or ``sdpa`` (torch's
  scaled-dot-product attention); ``auto`` picks ``fa4`` where it runs.
- ``block``: AnyRecon's sparse attention (``--is_block`` in its ``run_AnyRecon.py``), for weights
  trained with it. AnyRecon cuts the tokens into blocks of 8 frames x 4x4 tokens and keeps a block
  pair by ``build_local_block_mask_3d`` with the arguments its ``SelfAttention`` passes (context 6
  frames, temporal window 5 frames, time stride 8). Its spatial window is computed and then replaced
  by all-ones, so the kept pairs depend on time blocks only: a query frame in time block ``b`` sees
  every frame of time block 0 (the context) and of blocks ``b-1 .. b+1`` (``block_frame_mask``).
  Attention is invariant under AnyRecon's reordering of the tokens into blocks, so the frame mask on
  frame-major tokens gives the same output. AnyRecon cuts a video to a multiple of 8 frames; here a
  last partial block follows the same rule (ours).
- ``window_ours``: experimental, ours (no released weights use it): a sequence frame sees all memory
  frames and the sequence frames within +-``window_frames``; memory frames see the memory only.

The sparse modes run on one of two exact kernels (``sparse_kernel``): ``paged``, every (head,
frame) pair one query sequence whose keys are a page table over the frames it attends, all in one
FlashAttention-4 call (``window_attention_paged``; q, k, v head-major, so that the tiles in flight
share their pages in L2), or ``split``, dense calls over contiguous runs of key frames merged by
their log-sum-exp (``window_attention_split`` for ``window_ours``, ``mask_attention_split`` for any
frame mask). ``auto`` picks ``paged`` where FlashAttention-4 runs, else ``split``.

``dense_window_mask`` gives a layout's mask as a dense boolean matrix for reference and tests.
Cross-attention (``attn2``) keeps diffusers' own processor.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_MODES = ("full", "block", "window_ours")
SPARSE_MODES = ("block", "window_ours")
FULL_KERNELS = ("auto", "fa4", "sdpa")  # auto: fa4 where FlashAttention-4 runs, else sdpa
SPARSE_KERNELS = ("auto", "split", "paged")  # auto: paged where FlashAttention-4 runs, else split
DEFAULT_WINDOW_FRAMES = 8  # window_ours: a sequence frame sees its neighbours within +-8 frames (ours)
# AnyRecon's block attention (diffsynth/models/wan_video_dit.py, SelfAttention with is_block): blocks of
# 8 frames (x 4x4 tokens), build_local_block_mask_3d(context_frames=6, temp_window_frames=5, block_time_stride=8)
BLOCK_FRAMES = 8
BLOCK_CONTEXT_FRAMES = 6
BLOCK_TEMPORAL_WINDOW_FRAMES = 5


@dataclass(frozen=True)
class WindowLayout:
    """Where frames lie in the token sequence of one condition video, and which frames see which.

    Attributes:
        num_frames: frames in the condition video (memory + sequence), F.
        tokens_per_frame: tokens per frame after patchifying (latent h/2 * w/2), T.
        num_memory: leading frames that are memory (retrieved captures), M <= F (``window_ours``).
        window_frames: ``window_ours``: a sequence frame attends to sequence frames within +-window_frames.
        pattern: ``window_ours`` or ``block`` (AnyRecon's, ``block_frame_mask``).
    """

    num_frames: int
    tokens_per_frame: int
    num_memory: int
    window_frames: int = DEFAULT_WINDOW_FRAMES
    pattern: str = "window_ours"

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
        if self.pattern not in SPARSE_MODES:
            raise ValueError(f"WindowLayout.pattern must be one of {SPARSE_MODES}; got {self.pattern!r}")

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame


def block_frame_mask(
    num_frames: int,
    block_frames: int = BLOCK_FRAMES,
    context_frames: int = BLOCK_CONTEXT_FRAMES,
    temporal_window_frames: int = BLOCK_TEMPORAL_WINDOW_FRAMES,
    device: torch.device | str = "cpu",
) -> Tensor:
    """AnyRecon's block attention between frames (its ``build_local_block_mask_3d``, time part).

    Frame f lies in time block f // block_frames. Blocks 0 .. ceil(context_frames / block_frames) - 1
    are context, seen by every query; besides, a query in block b sees blocks within
    ceil(temporal_window_frames / block_frames) of b. With AnyRecon's arguments (8, 6, 5): block 0 is the
    context and the radius is 1 block.

    Returns:
        keep: True where query frame (row) attends to key frame (column). bool [F, F]
    """
    blocks = torch.arange(num_frames, device=device) // block_frames
    last_context = -(-context_frames // block_frames) - 1
    radius = -(-temporal_window_frames // block_frames)
    return (blocks[None, :] <= last_context) | ((blocks[:, None] - blocks[None, :]).abs() <= radius)


def frame_mask(layout: WindowLayout, device: torch.device | str = "cpu") -> Tensor:
    """The mask between frames (the token mask is constant over each frame pair). bool [F, F]"""
    if layout.pattern == "block":
        return block_frame_mask(layout.num_frames, device=device)
    f = torch.arange(layout.num_frames, device=device)
    k_is_memory = f[None, :] < layout.num_memory
    q_in_sequence = f[:, None] >= layout.num_memory
    near = (f[:, None] - f[None, :]).abs() <= layout.window_frames
    return k_is_memory | (q_in_sequence & near)


def dense_window_mask(layout: WindowLayout, device: torch.device | str = "cpu") -> Tensor:
    """The mask of ``layout`` between tokens (reference for tests; L = F * T tokens).

    Returns:
        keep: True where query token (row) may attend to key token (column). bool [L, L]
    """
    t = layout.tokens_per_frame
    return frame_mask(layout, device).repeat_interleave(t, 0).repeat_interleave(t, 1)


def window_density(layout: WindowLayout) -> float:
    """Fraction of (query, key) pairs the mask keeps (full attention: 1); the same over frames and tokens."""
    return float(frame_mask(layout).float().mean())


def attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Dense attention that also returns the log-sum-exp of each query's scores.

    CUDA in half precision: the cuDNN kernel (on contiguous copies where it refuses the strides), else the
    flash kernel; CUDA in float32: :func:`attention_lse_math` (cuDNN returns NaN for float32 without an error,
    measured on an H100, and flash refuses it); CPU: torch's flash kernel for CPU. The scale is 1/sqrt(D), as in
    ``F.scaled_dot_product_attention``.

    Args:
        q: [B, heads, Lq, D]; k, v: [B, heads, Lk, D] (any strides with a unit last stride).

    Returns:
        (out, lse): attention output [B, heads, Lq, D] in q's dtype, and log(sum_k exp(q.k * scale))
        float32 [B, heads, Lq].
    """
    path = lse_path(q)
    if path == "math":
        LSE_KERNELS["math"] += 1
        return attention_lse_math(q, k, v)
    if path == "cuda":
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


def lse_path(q: Tensor) -> str:
    """Which of :func:`attention_lse`'s paths a query takes: ``cuda`` (cuDNN, else flash: half precision on
    CUDA), ``math`` (float32 on CUDA, where cuDNN returned NaN without an error) or ``cpu``."""
    if not q.is_cuda:
        return "cpu"
    return "cuda" if q.dtype in (torch.float16, torch.bfloat16) else "math"


def attention_lse_math(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`attention_lse` by matrix products in float32 (the scores held whole: small or float32 models).

    Returns:
        (out [B, heads, Lq, D] in q's dtype, lse float32 [B, heads, Lq]).
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, heads, Lq, Lk]
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype), lse


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
    """A layout's frame mask exactly, by one paged FlashAttention-4 call (``paged_window_table``).

    Every (head, frame) pair is one query sequence with one head, whose keys are the pages its
    table row lists. The pairs are ordered head-major, frames fastest, and FlashAttention-4's
    persistent scheduler runs its tiles in that order: the tiles in flight at once are neighbouring
    frames of one head, which read the same memory pages and mostly the same window pages, so they
    share them in L2 (token-major, one sequence per frame with all heads, puts the tiles of several
    heads of one frame in flight instead; docs/benchmarks.md compares them).

    Args:
        q, k, v: queries, keys, values after the rotary embedding, head-major, made contiguous here
            (for q and k compiled blocks fold that into the rotary kernel's stores; v and the output
            cost one copy each). [B, heads, L, D]
        table, used: ``paged_window_table`` of this layout (one video; each sequence is offset inside).

    Returns:
        attention output, head-major. [B, heads, L, D]
    """
    q, k, v = (t.contiguous() for t in (q, k, v))
    return torch.ops.reconloop.window_attention_paged(q, k, v, table, used, tokens_per_frame)


def key_runs(keep: Tensor) -> list[tuple[int, int]]:
    """The kept entries of one mask row as maximal runs [start, end). bool [F] -> list of (start, end)"""
    idx = torch.nonzero(keep).flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def mask_attention_split(q: Tensor, k: Tensor, v: Tensor, layout: WindowLayout) -> Tensor:
    """Any frame mask exactly (``block`` on CPU or without FlashAttention-4): consecutive query frames
    with the same mask row form one group; each group attends to each contiguous run of its key frames
    in one dense call on views (no copies), the runs merged by their log-sum-exp.

    Args:
        q, k, v: queries, keys, values after the rotary embedding, token-major. [B, L, heads, D]
        layout: frame layout (L = layout.num_tokens).

    Returns:
        attention output, token-major. [B, L, heads, D]
    """
    T = layout.tokens_per_frame
    fm = frame_mask(layout).cpu()
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, L, D] views
    out = torch.empty_like(qh)
    start = 0
    while start < layout.num_frames:
        end = start + 1
        while end < layout.num_frames and torch.equal(fm[end], fm[start]):
            end += 1
        qs = qh[:, :, start * T : end * T]
        acc, lse = None, None
        for k0, k1 in key_runs(fm[start]):
            o, l_run = attention_lse(qs, kh[:, :, k0 * T : k1 * T], vh[:, :, k0 * T : k1 * T])
            if acc is None:
                acc, lse = o.float(), l_run
            else:
                total = torch.logaddexp(lse, l_run)
                acc = acc * torch.exp(lse - total)[..., None] + o.float() * torch.exp(l_run - total)[..., None]
                lse = total
        out[:, :, start * T : end * T] = acc.to(out.dtype)
        start = end
    return out.transpose(1, 2)


@torch.library.custom_op("reconloop::full_attention_fa4", mutates_args=())
def _full_fa4_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One FlashAttention-4 call over the dense sequence (CUDA, sm90/sm100). Token-major [B, L, heads, D]."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


@_full_fa4_op.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def full_attention_fa4(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full attention by FlashAttention-4 on token-major q, k, v (no head-major transpose needed).

    Args:
        q, k, v: after the rotary embedding, token-major, unit last stride. [B, L, heads, D]

    Returns:
        attention output, token-major. [B, L, heads, D]
    """
    q, k, v = (t.contiguous() for t in (q, k, v))
    return torch.ops.reconloop.full_attention_fa4(q, k, v)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) by the rotary angles, in float32.

    Written as ``x * cos + swap(x) * sign * sin`` (swap exchanges each pair, sign is (-1, +1)), which
    is the same arithmetic as rotating each pair but compiles to one contiguous store per element
    (an unbind/stack form does not; docs/benchmarks.md).

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
    """Self-attention processor for ``WanAttention`` (``attn1``): ``full``, ``block`` or ``window_ours``.

    One instance is shared by all blocks. Before each forward pass over a new condition video call
    ``set_layout`` (the sparse modes need it; ``full`` ignores it). The page table is built once per
    layout and reused by every layer and step.

    Args:
        mode: one of ``ATTENTION_MODES``.
        window_frames: +-frames a sequence frame sees (``window_ours`` only).
        full_kernel: ``fa4``, ``sdpa`` or ``auto`` (``FULL_KERNELS``).
        sparse_kernel: ``paged``, ``split`` or ``auto`` (``SPARSE_KERNELS``).
    """

    def __init__(
        self,
        mode: str = "full",
        window_frames: int = DEFAULT_WINDOW_FRAMES,
        *,
        full_kernel: str = "auto",
        sparse_kernel: str = "auto",
    ) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}; got {mode!r}")
        if full_kernel not in FULL_KERNELS:
            raise ValueError(f"full_kernel must be one of {FULL_KERNELS}; got {full_kernel!r}")
        if sparse_kernel not in SPARSE_KERNELS:
            raise ValueError(f"sparse_kernel must be one of {SPARSE_KERNELS}; got {sparse_kernel!r}")
        if window_frames < 0:
            raise ValueError(f"window_frames must be >= 0; got {window_frames}")
        needs_fa4 = (mode in SPARSE_MODES and sparse_kernel == "paged") or (mode == "full" and full_kernel == "fa4")
        if needs_fa4 and not paged_attention_available():
            raise ValueError(
                f"attention {mode!r} with kernel 'paged'/'fa4' needs FlashAttention-4: pip install flash-attn-4 "
                f"(CUDA sm90/sm100)"
            )
        self.mode = mode
        self.window_frames = window_frames
        self.full_kernel = full_kernel
        self.sparse_kernel = sparse_kernel
        self.backend = sparse_kernel if mode in SPARSE_MODES else full_kernel  # the kernel in use; auto resolves
        self.layout: WindowLayout | None = None
        self._mask_key: tuple | None = None
        self._page_table: tuple[Tensor, Tensor] | None = None
        # sequence parallelism (``sequence_parallel.enable_sequence_parallel`` sets it): an exchange whose
        # ``to_heads`` turns this rank's token shard of q, k, v into this rank's heads over all tokens and whose
        # ``to_tokens`` turns the attention output back; None: one process
        self.sequence_parallel = None

    def set_layout(self, num_frames: int, tokens_per_frame: int, num_memory: int, device: torch.device | str) -> None:
        """Describe the next condition video's frames; resolves ``auto`` and builds (or reuses) the page table."""
        if self.mode == "full":
            if self.full_kernel == "auto":
                self.backend = "fa4" if paged_attention_available(device) else "sdpa"
            return
        self.layout = WindowLayout(num_frames, tokens_per_frame, num_memory, self.window_frames, self.mode)
        if self.sparse_kernel == "auto":
            whole_pages = tokens_per_frame % PAGE_TOKENS == 0
            self.backend = "paged" if whole_pages and paged_attention_available(device) else "split"
        if self.backend == "paged":
            key = (self.layout, str(device))
            if key != self._mask_key:
                self._page_table = paged_window_table(self.layout, device=device)
                self._mask_key = key

    def _check_layout(self, num_tokens: int) -> None:
        if self.layout is None or self.layout.num_tokens != num_tokens:
            got = None if self.layout is None else self.layout.num_tokens
            raise ValueError(
                f"{self.mode} attention: set_layout must describe the {num_tokens} tokens of this input; layout has {got}"
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
        if self.mode == "full" and self.backend == "fa4":
            out = full_attention_fa4(query, key, value)  # token-major in and out
        elif self.mode == "full":
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, heads, L, D]
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        else:
            self._check_layout(query.shape[1])
            if self.backend == "paged":
                q, k, v = (t.transpose(1, 2) for t in (query, key, value))
                out = window_attention_paged(q, k, v, *self._page_table, self.layout.tokens_per_frame).transpose(1, 2)
            elif self.mode == "window_ours":
                out = window_attention_split(query, key, value, self.layout)
            else:
                out = mask_attention_split(query, key, value, self.layout)
        if self.sequence_parallel is not None:  # [B, L, heads/N, D] -> [B, L/N, heads, D]
            out = self.sequence_parallel.to_tokens(out)
        out = out.flatten(2, 3).type_as(query)  # [B, L, heads * D]
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def set_window_attention(
    transformer,
    mode: str = "full",
    window_frames: int = DEFAULT_WINDOW_FRAMES,
    *,
    full_kernel: str = "auto",
    sparse_kernel: str = "auto",
) -> WanWindowAttnProcessor:
    """Install one shared ``WanWindowAttnProcessor`` on the self-attention of every block.

    Args:
        transformer: a diffusers ``WanTransformer3DModel``.

    Returns:
        the processor (call its ``set_layout`` before a forward pass).

    Example:
        >>> proc = set_window_attention(transformer, "block")
        >>> proc.set_layout(num_frames=48, tokens_per_frame=1792, num_memory=10, device="cuda")
    """
    proc = WanWindowAttnProcessor(mode, window_frames, full_kernel=full_kernel, sparse_kernel=sparse_kernel)
    for block in transformer.blocks:
        block.attn1.set_processor(proc)
    return proc
