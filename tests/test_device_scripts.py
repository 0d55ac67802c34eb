"""The device machine's helper scripts that run on the dev machine too: gsplat's prebuilt kernels."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _prebuilt():
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module("gsplat_prebuilt")
    finally:
        sys.path.pop(0)


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
