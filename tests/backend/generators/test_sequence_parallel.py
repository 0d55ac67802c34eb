"""Sequence parallelism on CPU (gloo): N ranks give the single-process denoise, within float32 rounding."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from backend.generators.anyrecon import AnyReconConfig
from backend.generators.sequence_parallel import (
    SequenceParallelGroup,
    resolve_gpus,
    token_shard_sizes,
)
from backend.generators.tiny import tiny_anyrecon_generator

ROOT = Path(__file__).resolve().parents[3]
N_FRAMES, N_MEMORY, LATENT_H, LATENT_W = 5, 2, 4, 6  # 2x3 tokens per frame, 30 tokens: uneven over 4 ranks
STEPS = 2
FP32_ATOL = 1e-5  # float32 on CPU: the shards' matmuls differ from the whole sequence's only in rounding

# processes of their own: one worker runs them; one torch thread (tests/conftest.py)
pytestmark = [pytest.mark.xdist_group("sequence_parallel"), pytest.mark.usefixtures("single_thread")]


def denoise_inputs(gen) -> dict:
    g = torch.Generator().manual_seed(1)
    tc = gen.components.transformer.config
    return {
        "y": torch.randn(1, 20, N_FRAMES, LATENT_H, LATENT_W, generator=g),
        "prompt_embeds": torch.randn(1, 512, tc.text_dim, generator=g),
        "image_embeds": torch.randn(1, 17, tc.image_dim, generator=g),
        "num_memory": N_MEMORY,
    }


def test_token_shard_sizes() -> None:
    assert token_shard_sizes(30, 4) == [8, 8, 7, 7]
    assert token_shard_sizes(89_600, 8) == [11_200] * 8
    assert sum(token_shard_sizes(89_600, 5)) == 89_600
    with pytest.raises(ValueError, match="3 tokens cannot be split over 4 ranks"):
        token_shard_sizes(3, 4)


@pytest.mark.parametrize(
    "world, attention, backend, guidance",
    [
        (2, "full", "auto", 1.0),
        (2, "block", "split", 1.0),  # AnyRecon's block-sparse pattern
        (4, "window_ours", "split", 1.0),
        (4, "full", "auto", 2.0),  # guidance: two forwards per step, both mirrored
    ],
)
def test_ranks_match_single_process(world: int, attention: str, backend: str, guidance: float) -> None:
    got = _isolated("ranks_match", world, attention, backend, guidance)
    assert got["world_size"] == world and got["peaks"] == [0] * world  # CPU: no accelerator memory to report
    assert got["shape"] == [1, 16, N_FRAMES, LATENT_H, LATENT_W] and got["ref_mean_abs"] > 0.1
    assert got["max_abs"] <= FP32_ATOL and not got["initialized_after"]


def test_spawned_group_is_kept_for_the_next_job() -> None:
    """The launch the service uses (spawned interpreters, as CUDA needs): two jobs on one group."""
    got = _isolated("kept_for_next_job")
    assert got["first_vs_ref"] <= FP32_ATOL and got["again_vs_first"] == 0.0 and not got["initialized_after"]


# Each multi-rank case runs in a process of its own, which leaves by os._exit once it has printed its
# result: a gloo process group's C++ destructor, run later by Python's garbage collector, can block on
# its worker threads after the followers are gone, and must not run inside the test process.
CASE_TIMEOUT_S = 240


def _isolated(case: str, *args) -> dict:
    code = (
        "import json, os, sys; from tests.backend.generators.test_sequence_parallel import _CASES; "
        f"out = _CASES[{case!r}](*{args!r}); print('RESULT ' + json.dumps(out), flush=True); os._exit(0)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _case_ranks_match(world: int, attention: str, backend: str, guidance: float) -> dict:
    torch.set_num_threads(1)
    cfg = AnyReconConfig(attention=attention, window_frames=1, sparse_kernel=backend, guidance_scale=guidance)
    build = functools.partial(tiny_anyrecon_generator, cfg, num_heads=4)
    ref_gen = build(device="cpu")
    inputs = denoise_inputs(ref_gen)
    negative = torch.randn_like(inputs["prompt_embeds"]) if guidance > 1 else None
    ref = ref_gen.denoise(**inputs, negative_embeds=negative, num_steps=STEPS, seed=0)
    with SequenceParallelGroup(build, ["cpu"] * world, start_method="fork") as group:
        got = group.generator.denoise(**inputs, negative_embeds=negative, num_steps=STEPS, seed=0)
        out = {"world_size": group.world_size, "peaks": group.peak_memory_bytes()}
    _KEEP.append(group)  # its process group is freed by os._exit, not by the collector
    return out | {
        "shape": list(got.shape),
        "ref_mean_abs": float(ref.abs().mean()),
        "max_abs": float((got - ref).abs().max()),
        "initialized_after": dist.is_initialized(),
    }


def _case_kept_for_next_job() -> dict:
    torch.set_num_threads(1)
    cfg = AnyReconConfig(attention="block", sparse_kernel="split")
    build = functools.partial(tiny_anyrecon_generator, cfg, num_heads=2)
    ref_gen = build(device="cpu")
    inputs = denoise_inputs(ref_gen)
    ref = ref_gen.denoise(**inputs, num_steps=1, seed=0)
    with SequenceParallelGroup(build, ["cpu", "cpu"], start_method="spawn") as group:
        first = group.generator.denoise(**inputs, num_steps=1, seed=0)
        group.check_alive()
        again = group.generator.denoise(**inputs, num_steps=1, seed=0)
    _KEEP.append(group)
    return {
        "first_vs_ref": float((first - ref).abs().max()),
        "again_vs_first": float((again - first).abs().max()),
        "initialized_after": dist.is_initialized(),
    }


_KEEP: list = []
_CASES = {"ranks_match": _case_ranks_match, "kept_for_next_job": _case_kept_for_next_job}


def test_bad_setups_fail_clearly() -> None:
    stock = functools.partial(tiny_anyrecon_generator, AnyReconConfig(attention="stock"))
    with pytest.raises(ValueError, match="attention must be one of our processor's modes"):
        SequenceParallelGroup(stock, ["cpu", "cpu"], start_method="fork")
    assert not dist.is_initialized()
    three_heads = functools.partial(tiny_anyrecon_generator, AnyReconConfig(attention="full"), num_heads=3)
    with pytest.raises(ValueError, match="3 attention heads must divide by the ranks"):
        SequenceParallelGroup(three_heads, ["cpu", "cpu"], start_method="fork")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="at least 2 ranks"):
        SequenceParallelGroup(stock, ["cpu"])
    with pytest.raises(ValueError, match="start_method"):
        SequenceParallelGroup(stock, ["cpu", "cpu"], start_method="thread")
    assert resolve_gpus(0, "cpu") == 1 and resolve_gpus(4, "cpu") == 1  # off CUDA a job runs in one process


def test_bench_gpus_smoke(tmp_path: Path) -> None:
    """``bench_generator.py --gpus`` on CPU at the tiny size: every world size's time, memory and agreement."""
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "scripts/bench_generator.py",
        "--tiny",
        "--device",
        "cpu",
        "--gpus",
        "1,2",
        "--sp-modes",
        "block",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    one, two = res["sp_block_gpus1"], res["sp_block_gpus2"]
    assert one["total_s"] > 0 and two["total_s"] > 0 and two["finite"]
    assert two["peak_gb_per_gpu"] == [0.0, 0.0]
    assert two["max_abs_vs_gpus1"] < FP32_ATOL
    assert two["scaling_efficiency"] == pytest.approx(one["total_s"] / (2 * two["total_s"]), rel=0.05)


def test_gpus_is_a_job_setting() -> None:
    from backend.loop import LoopConfig
    from backend.scene import SceneError, Settings

    assert Settings().gpus == 0  # all of the worker's GPUs
    assert LoopConfig.from_settings(Settings.from_json({"gpus": 4})).generator.gpus == 4
    with pytest.raises(SceneError, match=r"settings.gpus: must be in \[0, 64\]; got -1"):
        Settings.from_json({"gpus": -1})
