"""Building generators from a job's GeneratorConfig and the service's weights: make_generator, the
GeneratorCache a server holds, serve's weight options and the job settings; clear errors, no hub."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from backend.generators import (
    ATTENTION_SETTINGS,
    GENERATORS,
    MEMORY_MODES,
    GeneratorCache,
    GeneratorConfig,
    GeneratorWeights,
    GeneratorWeightsError,
    make_generator,
)
from backend.generators.reproject import ReprojectGenerator
from backend.scene import SceneError, Settings
from protocol.settings import BY_NAME as SETTING_ROWS


def test_weightless_generator_is_built_from_its_config() -> None:
    assert isinstance(make_generator(GeneratorConfig("reproject")), ReprojectGenerator)
    assert isinstance(GeneratorCache().get(GeneratorConfig("reproject"), "cpu"), ReprojectGenerator)


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            {"name": "nope"},
            rf"GeneratorConfig.name must be one of \[{', '.join(map(repr, GENERATORS.names()))}\]; got 'nope'",
        ),
        ({"memory": "swap"}, "GeneratorConfig.memory must be one of"),
        ({"attention": "window"}, "GeneratorConfig.attention must be one of"),
        ({"num_steps": 0}, r"GeneratorConfig.num_steps must be in \[1, 1000\]; got 0"),
        ({"window_frames": -1}, "GeneratorConfig.window_frames"),
        ({"refine_seconds": 0}, r"GeneratorConfig.refine_seconds must be in \[1, 3600\]; got 0"),
    ],
)
def test_config_errors_name_the_field(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GeneratorConfig(**kw)
    with pytest.raises(ValueError, match="trained_attention"):
        GeneratorWeights(trained_attention="window")


def test_learned_generator_needs_components() -> None:
    with pytest.raises(ValueError, match="needs its loaded components"):
        make_generator(GeneratorConfig("anyrecon"))


def test_missing_weights_name_the_option_and_never_download(monkeypatch, tmp_path: Path) -> None:
    """A user error (a ValueError: the CLI prints one line) on one line (a job's message keeps its first),
    with the advice for ``run`` (the variable) and for ``serve`` (--weights)."""
    monkeypatch.delenv("RECONLOOP_ALLOW_DOWNLOAD", raising=False)
    cache = GeneratorCache({"anyrecon": GeneratorWeights(str(tmp_path / "no_such_folder"))})
    with pytest.raises(GeneratorWeightsError, match="--weights anyrecon=FOLDER") as info:
        cache.get(GeneratorConfig("anyrecon"), "cpu")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert "no_such_folder" in str(info.value) and cache.loaded is None
    assert "point RECONLOOP_ANYRECON_WEIGHTS at the weights folder (reconloop run)" in str(info.value)
    monkeypatch.setenv("RECONLOOP_ANYRECON_WEIGHTS", str(tmp_path / "from_env"))  # the fallback
    assert GeneratorCache().weights_for("anyrecon") == GeneratorWeights(str(tmp_path / "from_env"))
    with pytest.raises(GeneratorWeightsError, match="RECONLOOP_ANYRECON_WEIGHTS") as info:
        GeneratorCache().get(GeneratorConfig("anyrecon"), "cpu")
    assert "from_env" in str(info.value)


def anyrecon_scene(folder: Path) -> Path:
    """A scene folder of two posed 64x48 captures whose job asks for anyrecon, small enough that the
    loop reaches the generator in seconds."""
    import numpy as np

    from backend.scene import Camera, Capture, Scene, look_at, save_scene
    from tests.protocol.helpers import png_bytes

    (folder / "images").mkdir(parents=True)
    K = np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]])
    caps = []
    for i, x in enumerate((-0.2, 0.2)):
        (folder / "images" / f"p{i}.png").write_bytes(png_bytes(seed=i))
        caps.append(Capture(f"p{i}", folder / "images" / f"p{i}.png", Camera(look_at((x, 0.0, -3.0)), K, 64, 48)))
    settings = Settings.from_json(
        {"generator": "anyrecon", "width": 32, "height": 24, "guide": False, "gaussian_iterations": 1}
    )
    save_scene(Scene(root=folder, captures=caps, settings=settings), folder)
    return folder


def test_run_without_weights_is_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    """``reconloop run`` of an anyrecon job without usable weights: exit 2 and one line saying what to set,
    not the loader's chained tracebacks."""
    from backend.cli import main

    monkeypatch.delenv("RECONLOOP_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("RECONLOOP_ANYRECON_WEIGHTS", str(tmp_path / "nonexistent"))
    scene = anyrecon_scene(tmp_path / "scene")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "gaussians.ply").write_text("an earlier run's")
    assert main(["run", str(scene), "--out", str(tmp_path / "o"), "--device", "cpu", "--budget", "0"]) == 2
    # said before any work: the earlier results stay and nothing was written (it came after the guide's fits)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["gaussians.ply"]
    err = capsys.readouterr().err
    line = err.rstrip("\n").rsplit("\n", 1)[-1]  # after the progress bar's lines
    assert (
        line.startswith("reconloop run: generator 'anyrecon': cannot load its weights from ") and "nonexistent" in line
    )
    assert "RECONLOOP_ANYRECON_WEIGHTS" in line and "Traceback" not in err, err


def test_a_job_without_weights_fails_with_the_advice(tmp_path: Path, monkeypatch) -> None:
    """Through the service (its runner holds the GeneratorCache): the job fails, its message is the advice."""
    from backend.scene import load_scene
    from backend.service.options import GeneratorLoopRunner
    from backend.service.store import scene_message
    from protocol.client import Client
    from tests.protocol.helpers import running_service

    monkeypatch.delenv("RECONLOOP_ALLOW_DOWNLOAD", raising=False)
    runner = GeneratorLoopRunner(GeneratorCache({"anyrecon": GeneratorWeights(str(tmp_path / "no_such_folder"))}))
    with running_service(tmp_path / "jobs", runner=runner) as svc:
        with Client(svc.endpoint, timeout_ms=5000, retries=1) as client:
            job = client.submit(scene_message(load_scene(anyrecon_scene(tmp_path / "scene"))))
            client.watch(job, since=0)
            events = list(client.events(job))
    assert events[-1]["state"] == "failed"
    message = events[-1]["message"]
    assert message.startswith("GeneratorWeightsError: generator 'anyrecon': cannot load its weights from ")
    assert "no_such_folder" in message and "reconloop serve --weights anyrecon=FOLDER" in message, message


def test_a_missing_package_is_named_with_what_to_install(monkeypatch) -> None:
    """Without diffusers, loading anyrecon says what to install, not that its weights are bad."""
    import builtins

    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(ValueError) as err:
        GeneratorCache({"anyrecon": GeneratorWeights("/no/such/folder")}).get(GeneratorConfig("anyrecon"), "cpu")
    assert not isinstance(err.value, GeneratorWeightsError)
    assert (
        str(err.value)
        == "generator 'anyrecon': needs diffusers, which is not installed here (pip install 'reconloop[gpu]')"
    )


def test_a_leading_tilde_is_expanded(monkeypatch, tmp_path: Path) -> None:
    """``~`` in a weights path or LoRA path (from serve's options, the environment or Python) is the home
    folder: zsh and sh leave ``--weights anyrecon=~/m`` as typed, and nothing expands the variables."""
    monkeypatch.setenv("HOME", str(tmp_path))
    w = GeneratorWeights("~/models/wan", "~/models/anyrecon/full_attention.ckpt")
    assert (w.path, w.lora) == (str(tmp_path / "models/wan"), str(tmp_path / "models/anyrecon/full_attention.ckpt"))
    assert GeneratorWeights("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers").path == "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
    assert GeneratorWeights().path is None and GeneratorWeights().lora is None
    monkeypatch.setenv("RECONLOOP_ANYRECON_WEIGHTS", "~/m")
    monkeypatch.setenv("RECONLOOP_ANYRECON_LORA", "~/l.ckpt")
    assert GeneratorCache().weights_for("anyrecon") == GeneratorWeights(str(tmp_path / "m"), str(tmp_path / "l.ckpt"))
    from backend.service.options import serve_generator_weights

    args = _serve_args("--weights", "anyrecon=~/m", "--lora", "anyrecon=~/l.ckpt")
    assert serve_generator_weights(args)["anyrecon"] == GeneratorWeights(str(tmp_path / "m"), str(tmp_path / "l.ckpt"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.generators.tiny import save_diffusers_folder, tiny_anyrecon_components

    root = tmp_path_factory.mktemp("wan")
    save_diffusers_folder(tiny_anyrecon_components(0), root)
    return root


def test_cache_loads_once_per_weights_and_memory_mode(tiny_folder: Path) -> None:
    cache = GeneratorCache({"anyrecon": GeneratorWeights(str(tiny_folder))})
    a = cache.get(GeneratorConfig("anyrecon"), "cpu")
    b = cache.get(GeneratorConfig("anyrecon", attention="full", num_steps=2), "cpu")
    assert a.components is b.components  # attention and steps do not reload the models
    assert a.config.attention == "full" and a.config.height == 512 and a.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="attention 'block' needs weights trained with block"):
        cache.get(GeneratorConfig("anyrecon", attention="block"), "cpu")
    c = cache.get(GeneratorConfig("anyrecon", memory="model_offload"), "cpu")
    assert c.components is not a.components and cache.loaded[2] == "model_offload"
    assert c.config.memory_mode == "model_offload"
    with pytest.raises(ValueError, match="set up for memory_mode 'model_offload'"):
        make_generator(GeneratorConfig("anyrecon", memory="none"), c.components, "cpu")

    block = GeneratorCache({"anyrecon": GeneratorWeights(str(tiny_folder), trained_attention="block")})
    assert block.get(GeneratorConfig("anyrecon"), "cpu").config.attention == "block"  # auto follows the weights


def _serve_args(*argv: str) -> argparse.Namespace:
    from backend.service.options import add_generator_arguments

    p = argparse.ArgumentParser()
    add_generator_arguments(p)
    return p.parse_args(list(argv))


def test_serve_weight_options() -> None:
    from backend.service.options import serve_generator_weights

    args = _serve_args("--weights", "anyrecon=/m/wan", "--lora", "anyrecon=/m/full_attention.ckpt")
    assert serve_generator_weights(args) == {
        "anyrecon": GeneratorWeights("/m/wan", "/m/full_attention.ckpt", "full", allow_download=False)
    }
    args = _serve_args("--weights", "anyrecon=/m/wan", "--trained-attention", "anyrecon=block", "--allow-download")
    assert serve_generator_weights(args)["anyrecon"] == GeneratorWeights("/m/wan", None, "block", allow_download=True)
    with pytest.raises(ValueError, match="--lora must be NAME=VALUE"):
        serve_generator_weights(_serve_args("--lora", "/m/x.ckpt"))
    with pytest.raises(ValueError, match=r"unknown generator\(s\) \['wan'\]"):
        serve_generator_weights(_serve_args("--weights", "wan=/m"))


def test_job_settings_reach_the_generator_config() -> None:
    assert set(SETTING_ROWS["generator_memory"].choices) == set(MEMORY_MODES)
    assert set(SETTING_ROWS["generator_attention"].choices) <= set(ATTENTION_SETTINGS)
    s = Settings.from_json({"generator": "anyrecon", "generator_memory": "group_offload", "num_steps": 3})
    cfg = GeneratorConfig.from_settings(s)
    assert cfg == GeneratorConfig(
        "anyrecon", memory="group_offload", attention="auto", num_steps=3, gpus=0, refine_seconds=10
    )
    with pytest.raises(SceneError, match="settings.generator_memory: must be one of none, fp8, group_offload"):
        Settings.from_json({"generator_memory": "swap"})
    with pytest.raises(SceneError, match="settings.generator_attention: must be one of auto, full, block"):
        Settings.from_json({"generator_attention": "window_ours"})


def test_out_of_memory_while_loading_is_not_blamed_on_the_weights(monkeypatch) -> None:
    """A card too small for the weights: the job's "out of memory", not advice to point at another folder."""
    import torch

    from backend.generators.anyrecon import AnyReconGenerator

    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.50 GiB")

    monkeypatch.setattr(AnyReconGenerator, "load_components", classmethod(too_big))
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        GeneratorCache({"anyrecon": GeneratorWeights("/weights")}).get(GeneratorConfig("anyrecon"), "cpu")


def test_a_cache_lets_go_when_its_block_ends_and_keeps_the_blocks_error(monkeypatch, caplog) -> None:
    """``with GeneratorCache() as cache`` (run_loop's, for a generator it loads itself) clears the cache at the end;
    when the block failed, an error in clearing (a multi-GPU group's close) is logged, not raised in its place."""
    cleared = []
    with GeneratorCache() as cache:
        monkeypatch.setattr(cache, "clear", lambda: cleared.append(True))
    assert cleared == [True]

    def broken_clear():
        raise RuntimeError("the group's followers did not stop")

    with pytest.raises(ValueError, match="the job's own error"), GeneratorCache() as cache:
        monkeypatch.setattr(cache, "clear", broken_clear)
        raise ValueError("the job's own error")
    assert "letting go of the generator after an error" in caplog.text
