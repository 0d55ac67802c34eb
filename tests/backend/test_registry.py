"""Registries: a name's module imported on first use; what a contributor's mistakes and a missing package say."""

from __future__ import annotations

import sys

import pytest
import torch

from backend.registry import Registry
from backend.stages.generate import generate_segment
from backend.types import Cameras, Frames


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A folder on sys.path for throwaway modules: ``write(name, source)``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


def test_a_named_module_is_imported_on_first_use(modules):
    shapes: Registry[type] = Registry("shape")
    sys.modules["tests_shapes"] = type(sys)("tests_shapes")  # what the module's code registers into
    sys.modules["tests_shapes"].SHAPES = shapes
    try:
        name = modules("disk_shape", "from tests_shapes import SHAPES\n@SHAPES.register('disk')\nclass Disk: ...\n")
        shapes._modules["disk"] = name
        assert shapes.names() == ["disk"] and name not in sys.modules
        assert shapes.make("disk").__class__.__name__ == "Disk"
        # the map names a module that registers something else: said so, not "unknown; known: disk"
        shapes._modules["ring"] = name
        with pytest.raises(ValueError, match=rf"^shape 'ring': its module {name} registers no shape of that name$"):
            shapes.get("ring")
    finally:
        del sys.modules["tests_shapes"]


def test_a_module_whose_package_is_missing_names_the_package(modules):
    """A missing package is named; a missing module of the project's own package is its bug: the error stands."""
    name = modules("needs_missing", "import reconloop_not_installed_xyz\n")
    gens: Registry[type] = Registry("generator", {"big": name})
    with pytest.raises(
        ValueError, match=r"^generator 'big' needs reconloop_not_installed_xyz, which is not installed here$"
    ):
        gens.get("big")
    with pytest.raises(ModuleNotFoundError):  # the map names a module that does not exist
        Registry("generator", {"typo": "reconloop_no_such_module_xyz"}).get("typo")
    package = modules("rl_pkg_xyz", "")  # a module standing in for the project's package, and one of its own
    modules("rl_pkg_xyz_gen", "import rl_pkg_xyz.no_such_sibling\n")
    with pytest.raises(ModuleNotFoundError, match="rl_pkg_xyz"):
        Registry("generator", {"gen": package + ".no_such_sibling"}).get("gen")


class _Scripted:
    """A contributor's generator that returns ``frames`` whatever it is asked."""

    def __init__(self, frames: Frames) -> None:
        self.frames = frames

    def generate(self, cond, *, num_steps, seed, progress=None) -> Frames:
        return self.frames


F, H, W = 2, 4, 6
TARGETS = Cameras(torch.eye(4).expand(F, 4, 4), torch.eye(3).expand(F, 3, 3), W, H)


@pytest.mark.parametrize(
    "images, confidence, message",
    [
        (torch.rand(F, H, W, 3), torch.rand(F, H, W, 1), r"Frames\.confidence must be \[2, 4, 6\]; got \(2, 4, 6, 1\)"),
        (torch.rand(F, W, H, 3), torch.rand(F, H, W), r"Frames\.images must be \[2, 4, 6, 3\]; got \(2, 6, 4, 3\)"),
        (torch.full((F, H, W, 3), float("nan")), torch.rand(F, H, W), r"Frames\.images must be finite in \[0, 1\]"),
        (torch.rand(F, H, W, 3) * 255, torch.rand(F, H, W), r"Frames\.images must be finite in \[0, 1\]; got values"),
        (torch.rand(F, H, W, 3), torch.rand(F, H, W) * 3, r"Frames\.confidence must be finite in \[0, 1\]"),
        (
            torch.randint(0, 2, (F, H, W, 3), dtype=torch.uint8),
            torch.rand(F, H, W),
            r"Frames\.images and Frames\.confidence must be floating point; got torch\.uint8 and torch\.float32",
        ),
    ],
)
def test_wrong_frames_are_refused_naming_the_generator(images, confidence, message):
    """The loop checks what a generator returns (backend.generators' docstring): a wrong shape, NaN, colours
    in 0..255 or a confidence over 1 fail at the generator, by name, instead of deep in the fit."""
    with pytest.raises(ValueError, match=f"^generator _Scripted: {message}"):
        generate_segment(
            _Scripted(Frames(images, confidence)), TARGETS, None, None, None, prompt="", num_steps=1, seed=0
        )
    # frames a rounding past 1 are taken, and colours in another float type than the confidence's
    for ok in (
        Frames(torch.rand(F, H, W, 3).clamp(max=1.0) + 1e-5, torch.rand(F, H, W)),
        Frames(torch.rand(F, H, W, 3).bfloat16(), torch.rand(F, H, W)),
    ):
        assert generate_segment(_Scripted(ok), TARGETS, None, None, None, prompt="", num_steps=1, seed=0) is ok
