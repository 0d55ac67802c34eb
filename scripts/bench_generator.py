"""Benchmark the AnyRecon generator at full size with random weights (GPU).

The 14B Wan2.1 I2V transformer architecture (40 layers, width 5120, FFN 13824, 40 heads, 36 input
channels, CLIP dimension 1280) is built on the meta device, materialised with ``to_empty`` and filled
with random numbers on the GPU (seconds, not minutes); the VAE and the CLIP ViT-H/14 encoder likewise
at their real configs. Inputs: 10 memory + 40 target frames at 512x896 (latent 64x112, 1792 tokens
per frame, 89,600 tokens), 4 steps. Measured, each in this one process:

- an attention micro-benchmark (one layer's self-attention at this size) per kernel;
- the denoising loop per attention mode: diffusers' ``stock`` processor, ours ``full`` (SDPA),
  ``full_fa4`` (FlashAttention-4 on the dense sequence), AnyRecon's ``block`` pattern (auto kernel;
  ``block_split``, ``block_paged`` force one) and the experimental ``window_ours``: seconds per step,
  total, peak GPU memory, achieved TFLOP/s, the pattern's density, and the largest difference of the
  latents from ``stock``'s and ``full``'s (bf16 tolerance where the attention is the same);
- VAE encode (50 frames, one latent each) and tiled decode (40 frames), CLIP encode of frame 0;
- memory modes with full attention: fp8 weight storage, group offloading (peak memory: the 24 GB target).

Results go to a JSON file as they come (a run cut short keeps what it measured).

``--gpus 1,2,4,8`` measures instead the sequence-parallel denoise (``backend.generators.sequence_parallel``)
for each GPU count in turn: 4-step time, peak memory per GPU, scaling efficiency against one GPU and the
largest difference from the one-GPU latents, for ``--sp-modes`` (full, window). Every rank builds the same
random weights (one seed).

    python scripts/bench_generator.py --out $OUT/generator.json --compile-blocks
    python scripts/bench_generator.py --tiny --device cpu --out /tmp/bench.json   # code-path check on CPU
    python scripts/bench_generator.py --gpus 1,2,4,8 --sp-modes full --out $OUT/sp_full.json
    python scripts/bench_generator.py --tiny --device cpu --gpus 1,2 --out /tmp/sp.json   # gloo on CPU
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.generators import window_attention as wa  # noqa: E402
from backend.generators.anyrecon import AnyReconComponents, AnyReconConfig, AnyReconGenerator  # noqa: E402
from backend.generators.anyrecon_lora import WAN_I2V_14B  # noqa: E402
from backend.generators.window_attention import (  # noqa: E402
    WindowLayout,
    mask_attention_split,
    window_attention_split,
    window_density,
)

CLIP_VIT_H14 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
)
TEXT_TOKENS = 512  # Wan's text context
CLIP_TOKENS = 257  # 16x16 patches + class token
DESIGN_PFLOP = {"full": 8.8, "window_ours": 5.3}  # DESIGN.md section 5, per step
INIT_STD = 0.02


def flops_per_step(cfg: dict, tokens: int, density: float) -> float:
    """Matmul FLOPs of one transformer forward (2 per multiply-add)."""
    d, ffn, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    linear = 2 * tokens * d * (4 * d + 2 * d + 2 * ffn)  # self q,k,v,o; cross q,o; ffn in/out
    ctx = TEXT_TOKENS + CLIP_TOKENS
    cross_kv = 2 * ctx * d * 4 * d  # k, v for text and image context
    self_attn = 4 * tokens * tokens * d * density  # QK^T and PV
    cross_attn = 4 * tokens * ctx * d
    return float(layers * (linear + cross_kv + self_attn + cross_attn))


@torch.no_grad()
def random_init_(model: torch.nn.Module) -> None:
    """Fill every parameter in place: norms' weights 1, biases 0, the rest N(0, INIT_STD)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.ndim == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, INIT_STD)


def build_transformer(cfg: dict, device: str, dtype: torch.dtype):
    """The Wan transformer at ``cfg`` with random weights, built on meta then materialised on ``device``."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        tr = WanTransformer3DModel(**cfg)
    tr.to(dtype)
    for name, module in tr.named_modules():  # the modules from_pretrained keeps in float32
        if any(k in name.split(".") for k in tr._keep_in_fp32_modules):
            module.to(torch.float32)
    tr.scale_shift_table.data = tr.scale_shift_table.data.float()
    tr.to_empty(device=device)
    random_init_(tr)
    tr.rope = WanRotaryPosEmbed(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"]).to(device)
    return tr.eval()


def build_components(args, device: str) -> AnyReconComponents:
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if args.tiny:
        from backend.generators.tiny import tiny_anyrecon_components

        c = tiny_anyrecon_components(0)
        c.text_encoder = c.tokenizer = None
        return c
    t0 = time.perf_counter()
    tr = build_transformer(WAN_I2V_14B, device, torch.bfloat16)
    vae = AutoencoderKLWan().to(device).eval()  # the default config is Wan2.1's VAE
    random_init_(vae)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H14)).to(device).eval()
    random_init_(clip)

    class _Proc:  # CLIP normalisation of Wan's image processor
        image_mean = [0.48145466, 0.4578275, 0.40821073]
        image_std = [0.26862954, 0.26130258, 0.27577711]

    torch.cuda.synchronize() if device.startswith("cuda") else None
    print(f"built random components in {time.perf_counter() - t0:.1f} s", flush=True)
    return AnyReconComponents(vae, tr, clip, _Proc(), name="bench-random")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn, reps: int, device: str) -> float:
    """Mean wall time of ``fn()`` over ``reps`` back-to-back calls, the device synchronised around them."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Results:
    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.data = path, {"meta": meta}
        self.save()

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.save()
        print(key, json.dumps(value), flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def bench_attention_kernels(args, res: Results, device: str, layouts: dict, heads: int, head_dim: int) -> None:
    """One self-attention call of the full-size sequence per kernel; the exact kernels compared."""
    import torch.nn.functional as F

    ours, block = layouts["window_ours"], layouts["block"]
    L = ours.num_tokens
    q, k, v = (torch.randn(1, heads, L, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # token-major memory, as in the model
    dense = 4 * L * L * heads * head_dim
    cases = {
        "sdpa_full": (lambda: F.scaled_dot_product_attention(q, k, v), 1.0),
        "split_window_ours": (lambda: window_attention_split(qt, kt, vt, ours), window_density(ours)),
        "split_block": (lambda: mask_attention_split(qt, kt, vt, block), window_density(block)),
    }
    tables = {}
    if wa.paged_attention_available():
        tables = {name: wa.paged_window_table(lay, device=device) for name, lay in layouts.items()}
        cases["fa4_full"] = (lambda: wa.full_attention_fa4(qt, kt, vt), 1.0)
        for name, lay in layouts.items():
            cases[f"paged_{name}"] = (
                functools.partial(wa.window_attention_paged, q, k, v, *tables[name], lay.tokens_per_frame),
                window_density(lay),
            )  # head-major q, k, v [1, heads, L, D], as the processor passes them
    out = {}
    for name, (fn, density) in cases.items():
        if args.kernels and name not in args.kernels.split(","):
            continue
        try:
            first = seconds_per_call(fn, 1, device)  # plans, JIT compiles
            sec = seconds_per_call(fn, args.attn_reps, device)
            out[name] = {
                "ms": round(sec * 1e3, 2),
                "first_call_s": round(first, 2),
                "density": round(density, 4),
                "tflops": round(dense * density / sec / 1e12, 1),
            }
        except Exception as e:  # a kernel this GPU or build lacks: record and go on
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        res.put("attention_kernels", out)

    def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
        d = (a.float() - b.float()).abs()
        return {"max_abs": round(float(d.max()), 5), "mean_abs": float(d.mean())}

    try:  # the exact kernels of one pattern must agree (bf16 rounding apart)
        if tables:
            sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
            out["fa4_vs_sdpa_full"] = diff(wa.full_attention_fa4(qt, kt, vt), sdpa)
            for name, lay in layouts.items():
                split = (window_attention_split if name == "window_ours" else mask_attention_split)(qt, kt, vt, lay)
                paged = wa.window_attention_paged(q, k, v, *tables[name], lay.tokens_per_frame).transpose(1, 2)
                out[f"paged_vs_split_{name}"] = diff(paged, split)
        out["split_lse_kernels"] = dict(wa.LSE_KERNELS)
    except Exception as e:
        out["check_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    res.put("attention_kernels", out)
    del q, k, v, qt, kt, vt


def bench_denoise(
    args, res: Results, key: str, gen: AnyReconGenerator, inputs: dict, device: str, flops: float, warmup_steps: int
) -> torch.Tensor | None:
    """Time the denoising loop (a step ends when the transformer's forward returns); the latents back."""
    y, pe, ie, num_memory = inputs["y"], inputs["prompt_embeds"], inputs["image_embeds"], inputs["num_memory"]
    try:
        if warmup_steps:
            t0 = time.perf_counter()
            gen.denoise(y, pe, ie, num_steps=warmup_steps, seed=0, num_memory=num_memory)
            sync(device)
            warm = time.perf_counter() - t0
        else:
            warm = 0.0
        reset_peak(device)
        stamps: list[float] = []

        def on_forward(*_) -> None:
            sync(device)
            stamps.append(time.perf_counter())

        hook = gen.components.transformer.register_forward_hook(on_forward)
        sync(device)
        t0 = time.perf_counter()
        try:
            lat = gen.denoise(y, pe, ie, num_steps=args.steps, seed=0, num_memory=num_memory)
        finally:
            hook.remove()
        sync(device)
        total = time.perf_counter() - t0
        steps = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
        res.put(
            key,
            {
                "steps": args.steps,
                "total_s": round(total, 2),
                "step_s": [round(s, 2) for s in steps],
                "warmup_s": round(warm, 1),
                "warmup_steps": warmup_steps,
                "peak_gb": round(peak_gb(device), 2),
                "tflops": round(flops / (sum(steps) / len(steps)) / 1e12, 1),
                "pflop_per_step": round(flops / 1e15, 2),
                "finite": bool(torch.isfinite(lat).all()),
            },
        )
        return lat
    except Exception as e:
        res.put(key, {"error": f"{type(e).__name__}: {str(e)[:300]}"})
        return None


def kernel_category(name: str) -> str:
    """Coarse class of a CUDA kernel by its name: attention, gemm, fused (inductor/Triton) or other."""
    n = name.lower()
    if any(k in n for k in ("sdpa", "fmha", "flash", "attn", "attention")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90_")):
        return "gemm"
    if n.startswith("triton"):
        return "fused"
    return "other"


def bench_gemms(res: Results, device: str, tokens: int, cfg: dict, reps: int = 10) -> None:
    """cuBLAS bf16 rates of the block's big linear layers at this token count (F.linear with bias)."""
    d, ffn = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
    out = {}
    for name, (k, n) in {
        "q|k|v|o (each)": (d, d),
        "qkv fused": (d, 3 * d),
        "ffn in": (d, ffn),
        "ffn out": (ffn, d),
    }.items():
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        b = torch.zeros(n, device=device, dtype=torch.bfloat16)
        linear = functools.partial(torch.nn.functional.linear, x, w, b)
        seconds_per_call(linear, 2, device)  # warm-up (cuBLAS heuristics)
        t = statistics.median(seconds_per_call(linear, 1, device) for _ in range(reps))
        out[name] = {"ms": round(t * 1e3, 2), "tflops": round(2 * tokens * k * n / t / 1e12, 1)}
        if name == "ffn in":  # the tanh GELU after it: separate, or in cuBLASLt's epilogue
            for label, fn in {
                "ffn in + gelu": lambda: torch.nn.functional.gelu(
                    torch.nn.functional.linear(x, w, b), approximate="tanh"
                ),
                "ffn in + gelu epilogue": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
            }.items():
                seconds_per_call(fn, 1, device)
                out[label] = {"ms": round(seconds_per_call(fn, reps, device) * 1e3, 2)}
            ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b).float(), approximate="tanh")
            out["gelu_epilogue_max_abs"] = round(
                float((torch._addmm_activation(b, x, w.t(), use_gelu=True).float() - ref).abs().max()), 5
            )
        del x, w, b
    res.put("gemms", out)


def bench_fa4_tiles(args, res: Results, device: str, layout: WindowLayout, heads: int, head_dim: int) -> None:
    """FlashAttention-4 tile shapes for the paged window call (page = key tile) and for full attention."""
    from flash_attn.cute.interface import _flash_attn_fwd

    L, T = layout.num_tokens, layout.tokens_per_frame
    q, k, v = (torch.randn(1, L, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    dens = window_density(layout)
    dense = 4 * L * L * heads * head_dim
    ref = wa.window_attention_split(q, k, v, layout)
    out = {}
    for m, n, rs, ol in [
        (128, 128, True, True),
        (128, 128, False, True),
        (128, 112, True, True),
        (128, 224, True, True),
        (128, 256, True, True),
        (128, 176, True, True),
        (128, 192, True, True),
        (192, 128, True, True),
    ]:
        paged = T % n == 0
        name = f"{'paged' if paged else 'full'}_{m}x{n}{'_rs' if rs else ''}{'_ol' if ol else ''}"
        try:
            if paged:
                table, used = wa.paged_window_table(layout, page_tokens=n, device=device)
                qa, ka, va = (
                    q.view(L // T, T, heads, head_dim),
                    k.view(L // n, n, heads, head_dim),
                    v.view(L // n, n, heads, head_dim),
                )
                kw = dict(page_table=table, seqused_k=used)
            else:
                qa, ka, va, kw = q, k, v, {}

            def fn():
                return _flash_attn_fwd(qa, ka, va, tile_mn=(m, n), mma_pv_is_rs=rs, intra_wg_overlap=ol, **kw)[0]

            o = fn()  # JIT-compiles this tile shape
            sec = seconds_per_call(fn, args.attn_reps, device)
            r = {"ms": round(sec * 1e3, 2), "tflops": round(dense * (dens if paged else 1.0) / sec / 1e12, 1)}
            if paged:
                r["max_abs_vs_split"] = round(float((o.reshape(ref.shape).float() - ref.float()).abs().max()), 5)
            out[name] = r
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        res.put("fa4_tiles", out)
    del q, k, v, ref


def bench_fa4_paging(args, res: Results, device: str, layout: WindowLayout, heads: int, head_dim: int) -> None:
    """What paging costs FlashAttention-4: 50 query frames of 1792 tokens each reading 310 key tiles (the
    window layout's mean), as dense batches, as pages without and with ``seqused_k``; and as tiles read
    in the window layout's own order."""
    from flash_attn.cute.interface import _flash_attn_fwd

    F_, T, P = layout.num_frames, layout.tokens_per_frame, 310
    q = torch.randn(F_, T, heads, head_dim, device=device, dtype=torch.bfloat16)
    page = wa.PAGE_TOKENS
    kd, vd = (torch.randn(F_, P * page, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    flops = 4 * F_ * T * P * page * heads * head_dim
    pages = (kd.view(F_ * P, page, heads, head_dim), vd.view(F_ * P, page, heads, head_dim))
    own = torch.arange(F_ * P, device=device, dtype=torch.int32).view(F_, P)  # each frame its own tiles, in order
    shuffled = own.flatten()[torch.randperm(F_ * P, device=device)].view(F_, P).contiguous()
    used = torch.full((F_,), P * page, device=device, dtype=torch.int32)
    cases = {
        "dense_batch": lambda: _flash_attn_fwd(q, kd, vd)[0],
        "paged_own": lambda: _flash_attn_fwd(q, *pages, page_table=own)[0],
        "paged_own_seqused": lambda: _flash_attn_fwd(q, *pages, page_table=own, seqused_k=used)[0],
        "paged_shuffled": lambda: _flash_attn_fwd(q, *pages, page_table=shuffled)[0],
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            sec = seconds_per_call(fn, args.attn_reps, device)
            out[name] = {"ms": round(sec * 1e3, 2), "tflops": round(flops / sec / 1e12, 1)}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        res.put("fa4_paging", out)
    del q, kd, vd, pages


def profile_denoise(res: Results, key: str, gen: AnyReconGenerator, inputs: dict, device: str) -> None:
    """One denoising step under the torch profiler: GPU time by kernel class, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    y, pe, ie, num_memory = inputs["y"], inputs["prompt_embeds"], inputs["image_embeds"], inputs["num_memory"]
    try:
        gen.denoise(y, pe, ie, num_steps=1, seed=0, num_memory=num_memory)  # compile for this shape
        sync(device)
        cuda = device.startswith("cuda")  # on CPU (code-path check) the operators' own CPU time
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            gen.denoise(y, pe, ie, num_steps=1, seed=0, num_memory=num_memory)
            sync(device)
        ms = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        events = [e for e in prof.key_averages() if ms(e) > 0]
        by_class: dict[str, float] = {}
        for e in events:
            c = kernel_category(e.key)
            by_class[c] = by_class.get(c, 0.0) + ms(e) / 1e6
        top = sorted(events, key=lambda e: -ms(e))[:25]
        res.put(
            key,
            {
                "gpu_s_by_class": {k: round(v, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
                "gpu_s_total": round(sum(by_class.values()), 3),
                "top_kernels": [
                    {"name": e.key[:120], "class": kernel_category(e.key), "calls": e.count, "s": round(ms(e) / 1e6, 4)}
                    for e in top
                ],
            },
        )
    except Exception as e:
        res.put(key, {"error": f"{type(e).__name__}: {str(e)[:300]}"})


# ---------------------------------------------------------------------------------------------- --gpus
SP_TINY_HEADS = 8  # the tiny model's heads under --gpus: divisible by 1, 2, 4, 8 ranks


def build_sp_generator(args, mode: str, *, device: torch.device) -> AnyReconGenerator:
    """One rank's generator for --gpus (``mode``: full, block, or block_<kernel>): the same random weights
    in every rank (seeded), on ``device``."""
    attention, _, kernel = mode.partition("_")
    base = dict(sparse_kernel=kernel or "auto", compile_blocks=args.compile_blocks, height=None, width=None)
    if args.tiny:
        from backend.generators.tiny import tiny_anyrecon_generator

        cfg = AnyReconConfig(attention=attention, **base)
        return tiny_anyrecon_generator(cfg, device=device, num_heads=SP_TINY_HEADS)
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    tr = build_transformer(WAN_I2V_14B, str(device), torch.bfloat16)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16)  # the denoise loop reads only the VAE's config

    class _Proc:
        image_mean = image_std = [0.5, 0.5, 0.5]

    comps = AnyReconComponents(vae, tr, None, _Proc(), name="bench-sp")
    return AnyReconGenerator(comps, AnyReconConfig(attention=attention, dtype="bfloat16", **base), device=device)


def bench_sequence_parallel(args, res: Results, device: str) -> None:
    """The 4-step denoise on 1, 2, 4, 8 ... GPUs (``--gpus``), each count a fresh group; see the module docstring."""
    from backend.generators.sequence_parallel import SequenceParallelGroup, peak_memory_bytes

    counts = [int(n) for n in args.gpus.split(",")]
    n = args.memory + args.targets
    h, w = args.height // 8, args.width // 8
    for mode in args.sp_modes.split(","):
        build = functools.partial(build_sp_generator, args, mode)
        ref = None
        for world in counts:
            key = f"sp_{mode}_gpus{world}"
            devices = [torch.device(device if device == "cpu" else f"cuda:{r}") for r in range(world)]
            group = None
            try:
                if world == 1:
                    gen = build(device=devices[0])
                else:  # CPU ranks fork (seconds); CUDA needs fresh interpreters
                    start = "fork" if device == "cpu" else "spawn"
                    group = SequenceParallelGroup(build, devices, start_method=start)
                    gen = group.generator
                tc = gen.components.transformer.config
                g = torch.Generator().manual_seed(0)
                dt = gen.dtype
                y = torch.randn(1, 20, n, h, w, generator=g).to(devices[0])
                pe = torch.randn(1, TEXT_TOKENS, tc.text_dim, generator=g).to(devices[0], dt)
                ie = torch.randn(1, CLIP_TOKENS if not args.tiny else 17, tc.image_dim, generator=g).to(devices[0], dt)
                t0 = time.perf_counter()
                gen.denoise(y, pe, ie, num_steps=1, seed=0, num_memory=args.memory)  # compiles, plans
                sync(device)
                warm = time.perf_counter() - t0
                reset_peak(device)
                if group is not None:
                    group.peak_memory_bytes(reset=True)
                sync(device)
                t0 = time.perf_counter()
                lat = gen.denoise(y, pe, ie, num_steps=args.steps, seed=0, num_memory=args.memory)
                sync(device)
                total = time.perf_counter() - t0
                peaks = group.peak_memory_bytes() if group is not None else [peak_memory_bytes(devices[0])]
                lat = lat.float().cpu()
                tokens = n * (h // tc.patch_size[1]) * (w // tc.patch_size[2])
                layout = WindowLayout(n, tokens // n, args.memory, pattern="block")
                cfg_dict = {k: tc[k] for k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers")}
                density = window_density(layout) if not mode.startswith("full") else 1.0
                flops = flops_per_step(cfg_dict, tokens, density) * args.steps
                out = {
                    "gpus": world,
                    "steps": args.steps,
                    "total_s": round(total, 4),
                    "warmup_s": round(warm, 1),
                    "peak_gb_per_gpu": [round(p / 2**30, 2) for p in peaks],
                    "tflops_per_gpu": round(flops / total / world / 1e12, 1),
                    "finite": bool(torch.isfinite(lat).all()),
                }
                if ref is None:
                    ref = (world, total, lat)
                else:
                    out["scaling_efficiency"] = round(ref[1] * ref[0] / (total * world), 3)
                    out[f"max_abs_vs_gpus{ref[0]}"] = float((lat - ref[2]).abs().max())
                    out[f"mean_abs_vs_gpus{ref[0]}"] = float((lat - ref[2]).abs().mean())
                    out["latent_mean_abs"] = float(lat.abs().mean())
                res.put(key, out)
            except Exception as e:  # one count failing (memory, a lost rank) must not lose the others
                res.put(key, {"error": f"{type(e).__name__}: {str(e)[:300]}"})
            finally:
                if group is not None:
                    group.close()
                gen = group = None
                gc.collect()
                reset_peak(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny random models at tiny sizes (CPU code-path check)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--targets", type=int, default=40)
    ap.add_argument("--memory", type=int, default=10)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--attn-reps", type=int, default=5)
    ap.add_argument(
        "--modes",
        default="kernels,stock,full,full_fa4,block,vae,fp8,group_offload",
        help="also: block_split, block_paged (the kernels auto picks from), window_ours (experimental), "
        "gemms (linear-layer rates), fa4_tiles (FlashAttention-4 tile shapes), profile (one full_fa4 step "
        "under the torch profiler)",
    )
    ap.add_argument("--kernels", default="", help="kernels mode: only these cases (comma-separated; default all)")
    ap.add_argument("--compile-blocks", action="store_true", help="torch.compile each block in our modes")
    ap.add_argument("--gpus", default="", help="sequence parallel: GPU counts to measure in turn, e.g. 1,2,4,8")
    ap.add_argument(
        "--sp-modes", default="full,block", help="--gpus: full, block (auto kernel), block_paged, block_split"
    )
    args = ap.parse_args()
    if args.tiny:
        args.height, args.width, args.targets, args.memory, args.window = 32, 48, 22, 2, 1  # 3 blocks of 8
    device = args.device
    modes = args.modes.split(",")
    torch.manual_seed(0)

    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "frames": {"memory": args.memory, "targets": args.targets},
        "size": [args.height, args.width],
        "steps": args.steps,
        "window": args.window,
    }
    if device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    import diffusers

    meta["diffusers"] = diffusers.__version__
    res = Results(args.out, meta)
    if args.gpus:
        bench_sequence_parallel(args, res, device)
        print("done", flush=True)
        # leave without running the closed process groups' C++ destructors, which the collector may run
        # at exit and which can block on gloo's worker threads once the followers are gone
        os._exit(0)

    comps = build_components(args, device)
    tcfg = comps.transformer.config
    n = args.memory + args.targets
    h, w = args.height // 8, args.width // 8
    tokens_per_frame = (h // tcfg.patch_size[1]) * (w // tcfg.patch_size[2])
    layouts = {
        "window_ours": WindowLayout(n, tokens_per_frame, args.memory, args.window),
        "block": WindowLayout(n, tokens_per_frame, args.memory, pattern="block"),
    }
    layout = layouts["window_ours"]
    density = {"full": 1.0, **{k: window_density(v) for k, v in layouts.items()}}
    cfg_dict = {k: tcfg[k] for k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers")}
    flops = {k: flops_per_step(cfg_dict, layout.num_tokens, d) for k, d in density.items()}
    res.put(
        "layout",
        {
            "tokens": layout.num_tokens,
            "tokens_per_frame": tokens_per_frame,
            "density": {k: round(d, 4) for k, d in density.items()},
            "pflop_per_step": {k: round(v / 1e15, 2) for k, v in flops.items()},
            "design_pflop_per_step": DESIGN_PFLOP,
        },
    )

    dtype = torch.float32 if args.tiny else torch.bfloat16
    inputs = {
        "y": torch.randn(1, 20, n, h, w, device=device),
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, tcfg.text_dim, device=device, dtype=dtype),
        "image_embeds": torch.randn(
            1, CLIP_TOKENS if not args.tiny else 17, tcfg.image_dim, device=device, dtype=dtype
        ),
        "num_memory": args.memory,
    }
    base = dict(dtype="float32" if args.tiny else "bfloat16", window_frames=args.window)

    if "kernels" in modes:
        bench_attention_kernels(args, res, device, layouts, tcfg.num_attention_heads, tcfg.attention_head_dim)
        reset_peak(device)
    if "fa4_tiles" in modes:
        bench_fa4_tiles(args, res, device, layout, tcfg.num_attention_heads, tcfg.attention_head_dim)
        reset_peak(device)
    if "fa4_paging" in modes:
        bench_fa4_paging(args, res, device, layout, tcfg.num_attention_heads, tcfg.attention_head_dim)
        reset_peak(device)
    if "gemms" in modes:
        bench_gemms(res, device, layout.num_tokens, cfg_dict)
        reset_peak(device)
    # mode -> (AnyReconConfig overrides, pattern for the FLOP count)
    denoise_modes = {
        "stock": (dict(attention="stock"), "full"),
        "full": (dict(attention="full", full_kernel="sdpa"), "full"),
        "full_fa4": (dict(attention="full", full_kernel="fa4"), "full"),
        "block": (dict(attention="block"), "block"),  # auto kernel
        "block_split": (dict(attention="block", sparse_kernel="split"), "block"),
        "block_paged": (dict(attention="block", sparse_kernel="paged"), "block"),
        "window_ours": (dict(attention="window_ours"), "window_ours"),
    }
    # in the order asked (a mode may repeat, to see order effects), stock first: our modes may compile the
    # blocks in place (--compile-blocks)
    asked = sorted((m for m in modes if m in denoise_modes), key=lambda m: m != "stock")
    latents: dict[str, torch.Tensor] = {}
    for i, mode in enumerate(asked):
        over, pattern = denoise_modes[mode]
        compiled = mode != "stock" and args.compile_blocks
        try:
            gen = AnyReconGenerator(comps, AnyReconConfig(**over, compile_blocks=compiled, **base), device=device)
        except ValueError as e:  # e.g. full_fa4 without FlashAttention-4
            res.put(f"denoise_{mode}", {"error": str(e)[:300]})
            continue
        key = f"denoise_{mode}" + ("_compiled" if compiled else "") + (f"_{i}" if asked.count(mode) > 1 else "")
        # one full-size step first: compiles what compiles for this shape, builds plans
        lat = bench_denoise(args, res, key, gen, inputs, device, flops[pattern], warmup_steps=1)
        if lat is not None:
            res.data[key]["density"] = round(density[pattern], 4)
            res.data[key]["kernel"] = gen.processor.backend if gen.processor is not None else "diffusers"
            for ref in ("stock", "full"):  # same seed, same inputs: only the attention differs
                if ref in latents and ref != mode:
                    d = (lat.float() - latents[ref].float()).abs()
                    res.data[key][f"vs_{ref}_max_abs"] = round(float(d.max()), 4)
                    res.data[key][f"vs_{ref}_mean_abs"] = round(float(d.mean()), 5)
            res.put(key, res.data[key])
            if mode in ("stock", "full"):
                latents[mode] = lat
        del gen, lat
        reset_peak(device)

    if "profile" in modes:
        gen = AnyReconGenerator(
            comps, AnyReconConfig(attention="full", compile_blocks=args.compile_blocks, **base), device=device
        )
        profile_denoise(res, "profile_full", gen, inputs, device)
        del gen
        reset_peak(device)

    if "vae" in modes:
        gen = AnyReconGenerator(comps, AnyReconConfig(attention="full", **base), device=device)
        video = torch.rand(n, 3, args.height, args.width, device=device) * 2 - 1
        out = {}
        try:
            gen.encode_image(video[0])
            sync(device)
            t0 = time.perf_counter()
            gen.encode_image(video[0])
            sync(device)
            out["clip_s"] = round(time.perf_counter() - t0, 3)
            gen.encode_frames(video[:1])
            reset_peak(device)
            t0 = time.perf_counter()
            lat = gen.encode_frames(video)
            sync(device)
            out["vae_encode_s"] = round(time.perf_counter() - t0, 2)
            out["vae_encode_frames"] = n
            t0 = time.perf_counter()
            gen.decode(lat[:, :, args.memory :].to(gen.dtype))  # tiled (30x52 latent tiles), bf16 blend
            sync(device)
            out["vae_decode_s"] = round(time.perf_counter() - t0, 2)
            out["vae_decode_frames"] = args.targets
            out["vae_peak_gb_with_transformer_resident"] = round(peak_gb(device), 2)
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res.put("encoders", out)
        del gen, video
        reset_peak(device)

    if "fp8" in modes:
        # fp8 storage, bf16 compute, full attention: the weights shrink to ~14 GB on the GPU.
        try:
            tr = comps.transformer
            comps.memory_mode = None  # the same models, set up again for fp8 (a benchmark may; the service reloads)
            gen = AnyReconGenerator(comps, AnyReconConfig(attention="full", memory_mode="fp8", **base), device=device)
            reset_peak(device)
            bench_denoise(args, res, "denoise_full_fp8", gen, inputs, device, flops["full"], warmup_steps=0)
            res.data["denoise_full_fp8"]["weights_gb"] = round(
                sum(p.numel() * p.element_size() for p in tr.parameters()) / 2**30, 2
            )
            res.save()
            del gen
        except Exception as e:
            res.put("denoise_full_fp8", {"error": f"{type(e).__name__}: {str(e)[:300]}"})
        reset_peak(device)

    if "group_offload" in modes:
        # Fresh bf16 weights on the CPU (the fp8 ones above are not the same model), streamed block by block.
        try:
            comps.transformer = tr = None
            gc.collect()
            torch.cuda.empty_cache() if device.startswith("cuda") else None
            t0 = time.perf_counter()
            tr = (
                build_transformer(WAN_I2V_14B, device, torch.bfloat16)
                if not args.tiny
                else build_components(args, "cpu").transformer
            )
            tr.to("cpu")
            comps.transformer, comps.memory_mode = tr, None
            gen = AnyReconGenerator(
                comps, AnyReconConfig(attention="full", memory_mode="group_offload", **base), device=device
            )
            setup = time.perf_counter() - t0
            reset_peak(device)
            key = "denoise_full_group_offload"
            bench_denoise(args, res, key, gen, inputs, device, flops["full"], warmup_steps=0)
            res.data[key]["setup_s"] = round(setup, 1)
            res.data[key]["under_24_gb"] = res.data[key].get("peak_gb", float("inf")) < 24
            res.put(key, res.data[key])
        except Exception as e:
            res.put("denoise_full_group_offload", {"error": f"{type(e).__name__}: {str(e)[:300]}"})
    print("done", flush=True)


if __name__ == "__main__":
    main()
