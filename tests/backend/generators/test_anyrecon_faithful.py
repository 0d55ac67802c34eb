"""AnyRecon's inference, item by item, on the tiny random models against references written here from
the equations of AnyRecon's pipeline (bf16 steps, prompt cleaning, capture order, frame 0's mask,
tiled decode, default size)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.generators.anyrecon import AnyReconConfig, AnyReconGenerator, clean_prompt
from backend.generators.tiny import tiny_anyrecon_components
from backend.types import Cameras, ConditionVideo, Renders, Views

H, W = 32, 48


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cams(n: int) -> Cameras:
    K = torch.tensor([[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]]).expand(n, 3, 3)
    return Cameras(K=K.clone(), w2c=torch.eye(4).expand(n, 4, 4).clone(), width=W, height=H)


def _cond(n_memory: int, n_targets: int, ids: list[int] | None = None, seed: int = 0) -> ConditionVideo:
    g = torch.Generator().manual_seed(seed)
    mem = torch.rand(n_memory, H, W, 3, generator=g)
    rgb = torch.rand(n_targets, H, W, 3, generator=g)
    mask = torch.zeros(n_targets, H, W, dtype=torch.bool)
    mask[:, :, : W // 2] = True
    renders = Renders(rgb=rgb * mask[..., None], depth=mask.float(), mask=mask, source=mask.int() - 1)
    return ConditionVideo(
        targets=_cams(n_targets),
        renders=renders,
        memory=Views(mem, _cams(n_memory), ids if ids is not None else list(range(n_memory))),
        carried=Views(torch.zeros(0, H, W, 3), _cams(0), []),
        prompt="a temple",
    )


def _gen(components, tmp_path: Path, **kw) -> AnyReconGenerator:
    kw = {"height": None, "width": None, "text_cache_dir": str(tmp_path / "text"), **kw}
    return AnyReconGenerator(components, AnyReconConfig(**kw))


def _record(components):
    seen: list[dict] = []
    hook = components.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}),
        with_kwargs=True,
    )
    return seen, hook


def test_bf16_timesteps_latents_and_euler_steps(tmp_path: Path) -> None:
    """bf16 weights: the transformer sees t = bf16(1000 * shifted sigma) = 1000, 936, 832, 624 and bf16
    latents; each step is x + v * (sigma_next - sigma) rounded to bf16."""
    c = tiny_anyrecon_components(0)
    c.transformer.to(torch.bfloat16)
    c.vae.to(torch.bfloat16)
    gen = _gen(c, tmp_path, dtype="bfloat16")
    g = torch.Generator().manual_seed(5)
    n, h, w = 3, H // 8, W // 8
    y = torch.randn(1, 20, n, h, w, generator=g)
    text = torch.randn(1, 512, 32, generator=g).bfloat16()
    image = torch.randn(1, 17, 4, generator=g).bfloat16()
    seen, hook = _record(c)
    try:
        out = gen.denoise(y, text, image, num_steps=4, seed=9, num_memory=1)
    finally:
        hook.remove()
    # reference, from the equations: sigma_i = 1 - i/4 shifted by 5, float32; bf16 timestep
    sig = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    sig32 = torch.tensor(sig, dtype=torch.float32)
    assert [float(s["timestep"][0]) for s in seen] == [1000.0, 936.0, 832.0, 624.0]
    assert all(s["timestep"].dtype == torch.bfloat16 and s["hidden_states"].dtype == torch.bfloat16 for s in seen)
    x = torch.randn((1, 16, n, h, w), generator=torch.Generator().manual_seed(9)).bfloat16()
    for i in range(4):
        assert torch.equal(seen[i]["hidden_states"][:, :16], x)
        v = c.transformer(
            hidden_states=torch.cat([x, y.bfloat16()], 1),
            timestep=torch.tensor([1000 * sig[i]]).bfloat16(),
            encoder_hidden_states=text,
            encoder_hidden_states_image=image,
            return_dict=False,
        )[0]
        x = (x.float() + (v.float() * (sig32[i + 1] - sig32[i])).bfloat16().float()).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x, atol=0, rtol=0)


def test_prompt_cleaned_as_diffsynth(tmp_path: Path) -> None:
    assert clean_prompt(" ") == ""
    assert clean_prompt("  a\n\ttemple   at dusk ") == "a temple at dusk"
    assert clean_prompt("rock &amp;amp; roll") == "rock & roll"  # unescaped twice
    gen = _gen(tiny_anyrecon_components(0), tmp_path)
    assert gen._text_cache_path(clean_prompt(" ")) == gen._text_cache_path("")
    torch.testing.assert_close(gen.encode_prompt(" "), gen.encode_prompt(""))
    torch.testing.assert_close(gen.encode_prompt("a  temple "), gen.encode_prompt("a temple"))
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 2


def test_capture_order_and_clip_frame(tmp_path: Path) -> None:
    """Memory handed over most-useful-first (ids 7, 2, 5) runs in capture order 2, 5, 7; CLIP sees id 2."""
    c = tiny_anyrecon_components(0)
    cond = _cond(3, 2, ids=[7, 2, 5])
    gen = _gen(c, tmp_path)
    video, mask, m, p = gen.condition_video(cond)
    by_id = {i: cond.memory.images[k] for k, i in enumerate(cond.memory.ids)}
    for pos, cid in enumerate((2, 5, 7)):
        torch.testing.assert_close(video[pos], by_id[cid].permute(2, 0, 1) * 2 - 1)
    seen, hook = _record(c)
    try:
        gen.generate(cond, num_steps=1, seed=0)
    finally:
        hook.remove()
    clip = gen.encode_image(by_id[2].permute(2, 0, 1) * 2 - 1)
    torch.testing.assert_close(seen[0]["encoder_hidden_states_image"], clip)


def test_frame0_mask_without_memory(tmp_path: Path) -> None:
    """No memory, no carried frame: frame 0 (a render) counts as known, as AnyRecon's mask_indices=[0]."""
    c = tiny_anyrecon_components(0)
    cond = _cond(0, 3)
    seen, hook = _record(c)
    try:
        _gen(c, tmp_path).generate(cond, num_steps=1, seed=0)
    finally:
        hook.remove()
    mask = seen[0]["hidden_states"][0, 16:20]  # [4, N, h, w]
    small = cond.renders.mask[:, ::8, ::8].float()  # nearest to latent size: every 8th pixel
    assert (mask[:, 0] == 1).all()
    for f in (1, 2):
        assert torch.equal(mask[0, f], small[f]) and torch.equal(mask[3, f], small[f])
    assert (mask[:, 1] == 0).any()


def _ramp_weight(pos: int, lo: int, hi: int, size: int, border: int) -> float:
    """Blend weight of pixel ``pos`` inside tile [lo, hi) of an axis of ``size`` pixels (reference)."""
    w = 1.0
    if lo > 0:
        w = min(w, (pos - lo + 1) / border)
    if hi < size:
        w = min(w, (hi - pos) / border)
    return w


def test_tiled_decode_blends_tiles_like_anyrecon(tmp_path: Path) -> None:
    """Latents 4x6, tiles 2x3, stride 1x2 (AnyRecon's 30x52 / 15x26 scaled down): each pixel is the
    ramp-weighted mean of the tiles covering it, each tile decoded on its own."""
    c = tiny_anyrecon_components(0)
    gen = _gen(c, tmp_path, decode_tile=(2, 3), decode_stride=(1, 2))
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(1, 16, 2, 4, 6, generator=g)
    out = gen.decode(lat)  # [2, 3, 32, 48]
    mean, std = gen._latent_stats()
    raw = (lat * std + mean).permute(2, 1, 0, 3, 4)
    # tiles per axis: starts every stride, minus a start whose predecessor's tile already reaches the end
    rows = [(0, 2), (1, 3), (2, 4)]  # start 3: tile from 2 reaches 4 already
    cols = [(0, 3), (2, 5), (4, 6)]
    num = torch.zeros(2, 3, 32, 48)
    den = torch.zeros(1, 1, 32, 48)
    for y0, y1 in rows:
        for x0, x1 in cols:
            part = c.vae.decode(raw[..., y0:y1, x0:x1], return_dict=False)[0][:, :, 0]
            wy = torch.tensor([_ramp_weight(p, y0 * 8, y1 * 8, 32, 8) for p in range(y0 * 8, y1 * 8)])
            wx = torch.tensor([_ramp_weight(p, x0 * 8, x1 * 8, 48, 8) for p in range(x0 * 8, x1 * 8)])
            wt = torch.minimum(wy[:, None], wx[None, :])
            num[:, :, y0 * 8 : y1 * 8, x0 * 8 : x1 * 8] += part * wt
            den[:, :, y0 * 8 : y1 * 8, x0 * 8 : x1 * 8] += wt
    want = ((num / den).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    whole = _gen(c, tmp_path, decode_tile=None).decode(lat)
    assert (whole - out).abs().max() > 1e-4  # tiles differ from one whole-frame decode at their seams


def test_tiles_that_do_not_overlap_decode_as_their_tiles(tmp_path: Path) -> None:
    """decode_stride == decode_tile (allowed): no border to blend; each pixel is its one tile's (it crashed)."""
    c = tiny_anyrecon_components(0)
    lat = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(2))
    out = _gen(c, tmp_path, decode_tile=(2, 3), decode_stride=(2, 3)).decode(lat)
    mean, std = _gen(c, tmp_path)._latent_stats()
    raw = (lat * std + mean).permute(2, 1, 0, 3, 4)
    corner = c.vae.decode(raw[..., 0:2, 0:3], return_dict=False)[0][:, :, 0]
    torch.testing.assert_close(out[:, :, :16, :24], (corner.clamp(-1, 1) + 1) / 2, atol=1e-5, rtol=1e-5)


def test_default_size_is_anyrecons(tmp_path: Path) -> None:
    cfg = AnyReconConfig()
    assert (cfg.height, cfg.width) == (512, 896)
    assert (cfg.decode_tile, cfg.decode_stride) == ((30, 52), (15, 26))
    gen = AnyReconGenerator(tiny_anyrecon_components(0), AnyReconConfig(text_cache_dir=str(tmp_path)))
    assert gen.working_size(_cond(1, 1)) == (512, 896)
