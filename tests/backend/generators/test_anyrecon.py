"""The AnyRecon generator with tiny random Wan components, on the real temple, inside the loop by name."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backend.generators import GENERATORS, Generator, GeneratorConfig, make_generator
from backend.generators.anyrecon import AnyReconConfig, AnyReconGenerator
from backend.generators.tiny import tiny_anyrecon_components
from backend.types import Cameras, ConditionVideo, Renders, Views

W, H = 64, 48  # multiples of 16: no resizing
N_MEMORY, N_CARRIED, N_TARGETS = 2, 1, 3


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; two pytest workers share two cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def components():
    return tiny_anyrecon_components(0)


@pytest.fixture(scope="module")
def temple_cond(tmp_path_factory: pytest.TempPathFactory) -> ConditionVideo:
    """Real temple photos and cameras: 2 captures as memory, 1 carried frame, 3 targets whose
    'renders' are their photos with only the left part visible."""
    from backend.formats import import_scene
    from tests.conftest import require_shared_data

    scene = import_scene("middlebury", require_shared_data("middlebury_temple"), tmp_path_factory.mktemp("temple"))
    caps = scene.captures[: N_MEMORY + N_CARRIED + N_TARGETS]
    images = (
        torch.tensor(
            np.stack([np.asarray(Image.open(c.image).convert("RGB").resize((W, H), Image.BILINEAR)) for c in caps]),
            dtype=torch.float32,
        )
        / 255.0
    )
    cams = Cameras.from_scene([c.camera for c in caps], W, H)
    m, p = N_MEMORY, N_MEMORY + N_CARRIED
    mask = torch.zeros(N_TARGETS, H, W, dtype=torch.bool)
    for j in range(N_TARGETS):
        mask[j, :, : W // 3 + 8 * j] = True  # a different visible part per target
    renders = Renders(
        rgb=images[p:] * mask[..., None], depth=mask.float(), mask=mask, source=torch.where(mask, 0, -1).to(torch.int32)
    )
    return ConditionVideo(
        targets=cams[list(range(p, len(caps)))],
        renders=renders,
        memory=Views(images[:m], cams[list(range(m))], list(range(m))),
        carried=Views(images[m:p], cams[list(range(m, p))], [-1] * N_CARRIED),
        prompt="a temple",
    )


def _gen(components, tmp_path: Path, **kw) -> AnyReconGenerator:
    kw = {"height": None, "width": None, **kw}  # the cameras' size: no resizing
    return AnyReconGenerator(components, AnyReconConfig(text_cache_dir=str(tmp_path / "text"), **kw))


def test_registered_by_name(components, tmp_path: Path) -> None:
    cls = GENERATORS.get("anyrecon")
    assert cls is AnyReconGenerator
    gen = make_generator(GeneratorConfig("anyrecon"), components, "cpu")
    assert isinstance(gen, AnyReconGenerator) and isinstance(gen, Generator)
    assert gen.config.attention == "full"  # auto: the weights' trained attention


def test_condition_layout_seen_by_transformer(components, temple_cond: ConditionVideo, tmp_path: Path) -> None:
    """36 channels = [noise 16 ; mask 4 ; latents 16]; frames [memory ; carried ; targets]; one latent per
    frame; mask nearest-downsampled, ones for memory and carried; CLIP of frame 0; shifted timesteps."""
    gen = _gen(components, tmp_path, attention="window_ours", window_frames=1)
    seen: list[dict] = []
    hook = components.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}),
        with_kwargs=True,
    )
    try:
        out = gen.generate(temple_cond, num_steps=2, seed=0)
    finally:
        hook.remove()
    n = N_MEMORY + N_CARRIED + N_TARGETS
    assert len(seen) == 2  # no CFG: one call per step
    x = seen[0]["hidden_states"]
    assert x.shape == (1, 36, n, H // 8, W // 8)
    # timesteps: sigmas 1, 0.5 shifted by 5 -> 1, 5/6
    torch.testing.assert_close(torch.stack([s["timestep"][0] for s in seen]), torch.tensor([1000.0, 5000.0 / 6.0]))
    mask = x[0, 16:20]  # [4, N, h, w]
    assert torch.equal(mask[0], mask[3])
    assert (mask[:, : N_MEMORY + N_CARRIED] == 1).all()
    want = F.interpolate(temple_cond.renders.mask[:, None].float(), size=(H // 8, W // 8), mode="nearest")[:, 0]
    assert torch.equal(mask[0, N_MEMORY + N_CARRIED :], want)
    # one latent per frame, in order: each equals that frame encoded alone
    frames = torch.cat([temple_cond.memory.images, temple_cond.carried.images, temple_cond.renders.rgb])
    for i in range(n):
        alone = gen.encode_frames(frames[i : i + 1].permute(0, 3, 1, 2) * 2 - 1)[0, :, 0]
        torch.testing.assert_close(x[0, 20:, i], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x[0, 20:, 0], x[0, 20:, 1])
    # CLIP feature of frame 0 (the first retrieved capture)
    clip0 = gen.encode_image(temple_cond.memory.images[0].permute(2, 0, 1) * 2 - 1)
    torch.testing.assert_close(seen[0]["encoder_hidden_states_image"], clip0)
    assert seen[0]["encoder_hidden_states"].shape == (1, 512, 32)
    # output at the targets, confidence 1 where rendered
    assert out.images.shape == (N_TARGETS, H, W, 3) and out.confidence.shape == (N_TARGETS, H, W)
    assert out.images.dtype == torch.float32 and 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    torch.testing.assert_close(out.confidence, torch.where(temple_cond.renders.mask, 1.0, 0.5))


def test_seed_attention_modes_and_guidance(components, temple_cond: ConditionVideo, tmp_path: Path) -> None:
    a = _gen(components, tmp_path, attention="full").generate(temple_cond, num_steps=2, seed=3)
    b = _gen(components, tmp_path, attention="stock").generate(temple_cond, num_steps=2, seed=3)
    c = _gen(components, tmp_path, attention="window_ours", window_frames=8).generate(temple_cond, num_steps=2, seed=3)
    e = _gen(components, tmp_path, attention="block").generate(temple_cond, num_steps=2, seed=3)
    d = _gen(components, tmp_path, attention="full").generate(temple_cond, num_steps=2, seed=4)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=1e-4)  # ours == diffusers' processor
    assert (a.images - c.images).abs().max() > 1e-6  # memory frames see only memory in window_ours
    torch.testing.assert_close(a.images, e.images, atol=1e-5, rtol=1e-4)  # 6 frames: one 8-frame block sees all
    assert (a.images - d.images).abs().max() > 1e-4  # the seed matters
    calls: list[int] = []
    hook = components.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        _gen(components, tmp_path, guidance_scale=3.0, negative_prompt="blurry").generate(
            temple_cond, num_steps=2, seed=3
        )
    finally:
        hook.remove()
    assert len(calls) == 4  # conditional and unconditional per step


def test_each_denoising_step_reports_and_a_cancel_stops_the_segment(
    components, temple_cond: ConditionVideo, tmp_path: Path
) -> None:
    """A segment may take many steps of a large transformer: each step reports, and the callback
    raising (the service's cancel) stops it there."""
    from backend.progress import Cancelled

    seen: list[tuple[float, str]] = []
    _gen(components, tmp_path).generate(temple_cond, num_steps=3, seed=0, progress=lambda f, m: seen.append((f, m)))
    assert [f for f, _ in seen] == pytest.approx([1 / 3, 2 / 3, 1.0]) and seen[-1][1] == "denoising step 3/3"

    def cancel(fraction: float, message: str) -> None:
        seen.append((fraction, message))
        raise Cancelled("cancelled by a client")

    seen.clear()
    with pytest.raises(Cancelled):
        _gen(components, tmp_path).generate(temple_cond, num_steps=3, seed=0, progress=cancel)
    assert len(seen) == 1


def test_text_embedding_cached_and_reused(components, temple_cond: ConditionVideo, tmp_path: Path) -> None:
    gen = _gen(components, tmp_path)
    first = gen.generate(temple_cond, num_steps=1, seed=0)
    files = list((tmp_path / "text").glob("*.safetensors"))
    assert len(files) == 1
    without_encoder = dataclasses.replace(components, text_encoder=None, tokenizer=None)
    gen2 = _gen(without_encoder, tmp_path)
    second = gen2.generate(temple_cond, num_steps=1, seed=0)
    torch.testing.assert_close(first.images, second.images)
    emb = gen.encode_prompt("a temple")
    assert emb.shape == (1, 512, 32) and (emb[0, 3:] == 0).all() and emb[0, :3].abs().sum() > 0  # 2 words + eos
    with pytest.raises(ValueError, match="text cache"):
        gen2.generate(replace(temple_cond, prompt="a room"), num_steps=1, seed=0)


def test_cache_key_depends_on_prompt_and_model_name(components, tmp_path: Path) -> None:
    gen = _gen(components, tmp_path)
    other = AnyReconGenerator(tiny_anyrecon_components(1), AnyReconConfig(text_cache_dir=str(tmp_path / "text")))
    assert gen._text_cache_path("a") != gen._text_cache_path("b")
    assert gen._text_cache_path("a") != other._text_cache_path("a")


def test_resize_to_working_size(components, temple_cond: ConditionVideo, tmp_path: Path) -> None:
    small = 40, 30  # not a multiple of 16

    def rs(x):
        return F.interpolate(x.permute(0, 3, 1, 2), size=small[::-1], mode="bilinear").permute(0, 2, 3, 1)

    mask = F.interpolate(temple_cond.renders.mask[:, None].float(), size=small[::-1], mode="nearest")[:, 0] > 0.5
    cond = ConditionVideo(
        targets=temple_cond.targets.resized(*small),
        renders=Renders(rs(temple_cond.renders.rgb), mask.float(), mask, torch.zeros_like(mask, dtype=torch.int32)),
        memory=Views(rs(temple_cond.memory.images), temple_cond.memory.cams.resized(*small), temple_cond.memory.ids),
        carried=Views(
            rs(temple_cond.carried.images), temple_cond.carried.cams.resized(*small), temple_cond.carried.ids
        ),
    )
    with pytest.raises(ValueError, match="multiple of 16"):
        _gen(components, tmp_path).generate(cond, num_steps=1, seed=0)
    out = _gen(components, tmp_path, height=32, width=48).generate(cond, num_steps=1, seed=0)
    assert out.images.shape == (N_TARGETS, 30, 40, 3) and out.confidence.shape == (N_TARGETS, 30, 40)


def test_bad_inputs_and_config(components, temple_cond: ConditionVideo, tmp_path: Path) -> None:
    gen = _gen(components, tmp_path)
    bad = replace(temple_cond, renders=replace(temple_cond.renders, mask=temple_cond.renders.mask[:, :-1]))
    with pytest.raises(ValueError, match=r"cond.renders.mask must be \[F, H, W\]"):
        gen.generate(bad, num_steps=2, seed=0)
    with pytest.raises(ValueError, match="num_steps"):
        gen.generate(temple_cond, num_steps=0, seed=0)
    with pytest.raises(ValueError, match="AnyReconConfig.dtype"):
        AnyReconGenerator(components, AnyReconConfig(dtype="bfloat16"))
    for kw, match in [
        ({"height": 50, "width": 64}, "multiple of 16"),
        ({"attention": "sparse"}, "attention"),
        ({"memory_mode": "swap"}, "memory_mode"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
    ]:
        with pytest.raises(ValueError, match=match):
            AnyReconConfig(**kw)


@pytest.mark.xdist_group("loop")
def test_runs_inside_the_loop_by_name(components, tmp_path: Path) -> None:
    """The real loop on the real temple (3 captures, 8-frame orbit, 2 segments) with the tiny model."""
    from backend.camera_paths import default_trajectory
    from backend.evaluate import split_protocol
    from backend.formats import import_scene
    from backend.loop import LoopConfig, run_loop
    from backend.scene import Settings, TrajectoryFrame
    from tests.conftest import require_shared_data

    scene = import_scene("middlebury", require_shared_data("middlebury_temple"), tmp_path / "scene")
    scene = split_protocol(scene, "ring-arc", train_views=3, ring_start=11)
    orbit = default_trajectory([c.camera for c in scene.captures], 8)
    settings = Settings(
        width=W,
        height=H,
        gaussian_iterations=0,
        segment_length=5,
        segment_overlap=2,
        generator="anyrecon",
        num_steps=2,
        update_memory=False,
    )
    scene = replace(
        scene, trajectory=[TrajectoryFrame(i + 1, c) for i, c in enumerate(orbit)], heldout=[], settings=settings
    )
    cfg = LoopConfig.from_settings(settings)
    assert cfg.generator.name == "anyrecon" and cfg.generator.num_steps == 2
    gen = GENERATORS.get(cfg.generator.name)(
        components,
        AnyReconConfig(
            attention="window_ours", window_frames=2, height=None, width=None, text_cache_dir=str(tmp_path / "text")
        ),
    )
    result = run_loop(scene, tmp_path / "job", device="cpu", config=cfg, generator=gen)
    assert result.frames.images.shape == (8, H, W, 3)
    conf = result.frames.confidence
    assert set(torch.unique(conf).tolist()) <= {0.5, 1.0} and (conf == 1.0).any()
    assert len(list((tmp_path / "job").rglob("*.png"))) >= 8


def test_from_pretrained_local_folder_with_lora(
    components, temple_cond: ConditionVideo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real loading path on a diffusers-layout folder of the tiny models (no hub), LoRA merged."""
    from backend.generators.tiny import save_diffusers_folder
    from tests.backend.generators.test_anyrecon_lora import diffsynth_lora

    root = tmp_path / "wan"
    save_diffusers_folder(components, root)
    cfg = components.transformer.config
    lora = diffsynth_lora(
        cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim, prefix="diffusion_model."
    )
    torch.save(lora, tmp_path / "full_attention.ckpt")
    config = AnyReconConfig(text_cache_dir=str(tmp_path / "text"), height=None, width=None)
    plain = AnyReconGenerator.from_pretrained(str(root), config=config, device="cpu", local_files_only=True)
    merged = AnyReconGenerator.from_pretrained(
        str(root), tmp_path / "full_attention.ckpt", config=config, device="cpu", local_files_only=True
    )
    a = plain.generate(temple_cond, num_steps=1, seed=0)  # loads the text encoder on demand, caches the prompt
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 1
    b = merged.generate(temple_cond, num_steps=1, seed=0)
    ref = _gen(components, tmp_path / "ref").generate(temple_cond, num_steps=1, seed=0)
    torch.testing.assert_close(a.images, ref.images, atol=1e-5, rtol=1e-4)
    assert (a.images - b.images).abs().max() > 1e-5  # the LoRA changes the transformer
    with pytest.raises(ValueError, match="trained_attention must be 'full'"):
        AnyReconGenerator.from_pretrained(
            str(root), tmp_path / "full_attention.ckpt", trained_attention="block", config=config, device="cpu"
        )
    with pytest.raises(ValueError, match="attention 'block' needs weights trained with block"):
        AnyReconGenerator.from_pretrained(str(root), config=replace(config, attention="block"), device="cpu")
    # fp8: the transformer is stored in fp8 when loaded, before it moves to the device (its bf16 weights would
    # not fit a card that its fp8 ones do), and the generator does not cast it again
    from diffusers import WanTransformer3DModel

    moved: list[set] = []  # the transformer's parameter dtypes at each move
    to = WanTransformer3DModel.to

    def spy_to(self, *args, **kwargs):
        moved.append({p.dtype for p in self.parameters()})
        return to(self, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "to", spy_to)
    fp8 = AnyReconGenerator.from_pretrained(
        str(root), config=replace(config, memory_mode="fp8"), device="cpu", local_files_only=True
    )
    assert moved and torch.float8_e4m3fn in moved[-1]  # already fp8 when it went to the device
    assert torch.float8_e4m3fn in {p.dtype for p in fp8.components.transformer.parameters()}
    assert fp8.components.memory_mode == "fp8"
