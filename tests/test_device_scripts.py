"""The device machine's helper scripts that run on the dev machine too: gsplat's prebuilt kernels."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    """A module of scripts/ (imported with the folder on the path, as the script runs)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _prebuilt():
    return _script("gsplat_prebuilt")


def test_shim_makes_the_library_the_module_gsplat_imports_first(tmp_path: Path, monkeypatch) -> None:
    """``from gsplat import csrc`` (gsplat/cuda/_backend.py's first try) gets the carried library itself:
    a Python file stands in for the .so here (the loader is chosen by the file's suffix)."""
    prebuilt = _prebuilt()
    lib = tmp_path / "gsplat_cuda.py"
    lib.write_text("def rasterize():\n    return 'kernel'\n")
    package = tmp_path / "site" / "fake_gsplat"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "csrc.py").write_text(prebuilt.shim(str(lib)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from fake_gsplat import csrc  # type: ignore[import-not-found]

    assert csrc.rasterize() == "kernel" and csrc.__name__ == prebuilt.NAME
    sys.modules.pop("fake_gsplat.csrc", None)
    sys.modules.pop("fake_gsplat", None)


def test_stamp_names_torch_gsplat_and_the_architectures(monkeypatch) -> None:
    """device_env.sh loads a carried build only where the stamp matches this machine's."""
    import torch

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    stamp = _prebuilt().stamp()
    assert stamp.startswith(f"torch {torch.__version__} gsplat ") and stamp.endswith(" arch 9.0")
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "gsplat_prebuilt.py"), "built"], capture_output=True, text=True, check=True
    )
    built = out.stdout.strip()  # '' where this machine never compiled gsplat (no CUDA here)
    assert built == "" or (built.endswith("/gsplat_cuda.so") and Path(built).is_file()), built


def test_jobs_dry_run_lists_the_processes_a_pattern_selects(tmp_path: Path) -> None:
    """``JOBS_DRY=1 gpu_runs.sh jobs SPEC`` names each process a call would start, with "default" first
    whether the line names it or not, and sets nothing up; a pattern that matches no line is an error.
    In grep's basic patterns ``|`` is a plain character and ``\\|`` is "or" (run 57 lost a call to it)."""
    spec = tmp_path / "spec.txt"
    spec.write_text("# a comment\ntemple|default,one guide|0\n\nfern|one guide|1|--size 64x48\n")

    def dry(pattern: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "JOBS_DRY": "1", "JOBS_MATCH": pattern, "OUT": str(tmp_path / "out")}
        cmd = ["bash", str(SCRIPTS / "gpu_runs.sh"), "jobs", str(spec)]
        return subprocess.run(cmd, cwd=SCRIPTS.parent, env=env, capture_output=True, text=True)

    fern = dry("^fern|")
    assert fern.returncode == 0 and fern.stdout.splitlines() == [
        "1 process:",
        "  fern seed 1: default, one guide (--size 64x48)",
    ]
    assert dry("^temple\\|^fern").stdout.startswith("2 processes at once:\n  temple seed 0: default, one guide\n")
    assert dry("^fern\\|").stdout.startswith("2 processes")  # the empty alternative matches every line
    missing = dry("^door|")
    assert missing.returncode == 1 and f"jobs: no line of {spec} matches" in missing.stderr
    spec.unlink()
    assert f"jobs: the spec file '{spec}' does not exist" in dry("^fern|").stderr
    assert not (tmp_path / "out").exists()  # no set-up ran


def test_fit_steps_profiles_a_window_of_a_whole_fit(temple_dir: Path, tmp_path: Path) -> None:
    """scripts/bench_fit_steps.py --profile-steps: the window starts at the fit's middle third, not a fit as
    short as the window (whose schedules, shares of the run, would densify every few steps); a window past
    the fit's end is refused before anything runs."""
    cmd = [sys.executable, str(SCRIPTS / "bench_fit_steps.py"), "--data", str(temple_dir), "--device", "cpu"]
    cmd += ["--size", "64x48", "--iterations", "30", "--sets", "3", "--sync-steps", "0", "--out", str(tmp_path)]
    done = subprocess.run([*cmd, "--profile-steps", "5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "profile_sets3.txt").read_text()
    assert text.startswith("3 set(s): steps 10 to 15 of 30\n")
    assert re.search(r"^\s+5\s.*fit\.py:\d+\(draw\)$", text, re.M), text  # the window's 5 rasterizer calls
    report = (tmp_path / "fit_steps.json").read_text()
    assert '"profiled_per_step"' in report and '"wall_ms"' in report
    refused = subprocess.run([*cmd, "--profile-steps", "21"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--profile-steps: at most 20, a window from step 10 of 30" in refused.stderr


def test_fit_steps_profile_restores_the_fit_and_keeps_the_fits_own_error(tmp_path: Path, monkeypatch) -> None:
    """The rasterizer's classmethod is put back as it was, the fit stops at the window's end, and a fit that fails
    before the window opens raises its own error, not the profiler's for stopping a trace it never started."""
    import pytest
    import torch

    from backend.stages import fit
    from backend.stages.fit import FitConfig
    from backend.types import Cameras, GeometryMemory, Views

    bench = _script("bench_fit_steps")
    w2c = torch.eye(4).repeat(2, 1, 1)
    w2c[1, 0, 3] = 0.1
    cams = Cameras(w2c, torch.tensor([[20.0, 0, 12], [0, 20, 8], [0, 0, 1]]).repeat(2, 1, 1), 24, 16)
    views = Views(torch.rand(2, 16, 24, 3), cams, [0, 1])
    memory = GeometryMemory(
        torch.randn(60, 3) * 0.2 + torch.tensor([0, 0, 2.0]), torch.rand(60, 3), torch.ones(60), torch.zeros(60).int()
    )
    cfg = FitConfig(iterations=9, rasterizer="torch_cpu", sh_degree=1)
    before = fit._SetsRender.__dict__["draw"]
    per_step = bench.profile_sets(views, memory, cfg, 2, torch.device("cpu"), tmp_path, 3)
    assert fit._SetsRender.__dict__["draw"] is before and per_step["wall_ms"] > 0
    assert (tmp_path / "profile_sets2.txt").read_text().startswith("2 set(s): steps 3 to 6 of 9\n")
    calls = []

    def drawing(cls, *args, **kwargs):  # every rasterizer call of the fit, the window's and the rest
        calls.append(1)
        return before.__func__(cls, *args, **kwargs)

    monkeypatch.setattr(fit._SetsRender, "draw", classmethod(drawing))
    bench.profile_sets(views, memory, cfg, 2, torch.device("cpu"), tmp_path, 3)
    assert len(calls) == 6  # steps 0 to 5: the fit stops at the window's end, not at its 9th step
    monkeypatch.setattr(fit._SetsRender, "draw", before)

    def fails(*args, **kwargs):
        raise RuntimeError("the fit's own error")

    monkeypatch.setattr(bench, "fit_sets", fails)
    with pytest.raises(RuntimeError, match="the fit's own error"):
        bench.profile_sets(views, memory, cfg, 2, torch.device("cpu"), tmp_path, 3)
    assert fit._SetsRender.__dict__["draw"] is before
