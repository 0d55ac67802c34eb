"""One denoise on several GPUs: Ulysses sequence parallelism for the AnyRecon generator's Wan transformer.

DESIGN.md section 2: one job can span the GPUs of one box. Every rank holds the whole transformer
(weights replicated) and works on a contiguous range of the video's tokens: the patch embedding's
output, the rotary tables, the projections, the FFN, the cross-attention and every elementwise step
see only that range. Around self-attention an all-to-all trades token shards for head shards, so that
each rank's attention kernel (``full``, or ``window`` with any of its kernels) runs unchanged on all
tokens of ``heads / N`` heads, in the frame-major order the window layouts and page tables assume; a
second all-to-all trades back. The output projection's tokens are gathered on every rank.

Token ranges are contiguous and in rank order (rank r holds tokens ``[sum(sizes[:r]), sum(sizes[:r+1]))``,
``token_shard_sizes``), which is what makes the gathered sequence the original one. Heads are split
in order too (rank r: heads ``[r * heads/N, (r+1) * heads/N)``); their count must divide by N (Wan2.1
14B has 40 heads: N = 2, 4, 5 or 8). Tokens need not divide by N.

The split points are the ones diffusers declares for Wan (``WanTransformer3DModel._cp_plan``: the rotary
tables, the first block's input, ``proj_out``'s output). diffusers' own context parallelism
(``ContextParallelConfig``, ``enable_parallelism``) is not used: its Ulysses exchange lives inside
``dispatch_attention_fn``, which our processor's kernels do not go through, and in diffusers 0.42 it
cannot build its device mesh on a machine without an accelerator (CPU tests).

Launch: ``SequenceParallelGroup`` starts N - 1 follower processes (``torch.multiprocessing``, spawn) and
makes the calling process rank 0. Each rank builds its generator with the same picklable ``build``
function. Rank 0's generator is the one the loop calls; every forward of its transformer is broadcast
to the followers, which run the same forward on their shards (``serve_forwards``). The group stays up
for the next job (``backend.generators.GeneratorCache`` keeps it) until ``close``.

Example (CPU, gloo, tiny random models)::

    from functools import partial
    from backend.generators.tiny import tiny_anyrecon_generator
    group = SequenceParallelGroup(partial(tiny_anyrecon_generator, AnyReconConfig(attention="block")), ["cpu"] * 2)
    latents = group.generator.denoise(y, prompt_embeds, image_embeds, num_steps=2, seed=0, num_memory=2)
    group.close()
"""

from __future__ import annotations

import datetime
import logging
import queue
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

OP_STOP, OP_FORWARD, OP_MEMORY = 0, 1, 2  # what rank 0 asks the followers to do next
FORWARD_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")
DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float64)
MAX_DIMS = 5  # hidden_states [B, C, F, H, W]
SLOTS_PER_INPUT = 3 + MAX_DIMS  # present, dtype code, ndim, shape
HEADER_LEN = 4 + len(FORWARD_INPUTS) * SLOTS_PER_INPUT  # op, window layout (3), inputs
DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer fails (a follower died or hangs)
READY_POLL_S = 1.0  # how often rank 0 checks that followers still live while they build
WAN_14B_HEADS = 40  # Wan2.1 14B: the default GPU count is the largest divisor of this that fits the box
LOOPBACK = "127.0.0.1"
START_METHODS = ("spawn", "fork")


def token_shard_sizes(num_tokens: int, world_size: int) -> list[int]:
    """Tokens per rank, in rank order: contiguous ranges, the first ``num_tokens % world_size`` one longer
    (the same split as ``Tensor.tensor_split``)."""
    if num_tokens < world_size:
        raise ValueError(f"sequence parallel: {num_tokens} tokens cannot be split over {world_size} ranks")
    q, r = divmod(num_tokens, world_size)
    return [q + (i < r) for i in range(world_size)]


def _wait(x: Tensor) -> Tensor:
    """The result of a functional collective (an ``AsyncCollectiveTensor`` until waited on)."""
    import torch.distributed._functional_collectives as funcol

    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


class UlyssesExchange:
    """The collectives of one rank: token shards <-> head shards, and the token split and gather.

    Functional collectives (``torch.distributed._functional_collectives``), so that compiled blocks
    trace them. ``num_tokens`` (the whole sequence's length) is set by ``shard`` at the first block.

    Args:
        group: the process group (None: the default group).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.num_tokens: int | None = None

    def sizes(self) -> list[int]:
        if self.num_tokens is None:
            raise RuntimeError("sequence parallel: no sequence was sharded yet (shard runs at the first block)")
        return token_shard_sizes(self.num_tokens, self.world_size)

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's contiguous token range of ``x`` along ``dim`` (sets ``num_tokens``). [.., L/N, ..]"""
        self.num_tokens = x.shape[dim]
        return x.tensor_split(self.world_size, dim=dim)[self.rank]

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        """Every rank's token range of ``x``, in rank order: the whole sequence on every rank. [.., L, ..]"""
        import torch.distributed._functional_collectives as funcol

        sizes = self.sizes()
        longest = sizes[0]
        if x.shape[dim] < longest:  # uneven split: pad to the longest shard, gather, drop the padding
            pad = list(x.shape)
            pad[dim] = longest - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.13
        full = _wait(gather(x.contiguous(), dim, self.group))
        if sizes[-1] == longest:
            return full
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(full.split(longest, dim=dim), sizes)], dim=dim)

    def _all_to_all(self, x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        import torch.distributed._functional_collectives as funcol

        return _wait(funcol.all_to_all_single(x.reshape(-1), out_splits, in_splits, self.group))

    def to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token shards of all heads -> all tokens of this rank's heads, in one all-to-all.

        Args:
            q, k, v: this rank's tokens, token-major. [B, L/N, heads, D]

        Returns:
            q, k, v over the whole sequence for heads ``[rank * heads/N, (rank+1) * heads/N)``. [B, L, heads/N, D]
        """
        B, n_local, heads, D = q.shape
        N = self.world_size
        if heads % N:
            raise ValueError(f"sequence parallel: attention heads ({heads}) must divide by the ranks ({N})")
        h = heads // N
        x = torch.stack([q, k, v]).unflatten(3, (N, h))  # [3, B, l, N, h, D]
        x = x.permute(3, 0, 1, 2, 4, 5)  # [N, 3, B, l, h, D]: block r goes to rank r
        sizes = self.sizes()
        per_token = 3 * B * h * D
        got = self._all_to_all(x, [per_token * s for s in sizes], [per_token * n_local] * N)
        parts = [p.view(3, B, s, h, D) for p, s in zip(got.split([per_token * s for s in sizes]), sizes)]
        full = torch.cat(parts, dim=2)  # [3, B, L, h, D]: rank order is token order
        return full[0], full[1], full[2]

    def to_tokens(self, out: Tensor) -> Tensor:
        """All tokens of this rank's heads -> this rank's tokens of all heads (inverse of ``to_heads``).

        Args:
            out: attention output, token-major. [B, L, heads/N, D]

        Returns:
            [B, L/N, heads, D]
        """
        B, L, h, D = out.shape
        N = self.world_size
        sizes = self.sizes()
        n_local = sizes[self.rank]
        per_token = B * h * D
        send = torch.cat([p.reshape(-1) for p in out.split(sizes, dim=1)])  # rank r's tokens first
        got = self._all_to_all(send, [per_token * n_local] * N, [per_token * s for s in sizes])
        return got.view(N, B, n_local, h, D).permute(1, 2, 0, 3, 4).reshape(B, n_local, N * h, D)


class SequenceParallel:
    """The hooks that make one rank's transformer work on its token shard (``enable_sequence_parallel``)."""

    def __init__(self, transformer: torch.nn.Module, processor: Any, exchange: UlyssesExchange) -> None:
        self.transformer, self.processor, self.exchange = transformer, processor, exchange
        self._handles: list[Any] = []

    def _split_rope(self, module, args, output):
        if not (isinstance(output, tuple) and len(output) == 2):
            raise ValueError(
                f"sequence parallel: the transformer's rope must return (cos, sin) [1, L, 1, D]; got {type(output)}"
            )
        return tuple(self.exchange.shard(t, dim=1) for t in output)

    def _split_input(self, module, args, kwargs):
        if args:
            return (self.exchange.shard(args[0], dim=1), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.exchange.shard(kwargs["hidden_states"], dim=1)}

    def _gather_output(self, module, args, output):
        return self.exchange.gather(output, dim=1)

    def install(self) -> None:
        tr = self.transformer
        self._handles = [
            tr.rope.register_forward_hook(self._split_rope),
            tr.blocks[0].register_forward_pre_hook(self._split_input, with_kwargs=True),
            tr.proj_out.register_forward_hook(self._gather_output),
        ]
        self.processor.sequence_parallel = self.exchange

    def remove(self) -> None:
        """Back to one process: the hooks and the processor's exchange removed."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.processor.sequence_parallel = None


def enable_sequence_parallel(generator: Any, group: dist.ProcessGroup | None = None) -> SequenceParallel:
    """Shard ``generator``'s transformer over the ranks of ``group`` (every rank calls this on its replica).

    Args:
        generator: an ``AnyReconGenerator`` with our attention (``full`` or ``window``; diffusers' ``stock``
            processor would attend within each rank's tokens only).
        group: an initialised process group (None: the default group).

    Returns:
        the installed hooks (``remove()`` undoes them).
    """
    if generator.processor is None:
        raise ValueError(
            f"sequence parallel: AnyReconConfig.attention must be one of our processor's modes (full, block, window_ours), not diffusers' stock; got {generator.config.attention!r}"
        )
    tr = generator.components.transformer
    exchange = UlyssesExchange(group)
    heads = tr.config.num_attention_heads
    if heads % exchange.world_size:
        raise ValueError(
            f"sequence parallel: the transformer's {heads} attention heads must divide by the ranks "
            f"({exchange.world_size}); use a GPU count that divides {heads}"
        )
    sp = SequenceParallel(tr, generator.processor, exchange)
    sp.install()
    return sp


# ---------------------------------------------------------------------------------------------- rank 0 <-> followers


def _header(op: int, device: torch.device) -> Tensor:
    h = torch.full((HEADER_LEN,), -1, dtype=torch.int64)
    h[0] = op
    return h.to(device)


def _encode_forward(processor: Any, inputs: list[Tensor | None], device: torch.device) -> Tensor:
    """The header of one forward: the window layout and each input's dtype and shape. int64 [HEADER_LEN]"""
    h = torch.full((HEADER_LEN,), -1, dtype=torch.int64)
    h[0] = OP_FORWARD
    if processor.layout is not None:
        lay = processor.layout
        h[1:4] = torch.tensor([lay.num_frames, lay.tokens_per_frame, lay.num_memory])
    for i, x in enumerate(inputs):
        at = 4 + i * SLOTS_PER_INPUT
        if x is None:
            h[at] = 0
            continue
        if x.dtype not in DTYPE_CODES or x.ndim > MAX_DIMS:
            raise ValueError(f"sequence parallel: cannot send {FORWARD_INPUTS[i]} of {x.dtype} {tuple(x.shape)}")
        h[at], h[at + 1], h[at + 2] = 1, DTYPE_CODES.index(x.dtype), x.ndim
        h[at + 3 : at + 3 + x.ndim] = torch.tensor(x.shape)
    return h.to(device)


def _decode_forward(h: list[int]) -> tuple[tuple[int, int, int] | None, list[tuple[torch.dtype, list[int]] | None]]:
    layout = None if h[1] < 0 else (h[1], h[2], h[3])
    specs: list[tuple[torch.dtype, list[int]] | None] = []
    for i in range(len(FORWARD_INPUTS)):
        at = 4 + i * SLOTS_PER_INPUT
        if h[at] != 1:
            specs.append(None)
            continue
        specs.append((DTYPE_CODES[h[at + 1]], h[at + 3 : at + 3 + h[at + 2]]))
    return layout, specs


class ForwardMirror:
    """Rank 0: before each forward of the transformer, send its inputs and layout to the followers.

    Installed as a forward pre-hook, so that the generator's own loop (``denoise``, guidance's second
    forward) drives every rank without knowing it.
    """

    def __init__(self, generator: Any, alive: Callable[[], None] | None = None) -> None:
        self.generator = generator
        self.alive = alive
        self.device = generator.device
        tr = generator.components.transformer
        self._handle = tr.register_forward_pre_hook(self._send, with_kwargs=True)

    def _send(self, module, args, kwargs):
        if self.alive is not None:
            self.alive()
        named = dict(zip(FORWARD_INPUTS, args)) | {k: kwargs.get(k) for k in FORWARD_INPUTS if k in kwargs}
        inputs = [named.get(k) for k in FORWARD_INPUTS]
        inputs = [None if x is None else x.to(self.device).contiguous() for x in inputs]
        dist.broadcast(_encode_forward(self.generator.processor, inputs, self.device), src=0)
        for x in inputs:
            if x is not None:
                dist.broadcast(x, src=0)
        return None

    def remove(self) -> None:
        self._handle.remove()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory of this process on ``device`` since the last reset (CPU: 0)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gather_memory(device: torch.device, reset: bool) -> list[int]:
    mine = torch.tensor([peak_memory_bytes(device)], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if reset:
        _reset_peak_memory(device)
    return [int(x.item()) for x in every]


@torch.no_grad()
def serve_forwards(generator: Any) -> None:
    """A follower's loop: run each forward rank 0 announces, on this rank's shard, until told to stop."""
    device = generator.device
    tr, proc = generator.components.transformer, generator.processor
    while True:
        h = _header(OP_STOP, device)
        dist.broadcast(h, src=0)
        h = h.tolist()
        if h[0] == OP_STOP:
            return
        if h[0] == OP_MEMORY:
            _gather_memory(device, reset=h[1] == 1)
            continue
        layout, specs = _decode_forward(h)
        inputs: dict[str, Tensor | None] = {}
        for name, spec in zip(FORWARD_INPUTS, specs):
            if spec is None:
                inputs[name] = None
                continue
            x = torch.empty(spec[1], dtype=spec[0], device=device)
            dist.broadcast(x, src=0)
            inputs[name] = x
        if layout is not None:
            proc.set_layout(*layout, device)
        tr(**inputs, return_dict=False)


def _init_group(rank: int, world_size: int, port: int, device: torch.device, timeout_s: float) -> None:
    kw: dict[str, Any] = {}
    if device.type == "cuda":
        kw["device_id"] = device
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{LOOPBACK}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kw,
    )


def _follower_main(
    rank: int, world_size: int, port: int, device: str, build: Callable[..., Any], ready: Any, timeout_s: float
) -> None:
    """Entry of follower process ``rank``: join the group, build the replica, report, serve forwards."""
    dev = torch.device(device)
    if dev.type == "cpu":  # CPU ranks (tests, smoke runs): one thread each, so that a forked rank never starts
        torch.set_num_threads(1)  # an OpenMP team its parent's pool may have left in a bad state
    _init_group(rank, world_size, port, dev, timeout_s)
    try:
        generator = build(device=dev)
        enable_sequence_parallel(generator)
    except Exception as err:
        ready.put((rank, f"{type(err).__name__}: {err}"))
        raise
    ready.put((rank, ""))
    try:
        serve_forwards(generator)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class SequenceParallelGroup:
    """N processes working on one generator: this process is rank 0, N - 1 followers are spawned.

    Args:
        build: called as ``build(device=...)`` in every rank to make its generator (an ``AnyReconGenerator``
            with ``full`` or ``window`` attention); must be picklable (a module-level function or a
            ``functools.partial`` of one), e.g. ``partial(AnyReconGenerator.from_pretrained, path, lora)``.
        devices: one device per rank, rank 0 first (``["cuda:0", ..., "cuda:7"]``; ``["cpu"] * N`` runs
            the group over gloo on CPU).
        timeout_s: a collective that waits longer fails.
        start_method: how followers start: ``spawn`` (a fresh interpreter; needed for CUDA) or, on CPU only,
            ``fork`` (a copy of this process: no imports to redo, seconds instead of tens of seconds).

    Attributes:
        generator: rank 0's generator; call it as usual (``generate``, ``denoise``).
    """

    def __init__(
        self,
        build: Callable[..., Any],
        devices: Sequence[torch.device | str],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start_method: str = "spawn",
    ) -> None:
        import torch.multiprocessing as mp

        if len(devices) < 2:
            raise ValueError(f"SequenceParallelGroup: devices must name at least 2 ranks; got {list(devices)}")
        kinds = {torch.device(d).type for d in devices}
        if len(kinds) != 1:
            raise ValueError(f"SequenceParallelGroup: devices must all be of one kind; got {list(devices)}")
        if start_method not in START_METHODS or (start_method == "fork" and kinds != {"cpu"}):
            raise ValueError(
                f"SequenceParallelGroup: start_method must be one of {START_METHODS} ('fork' on CPU only); "
                f"got {start_method!r} for {sorted(kinds)}"
            )
        if dist.is_initialized():
            raise RuntimeError("SequenceParallelGroup: this process is already in a process group (close it first)")
        self.devices = [torch.device(d) for d in devices]
        self.world_size = len(devices)
        port = _free_port()
        ctx = mp.get_context(start_method)
        self._ready = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_follower_main,
                args=(r, self.world_size, port, str(self.devices[r]), build, self._ready, timeout_s),
                daemon=True,
                name=f"sequence-parallel-rank{r}",
            )
            for r in range(1, self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._is_closed = False
        try:
            _init_group(0, self.world_size, port, self.devices[0], timeout_s)
            self.generator = build(device=self.devices[0])
            self._sp = enable_sequence_parallel(self.generator)
            self._wait_ready(timeout_s)
        except BaseException:
            self._kill()
            raise
        self._mirror = ForwardMirror(self.generator, alive=self.check_alive)
        logger.info("sequence parallel: %d ranks on %s", self.world_size, ", ".join(map(str, self.devices)))

    def _wait_ready(self, timeout_s: float) -> None:
        waiting = set(range(1, self.world_size))
        waited = 0.0
        while waiting:
            try:
                rank, err = self._ready.get(timeout=READY_POLL_S)
            except queue.Empty:
                waited += READY_POLL_S
                self.check_alive()
                if waited > timeout_s:
                    raise TimeoutError(f"sequence parallel: ranks {sorted(waiting)} not ready after {timeout_s:.0f} s")
                continue
            if err:
                raise RuntimeError(f"sequence parallel: rank {rank} could not build its generator: {err}")
            waiting.discard(rank)

    def check_alive(self) -> None:
        """Raise ``RuntimeError`` naming a follower that has exited (its collectives would never come)."""
        for r, p in enumerate(self._procs, start=1):
            if not p.is_alive():
                raise RuntimeError(f"sequence parallel: rank {r} exited (code {p.exitcode}); close and relaunch")

    def peak_memory_bytes(self, reset: bool = False) -> list[int]:
        """Each rank's peak allocated accelerator memory (rank order; 0 on CPU), then optionally reset."""
        self.check_alive()
        h = _header(OP_MEMORY, self.devices[0])
        h[1] = int(reset)
        dist.broadcast(h, src=0)
        return _gather_memory(self.devices[0], reset)

    def close(self) -> None:
        """Stop the followers and leave the process group (idempotent)."""
        if self._is_closed:
            return
        self._is_closed = True
        try:
            self._mirror.remove()
            self._sp.remove()
            if all(p.is_alive() for p in self._procs):
                dist.broadcast(_header(OP_STOP, self.devices[0]), src=0)
            for p in self._procs:
                p.join(timeout=30)
        finally:
            self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> SequenceParallelGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_gpus(requested: int, device: torch.device | str, num_heads: int = WAN_14B_HEADS) -> int:
    """Ranks for one job: ``requested`` GPUs, or (0) all of this box's that the heads divide by; 1 off CUDA.

    Raises ``ValueError`` when more GPUs are asked for than the box has, or a count the heads do not divide by.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    have = torch.cuda.device_count()
    if requested == 0:
        return max(n for n in range(1, have + 1) if num_heads % n == 0)
    if requested > have:
        raise ValueError(f"settings.gpus: asks for {requested} GPUs; this worker has {have}")
    if num_heads % requested:
        ok = [n for n in range(1, have + 1) if num_heads % n == 0]
        raise ValueError(f"settings.gpus: {num_heads} attention heads must divide by it; got {requested}, use {ok}")
    return requested
