"""Loop quality at held-out views: captures-only Gaussians against the full loop, with variants.

Issue 3's check: on the temple and the fern with 3 captures, the full loop's Gaussians must score a
higher PSNR at held-out cameras than Gaussians fitted on the captures alone. This script runs
``backend.evaluate.evaluate_scene`` once per scene with its baselines (point render, captures-only
Gaussians, the default loop), then the loop alone for each variant (a generator or loop setting
changed), so that every row of a scene is measured in one process against one baseline. With
``--seeds 0 1 2`` every row is run once per fit seed and a summary gives the means, the spread and
the loop's gain over the captures-only fit of the same seed: one fit differs from another by
0.1-0.3 dB.

Fit variants (dropout, SH degree, random background) patch the fit settings of the
baselines too: their row's captures-only fit is scored again with the same settings, so the loop's
gain is measured against a captures-only fit with the same regularisers. Scenes with masks
(``temple-ring`` and ``dino-ring``, Middlebury silhouettes) get masked scores beside full-image ones.

Usage (GPU machine, scenes copied there and never committed; or on CPU at small sizes)::

    python scripts/bench_loop_quality.py --data .device_data --iterations 3000 --seeds 0 1 2 --out $OUT/quality.json
    .venv/bin/python scripts/bench_loop_quality.py --size 64x48 --iterations 20 --device cpu --scenes dino-ring
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.evaluate import (  # noqa: E402
    EVAL_PICTURE,
    FRAMES_PER_LEG,
    EvalConfig,
    LoopStart,
    eval_trajectory,
    evaluate_scene,
    heldout_views,
    scene_for_eval,
    score,
)
from backend.evaluate_args import size_wxh  # noqa: E402
from backend.generators.refine import LOSS_SYNC_EVERY, RefineConfig, RefineGenerator  # noqa: E402
from backend.generators.reproject import ReprojectConfig, ReprojectGenerator  # noqa: E402
from backend.loop import LoopConfig  # noqa: E402
from backend.outputs import to_u8, write_overview_as  # noqa: E402
from backend.scene import SCENE_FILE, Scene  # noqa: E402
from backend.stages.cameras import load_image, load_views, resize_image, to_tensor, undistorted  # noqa: E402
from backend.stages.memory import build_memory  # noqa: E402

# scene -> (folder, format, protocol, default working size, import options)
SCENES = {
    "temple": ("middlebury_temple", "middlebury", "ring-arc", (512, 384), {}),
    "fern": ("llff_fern", "llff", "llff", (504, 378), {}),
    "temple-ring": ("middlebury_temple", "middlebury", "ring", (512, 384), {"silhouettes": True}),
    # the ring-arc with the silhouettes: masked scores, and the visual hull as a geometry to compare
    "temple-masked": ("middlebury_temple", "middlebury", "ring-arc", (512, 384), {"silhouettes": True}),
    "dino-ring": ("middlebury_dino", "middlebury", "ring", (512, 384), {"silhouettes": True}),
    "door": ("lund_door", "colmap", "ring-arc", (384, 576), {}),  # portrait photos, lens distortion undone
}
# A scene already imported into `<data>/<folder>_imported/` (`reconloop import`) is read from there: the
# GPU machine has no pycolmap to read the door's COLMAP model.
IMPORTED_SUFFIX = "_imported"


def _blend(share: float) -> dict[str, float]:
    """ReprojectConfig overrides: ``share`` of the guide's colour in the frames, a one-fit guide's or an ensemble's."""
    return {"guide_blend": share, "ensemble_blend": share}


# name -> (LoopConfig overrides, FitConfig overrides, ReprojectConfig overrides); "default" is scored
# with the baselines, and so is every variant that changes the fit (the captures-only fit changes too).
VARIANTS: dict[str, tuple[dict, dict, dict]] = {
    "default": ({}, {}, {}),
    "no guide": ({"guide": False}, {}, {"render_blend": 0.0}),  # AnyRecon's loop: the point render alone
    "guide without blend": ({}, {}, {"render_blend": 0.0, **_blend(0.0)}),
    "agreement 0.02": ({}, {}, {"agreement_std": 0.02}),
    # how much of the guide's colour goes into the frames, one fit's or an ensemble's (ReprojectConfig.guide_blend
    # 0.75 since run 39, ensemble_blend 1.0 since run 54: gsplat's guide of 3 fits)
    "blend 0.5": ({}, {}, _blend(0.5)),  # the default until run 39
    "blend 0.75": ({}, {}, _blend(0.75)),  # the ensemble's until run 54 (the one fit's default)
    "blend 0.9": ({}, {}, _blend(0.9)),
    "blend 1.0": ({}, {}, _blend(1.0)),  # the guide's colour alone where it covers (runs 41, 54; an ensemble's default)
    # ... and it covers wherever its members' mean opacity reaches 0.1 (GuideConfig.alpha; 0.5 the default)
    "guide alpha 0.1 + blend 1.0": ({"guide_alpha": 0.1}, {}, _blend(1.0)),
    # ... with more of the fit's steps on the frames (FitConfig.capture_share 0.5 the default)
    "guide alpha 0.1 + blend 1.0 + capture share 0.3": (
        {"guide_alpha": 0.1},
        {"capture_share": 0.3},
        _blend(1.0),
    ),
    # the CPU's guide made an ensemble of 3 from all points, as on CUDA until run 52 (a CPU screen, run 41); on
    # gsplat the default's members (bagged since run 52)
    "guide ensemble 3": ({"guide_members": 3}, {}, {}),
    "guide ensemble 5": ({"guide_members": 5}, {}, {}),  # two more sets than CUDA's default (run 43's screen)
    # gsplat's guide members each from all of the memory's points, the default until run 52 (its members
    # bagged since, each from its own share: GuideConfig.member_points; the row was `guide points 0.5` then)
    "guide all points": ({"guide_points": 1.0}, {}, {}),
    # 3 members, each from its own half of the points: gsplat's default from run 52 to run 59 (0.4 since; the
    # row `guide ensemble 3 points 0.4` then); on the CPU rasterizer its one fit made gsplat's bagged three
    "guide ensemble 3 points 0.5": ({"guide_members": 3, "guide_points": 0.5}, {}, {}),
    # other shares for the bagged members (rows of either rasterizer): 0.3 splits the scenes (the door -0.16,
    # run 58), 0.7 and 0.2 lose on the temple (runs 53, 58)
    "guide ensemble 3 points 0.3": ({"guide_members": 3, "guide_points": 0.3}, {}, {}),
    "guide ensemble 3 points 0.7": ({"guide_members": 3, "guide_points": 0.7}, {}, {}),
    "guide ensemble 3 points 0.2": ({"guide_members": 3, "guide_points": 0.2}, {}, {}),
    # the bench's path through the captures and held-out views with more or fewer frames between its keys
    # (EvalConfig.frames_per_leg; FRAMES_PER_LEG 3, a job's path is the user's animation, 120 frames in
    # scripts/bench_loop.py): more views of the guide's colour for the fit, or the keys' frames alone
    "path 1 per leg": ({"frames_per_leg": 1}, {}, {}),
    "path 8 per leg": ({"frames_per_leg": 8}, {}, {}),
    "no memory update": ({"update": False}, {}, {}),
    # the guide: a self-ensemble of 3 captures-only fits on CUDA, rendered as their mean, 0.75 of its colour in
    # the frames until run 54, all of it since (GuideConfig.members, ReprojectConfig.ensemble_blend; run 39)
    "one guide": ({"guide_members": 1, "guide_points": 1.0}, {}, {}),
    "run 38 default": ({"guide_members": 1, "guide_points": 1.0}, {}, {"guide_blend": 0.5}),  # one fit, half its colour
    "guide ensemble 3 blend 0.5": ({"guide_members": 3, "guide_points": 1.0}, {}, {"ensemble_blend": 0.5}),  # run 39's
    # where the frames take the ensemble's colour alone, their confidence with the reprojection's angular weight
    # as well: the default until run 61 (ReprojectConfig.ensemble_angle_free since; the rings +0.37 and +0.16)
    "ensemble angle weighted": ({}, {}, {"ensemble_angle_free": False}),
    # ... beside the CPU's own guide made gsplat's kind (3 members from half of the points): the CPU screen
    "guide ensemble 3 points 0.5 angle weighted": (
        {"guide_members": 3, "guide_points": 0.5},
        {},
        {"ensemble_angle_free": False},
    ),
    "capture share 0.7": ({}, {"capture_share": 0.7}, {}),
    "capture share 0.3": ({}, {"capture_share": 0.3}, {}),  # more of the fit on the frames (run 36's mixes: +0.04)
    # weight-free regularisers of the sparse-view Gaussian literature (Gaussian dropout 0.2 is the default)
    "no dropout": ({}, {"dropout_rate": 0.0}, {}),
    "dropout 0.1": ({}, {"dropout_rate": 0.1}, {}),  # the default of run 21
    "dropout 0.2": ({}, {"dropout_rate": 0.2}, {}),  # the default since run 22 (named in its spec files)
    "dropout 0.3": ({}, {"dropout_rate": 0.3}, {}),
    "sh degree 1": ({}, {"sh_degree": 1}, {}),
    "sh degree 0": ({}, {"sh_degree": 0}, {}),
    "dropout 0.2 + sh 1": ({}, {"dropout_rate": 0.2, "sh_degree": 1}, {}),
    # the fit's own settings: how far the centres move, how the Gaussians are densified. The strategy is
    # gsplat's MCMC (on either rasterizer); the DefaultStrategy rows name it, as do its thresholds'
    "means lr x4": ({}, {"means_lr": 6.4e-4}, {}),
    "no densification": ({}, {"strategy": "none"}, {}),
    "run 20 default": ({}, {"strategy": "default", "dropout_rate": 0.0}, {}),  # the fit's defaults until run 21
    "grow grad 0.0002": ({}, {"strategy": "default", "grow_grad2d": 0.0002}, {}),  # gsplat's; ours until run 19
    "grow grad 0.0005": ({}, {"strategy": "default", "grow_grad2d": 0.0005}, {}),
    "grow grad 0.002": ({}, {"strategy": "default", "grow_grad2d": 0.002}, {}),
    "default strategy": ({}, {"strategy": "default"}, {}),  # with dropout; the CPU's until "MCMC on the CPU"
    "mcmc cap 30k": ({}, {"mcmc_cap": 30_000}, {}),
    "mcmc cap 300k": ({}, {"mcmc_cap": 300_000}, {}),
    # the defaults until run 43: a memory above the cap (the door's 241k) relocates but never grows
    "mcmc no growth": ({}, {"mcmc_growth": 1.0}, {}),
    # MCMC adds at most 5 % a refinement (gsplat), 15 refinements: a start grows at most 2.1x (the temple's
    # 1.3k memory points at 160x120, 6.9k at 512x384); twice the refinements let it grow 4.3x
    "refine every 50": ({}, {"refine_every": 50 / 3000}, {}),
    "mcmc regs 0.001": ({}, {"mcmc_opacity_reg": 0.001, "mcmc_scale_reg": 0.001}, {}),  # a tenth of simple_trainer's
    "refine until 1500": ({}, {"refine_stop": 0.5}, {}),  # densification stops earlier (1500 of 3000 steps)
    # MCMC's noise on the centres a tenth of simple_trainer's (FitConfig.mcmc_noise_lr 5e5): the sets' spread
    # between seeds is what the guide ensemble averages away (run 46: level)
    "mcmc noise 5e4": ({}, {"mcmc_noise_lr": 5e4}, {}),
    # frames per fitting step (FitConfig.batch_size, learning rates x sqrt): 3 on gsplat since run 46, on the
    # CPU since its compositing runs in numba; "batch 3" is the default, "batch 1" the default before
    "batch 3": ({}, {"batch_size": 3}, {}),
    "batch 1": ({}, {"batch_size": 1}, {}),
    # the reprojection's own confidence raised about as far as the refiner's "where unsure" blend (since
    # removed) raised it
    "confidence raised": ({}, {}, {"inpainted_confidence": 0.6, "reprojected_confidence": 0.8}),
    "confidence raised and one source trusted": (
        {},
        {},
        {"inpainted_confidence": 0.6, "reprojected_confidence": 0.8, "single_source_factor": 1.0},
    ),
    "no random background": ({}, {"has_random_background": False}, {}),
    # the step count users' jobs had before 3000 became the setting's default (every fit of the row: captures only,
    # the guide's, the loop's); the bench's --iterations is the default row's
    "300 steps": ({}, {"iterations": 300}, {}),
    "hull geometry": ({"estimator": "hull"}, {}, {}),
    "plane sweep geometry": ({"estimator": "mvs"}, {}, {}),  # the CPU path, where patchmatch is the default
    "patchmatch geometry": ({"estimator": "patchmatch"}, {}, {}),
    # COLMAP's own triangulation filter (PatchMatchConfig: 1 degree since the fern's collapse at 3)
    "patchmatch 3 degrees": ({"estimator": "patchmatch", "patchmatch": {"min_triangulation_angle_deg": 3.0}}, {}, {}),
    "crop to masks": ({"has_crop_to_masks": True}, {}, {}),
}
LOOP_FIELDS = ("estimator", "has_crop_to_masks")
SCORE_KEYS = (
    "points",
    "gaussians_captures",
    "guide",
    "gaussians_loop",
    "frames",
    "frames_guide_oracle",
    "refine_input_frames",
)


def bench_config(
    scene: Scene, size: tuple[int, int], iterations: int, budget_min: float | None, device: str
) -> LoopConfig:
    """Every row's base config: the scene's settings at ``size`` and ``iterations``; with ``budget_min``,
    the plan a job with that time budget would make (size and steps at most these, a Gaussian cap)."""
    if budget_min is None:
        base = LoopConfig.from_settings(scene.settings, device=device)
        return replace(base, width=size[0], height=size[1], fit=replace(base.fit, iterations=iterations))
    settings = replace(
        scene.settings, width=size[0], height=size[1], gaussian_iterations=iterations, time_budget_min=budget_min
    )
    return LoopConfig.from_settings(settings, device=device, num_captures=len(scene.captures))


def load_bench_scene(data: Path, name: str, work: Path, *, split: bool = True) -> Scene:
    """One of SCENES from ``data``, imported into ``work`` and split by its protocol (``split``); a
    ``<folder>_imported`` copy (a scene.json made where pycolmap is) is used when ``data`` has one."""
    src, fmt, options = bench_scene_source(data, name)
    return scene_for_eval(src, fmt, SCENES[name][2] if split else None, 3, work, **options)


def bench_scene_source(data: Path, name: str) -> tuple[Path, str | None, dict]:
    """Where one of SCENES is read from in ``data``, its format and import options: the ``<folder>_imported`` copy
    (a scene.json, format None) where ``data`` has one, else the dataset's own folder."""
    folder, fmt, _, _, options = SCENES[name]
    imported = data / f"{folder}{IMPORTED_SUFFIX}"
    if (imported / SCENE_FILE).is_file():
        return imported, None, {}
    return data / folder, fmt, options


# a variant's loop overrides beyond LOOP_FIELDS: the guide's fields (bench key -> GuideConfig field), the other
# nested configs' fields loop_config sets, and the path's density (EvalConfig.frames_per_leg, read by main)
GUIDE_KEYS = {
    "guide": "enabled",
    "guide_members": "members",
    "guide_alpha": "alpha",
    "guide_points": "member_points",
}
NESTED_LOOP_KEYS = ("update", *GUIDE_KEYS, "patchmatch", "frames_per_leg")


def add_scene_seed_args(p: argparse.ArgumentParser, work: Path) -> None:
    """The options of an analysis script that runs per bench scene and seed (``guide_union.py``,
    ``ensemble_rounds.py``): data, scenes, size, steps, seeds, device, work folder, JSON output."""
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--scenes", default="temple", help="comma-separated, of " + ", ".join(sorted(SCENES)))
    p.add_argument("--size", type=size_wxh, default=None, metavar="WxH", help="default: the quality bench's")
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--seeds", default="0", help="comma-separated")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=work)
    p.add_argument("--out", type=Path, default=None, help="write the reports here as JSON")


def bench_scene_names(
    p: argparse.ArgumentParser, data: Path, text: str, option: str = "--scenes", *, allow_none: bool = False
) -> list[str]:
    """The bench scenes of a comma-separated option, each checked before any work: an unknown name, a missing
    ``--data`` folder or a scene's folder missing from it is the parser's error, naming the option."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENES]
    if unknown or not (names or allow_none):
        p.error(f"{option}: unknown scene(s) {unknown or 'none given'}; known: {', '.join(sorted(SCENES))}")
    if names and not data.is_dir():
        p.error(f"--data: no folder {data}; point it at the shared scenes (../shared/data beside the clone)")
    missing = [f"{n} ({SCENES[n][0]})" for n in names if not bench_scene_source(data, n)[0].is_dir()]
    if missing:
        p.error(f"--data: {data} has no folder for scene(s) {', '.join(missing)}")
    return names


def scene_seeds(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, tuple[int, int], int]]:
    """(scene, working size, seed) for every scene and seed of :func:`add_scene_seed_args`' options, in
    order; an unknown or missing scene is the parser's error (:func:`bench_scene_names`)."""
    names = bench_scene_names(p, args.data, args.scenes)
    seeds = [int(s) for s in args.seeds.split(",")]
    return [(name, args.size or SCENES[name][3], seed) for name in names for seed in seeds]


def heldout_and_memory(scene: Scene, cfg: LoopConfig, size: tuple[int, int], device: str):
    """What a per-scene analysis script scores against and fits from, at ``size`` (W, H): the held-out
    photos [V, H, W, 3] and their cameras, the captures, and the memory they make."""
    W, H = size
    truth, held = heldout_views(scene, W, H, device)
    captures = load_views(scene.captures, W, H, device)
    return truth, held, captures, build_memory(captures, cfg.memory, estimator=cfg.estimator, notes=[])


def write_scene_reports(out: Path | None, device: str, reports: list[dict]) -> None:
    """The reports of a per-scene-and-seed script as JSON at ``out`` (nothing when None)."""
    if out:
        out.write_text(json.dumps({"device": device, "torch": torch.__version__, "reports": reports}, indent=1))


def loop_config(base: LoopConfig, overrides: dict, fit_overrides: dict) -> LoopConfig:
    unknown = set(overrides) - {*LOOP_FIELDS, *NESTED_LOOP_KEYS}
    if unknown:
        raise ValueError(f"bench variant: unknown loop override(s) {sorted(unknown)}")
    cfg = replace(base, **{k: v for k, v in overrides.items() if k in LOOP_FIELDS})
    if "update" in overrides:
        cfg = replace(cfg, update=replace(cfg.update, enabled=overrides["update"]))
    guide = {field: overrides[key] for key, field in GUIDE_KEYS.items() if key in overrides}
    if guide:
        cfg = replace(cfg, guide=replace(cfg.guide, **guide))
    if "patchmatch" in overrides:
        memory = cfg.memory
        cfg = replace(cfg, memory=replace(memory, patchmatch=replace(memory.patchmatch, **overrides["patchmatch"])))
    return replace(cfg, fit=replace(cfg.fit, **fit_overrides))


# FitConfig fields that only weigh the generated frames: a captures-only fit is the same with or without them
FRAME_ONLY_FIT_FIELDS = {"capture_share"}


def has_baselines(variant: str) -> bool:
    """Variants that change the fit (beyond how it weighs the frames) or the geometry score their own
    captures-only fit, and so do a guide ensemble's (its members fitted beside that fit, their render
    scored); the others are paired with the default row's of the same seed, and their loop starts from its
    memory and guide (:class:`backend.evaluate.LoopStart`)."""
    loop_over, fit_over, _ = VARIANTS.get(variant, ({}, {}, {}))
    own = variant == "default" or bool(set(fit_over) - FRAME_ONLY_FIT_FIELDS) or "estimator" in loop_over
    # an ensemble's rows score its render, made beside the baselines
    return own or "guide_members" in loop_over or "guide_points" in loop_over


# ---- refiner variants: the "refine" generator (reproject + a U-Net trained on the scene's
# captures) in the default loop, against the default row (reproject alone). name -> RefineConfig overrides.
REFINE_VARIANTS: dict[str, dict] = {
    "refine": {},
    "refine 30 s": {"seconds": 30.0},
    "refine full fits": {"fit_share": 1.0},  # the leave-out guides as long as the job's fit (default: a fifth)
    "refine small": {"widths": (16, 32, 64), "crop_px": 64, "batch_size": 4},  # 0.12M parameters
    "refine confidence 0.1": {"confidence_error": 0.1},
    "refine ungated": {"strengths": (1.0,)},  # the network at full strength, or declined: no blend in between
    "refine without trust region": {"max_change_ratio": 0.0},  # the gate's strength in every segment
    "refine without noise floor": {"gate_z": 0.0},  # the gate takes any gain, however small (until stop 49)
    "refine confidence 0.025": {"confidence_error": 0.025},  # the refined frames weighed less in the fit
}
# the frames' weight in the fit (mean confidence), their mean absolute error and that error per unit of
# weight at the held-out views (backend.evaluate): means over seeds
FRAME_WEIGHT_KEYS = ("frames_confidence", "frames_l1", "frames_weighted_l1")
# columns shown as means over seeds, not gains, with their format
PLAIN_COLUMNS = {
    "seeds_above_default": ".0f",  # beside loop_minus_default, the gain column before these
    "frames_confidence": ".2f",
    "frames_l1": ".4f",
    "frames_weighted_l1": ".4f",
    "refine_strength": ".2f",
    "refine_declined": ".2f",
}
REFINE_PICTURE = "{run}_refine.png"  # rows: reprojection | guide render | refined | truth


class RecordingRefiner(RefineGenerator):
    """The refine generator, keeping its inputs and outputs of every segment for the picture."""

    def __init__(self, config: RefineConfig) -> None:
        super().__init__(config)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.network_input: torch.Tensor | None = None

    def refine(self, frames, renders):
        self.network_input = frames.images
        return super().refine(frames, renders)

    def generate(self, cond, *, num_steps=1, seed=0, progress=None):
        self.network_input = None  # stays None where the refiner declined: its frames are its input
        out = super().generate(cond, num_steps=num_steps, seed=seed, progress=progress)
        seen = out.images if self.network_input is None else self.network_input
        self.seen.append((seen.cpu(), cond.renders.rgb.cpu(), out.images.cpu()))
        return out


def refine_report(gen: RecordingRefiner, scene, report: dict, picture: Path | None) -> None:
    """Score the refiner's input (the reprojection) at the held-out views beside its output, in the
    same run, and draw reprojection | guide render | refined | truth per held-out view."""
    W, H = report["working_size"]
    _, on_heldout = eval_trajectory(scene, "heldout", FRAMES_PER_LEG)
    frames, renders, refined = (torch.cat([s[k] for s in gen.seen]) for k in range(3))
    hs = sorted(on_heldout)
    truth = to_tensor(
        [resize_image(undistorted(load_image(scene.heldout[h].image), scene.heldout[h].camera)[0], W, H) for h in hs],
        torch.device("cpu"),
    )
    idx = [on_heldout[h] for h in hs]
    report["refine_input_frames"] = score(frames[idx], truth)
    report["refine_train_loss"] = gen.losses[-1] if gen.losses else None
    report["refine_train_steps"] = len(gen.losses) * LOSS_SYNC_EVERY
    report["refine_strength"] = gen.strength
    report["refine_declined"] = gen.declined
    report["refine_segment_strengths"] = gen.segment_strengths  # the trust region's, per segment
    # how far the network moved the trajectory's frames, beside how far it moved the validation frames
    report["refine_change"] = float((refined - frames).abs().mean())
    if gen.validation is not None:  # the gate: mean L1 at the validation capture per strength tried
        v = gen.validation
        report["refine_validation"] = {
            "captures": v.target_ids,
            "held_out": v.held_out,
            "train_pairs": v.train_pairs,
            "l1_input": v.l1_input,
            "change": v.change,
            "noise": v.noise,
            "declined": v.declined,
            "l1": dict(zip([f"{a:g}" for a in v.strengths], v.l1)),
            "note": v.note,
        }
    if picture is not None and idx:
        rows = [[to_u8(t[i]) for t in (frames, renders, refined)] + [to_u8(truth[r])] for r, i in enumerate(idx)]
        write_overview_as(picture.parent, picture.name, rows)


def variant_generator(v: str, gen_over: dict, refine_seconds: float | None, refine_steps: int):
    """The generator of a variant row: reproject with overrides, or a recording refiner."""
    if v in REFINE_VARIANTS:
        over = dict(REFINE_VARIANTS[v])
        if refine_seconds is not None and "seconds" not in over:
            over["seconds"] = refine_seconds
        over["max_steps"] = refine_steps
        return RecordingRefiner(RefineConfig(**over))
    return ReprojectGenerator(ReprojectConfig(**gen_over))


# ---- end of the refiner variants


def baselines(runs: dict[str, list[dict]], variant: str) -> dict[int, dict]:
    """Seed -> the report holding a variant's baselines: its own where it scored them, else the default
    row's of the same seed."""
    reports = runs[variant] if "gaussians_captures" in runs[variant][0] else runs["default"]
    return {r["seed"]: r for r in reports}


def seed_scores(reports: list[dict], base: dict[int, dict], key: str) -> list[float]:
    """PSNR of ``key`` per seed of a variant's reports (from ``base`` where the row has no score of its own)."""
    return [(r if key in r else base[r["seed"]])[key]["psnr"] for r in reports if key in r or key in base[r["seed"]]]


def scene_result(size: tuple[int, int], plan: str | None, seeds: list[int], runs: dict[str, list[dict]]) -> dict:
    """A scene's entry in the report: its working size, the budget's plan (None: the bench's size and steps),
    seeds, every row's reports and their summary (:func:`summarize`)."""
    return {"size": list(size), "plan": plan, "seeds": seeds, "runs": runs, "summary": summarize(runs)}


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Mean PSNR per variant over seeds (and its standard deviation, ``<key>_std``): the loop's
    Gaussians and frames, the baselines (the variant's own when it scored them, else the default
    row's), masked where the scene has masks, the loop's gain over the captures-only Gaussians of
    the same seed and settings, and a variant's loop against the default row's, seed by seed: the mean
    difference (``loop_minus_default``) and on how many seeds it is above (``seeds_above_default``; one
    seed's loop moves by up to 0.4 dB between two GPU runs, docs/benchmarks.md run 55)."""
    out: dict[str, dict[str, float]] = {}
    default = {r["seed"]: r for r in runs.get("default", [])}
    for v, reports in runs.items():
        row: dict[str, float] = {}
        base = baselines(runs, v)
        for key in [k for s in SCORE_KEYS for k in (s, f"{s}_masked")]:
            vals = seed_scores(reports, base, key)
            if vals:
                row[key] = statistics.fmean(vals)
                row[f"{key}_std"] = statistics.pstdev(vals)
        for suffix in ("", "_masked"):
            if f"gaussians_loop{suffix}" in reports[0]:
                row[f"loop_minus_captures{suffix}"] = statistics.fmean(
                    r[f"gaussians_loop{suffix}"]["psnr"] - base[r["seed"]][f"gaussians_captures{suffix}"]["psnr"]
                    for r in reports
                )
        paired = [
            r["gaussians_loop"]["psnr"] - default[r["seed"]]["gaussians_loop"]["psnr"]
            for r in reports
            if v != "default" and "gaussians_loop" in r and "gaussians_loop" in default.get(r["seed"], {})
        ]
        if paired:
            row["loop_minus_default"] = statistics.fmean(paired)
            row["seeds_above_default"] = float(sum(d > 0 for d in paired))
        if "refine_strength" in reports[0]:  # the refiner's gate: its mean strength where it applied the
            # network (a declined run passes the reprojection through; its strength says nothing), and the
            # share of runs that declined
            applied = [r["refine_strength"] for r in reports if not r.get("refine_declined")]
            row["refine_declined"] = 1.0 - len(applied) / len(reports)
            if applied:
                row["refine_strength"] = statistics.fmean(applied)
        for key in FRAME_WEIGHT_KEYS:
            if all(r.get(key) is not None for r in reports):
                row[key] = statistics.fmean(r[key] for r in reports)
        out[v] = row
    return out


def mean_reports(reports: list[dict]) -> dict:
    """One report for rows of the same seed and settings run in several processes: the first, with
    every score (PSNR, SSIM, ...) the mean over the rows and ``rows`` saying how many there were (GPU fits
    are not bit-reproducible: one seed's rows differ by up to 0.4 dB, run 55)."""
    out = dict(reports[0])
    if len(reports) > 1:
        for key in (k for s in SCORE_KEYS for k in (s, f"{s}_masked")):
            if all(isinstance(r.get(key), dict) for r in reports):
                out[key] = {m: statistics.fmean(r[key][m] for r in reports) for m in reports[0][key]}
        out["rows"] = len(reports)
    return out


def merge_results(parts: list[dict]) -> dict:
    """Results of several runs (same device and iterations; seeds split between them) as one: each
    scene's runs joined per variant, sorted by seed, and summarised again."""
    if not parts:
        raise ValueError("merge: no results given")
    iterations = {r["iterations"] for r in parts}
    if len(iterations) != 1:
        raise ValueError(f"merge: the runs used different iterations {sorted(iterations)}")
    merged: dict = {k: parts[0][k] for k in ("device", "torch", "iterations")}
    merged["scenes"] = {}
    for part in parts:
        for name, scene in part["scenes"].items():
            into = merged["scenes"].setdefault(
                name, {"size": scene["size"], "plan": scene.get("plan"), "seeds": [], "runs": {}}
            )
            if scene["size"] != into["size"]:
                raise ValueError(f"merge: scene {name} ran at {scene['size']} and {into['size']}")
            if scene.get("plan") != into["plan"]:
                raise ValueError(f"merge: scene {name} was planned as {scene.get('plan')!r} and {into['plan']!r}")
            for v, reports in scene["runs"].items():
                into["runs"].setdefault(v, []).extend(reports)
    for name, scene in merged["scenes"].items():
        for v, reports in scene["runs"].items():
            seeds = [r["seed"] for r in reports]
            if v == "default":  # concurrent processes of one seed each score the default row: their mean
                reports[:] = [mean_reports([r for r in reports if r["seed"] == seed]) for seed in dict.fromkeys(seeds)]
                seeds = [r["seed"] for r in reports]
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"merge: scene {name}, variant {v!r} has seed(s) twice: {sorted(seeds)}")
            reports.sort(key=lambda r: r["seed"])
        if "default" not in scene["runs"]:
            raise ValueError(f"merge: scene {name} has no default row")
        scene["seeds"] = sorted({r["seed"] for reports in scene["runs"].values() for r in reports})
        scene["summary"] = summarize(scene["runs"])
    return merged


def markdown(results: dict) -> str:
    """One table per scene: mean PSNR (+- std over seeds) per variant."""
    lines = [f"device {results['device']}, torch {results['torch']}, {results['iterations']} iterations"]
    for name, scene in results["scenes"].items():
        summary = scene["summary"]
        masked = any("gaussians_loop_masked" in row for row in summary.values())
        cols = [k for k in SCORE_KEYS if any(k in row for row in summary.values())]
        cols += [f"{k}_masked" for k in cols if masked]
        gains = ["loop_minus_captures"] + (["loop_minus_captures_masked"] if masked else [])
        gains += [g for g in ("loop_minus_default", *PLAIN_COLUMNS) if any(g in row for row in summary.values())]
        lines += ["", f"### {name} ({scene['size'][0]}x{scene['size'][1]}, seeds {scene['seeds']})", ""]
        lines.append("| variant | " + " | ".join(cols + gains) + " |")
        lines.append("| --- " * (1 + len(cols) + len(gains)) + "|")
        for v, row in summary.items():
            cells = [f"{row[k]:.2f} +- {row[k + '_std']:.2f}" if k in row else "" for k in cols]
            cells += [format(row[g], PLAIN_COLUMNS.get(g, "+.2f")) if g in row else "" for g in gains]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        if len(scene["seeds"]) > 1:  # the figures behind the means, seed by seed
            lines += ["", f"per seed ({' / '.join(map(str, scene['seeds']))}):", ""]
            lines.append("| variant | " + " | ".join(cols) + " |")
            lines.append("| --- " * (1 + len(cols)) + "|")
            for v, reports in scene["runs"].items():
                base = baselines(scene["runs"], v)
                in_order = sorted(reports, key=lambda r: r["seed"])
                cells = [" / ".join(f"{x:.2f}" for x in seed_scores(in_order, base, k)) for k in cols]
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path | None, quiet: bool = False) -> int:
    """Print the tables (unless ``quiet``) and, with ``out``, write the results as JSON there and the
    tables beside (.md)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")  # replaced in one step: a process killed mid-write leaves the last whole file
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out)
        out.with_suffix(".md").write_text(markdown(results))
    if not quiet:
        print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding the scenes")
    p.add_argument("--scenes", default="temple,fern", help="comma-separated: " + ", ".join(SCENES))
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join([*VARIANTS, *REFINE_VARIANTS])
    )
    p.add_argument(
        "--refine-seconds", type=float, default=None, help="training time of the refiner rows (default RefineConfig's)"
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="also stop the refiner's training after this many steps (0: the clock alone); with a large "
        "--refine-seconds, a budget that does not depend on the machine's load",
    )
    p.add_argument(
        "--size", type=size_wxh, default=None, metavar="WxH", help="working size for every scene (default: per scene)"
    )
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="MIN",
        help="plan the rows as a job with this time budget would (backend.budget; one plan a scene, shared by "
        "every row): --size and --iterations become the most it may choose, and it sets the Gaussian cap; "
        "--budget 3 --iterations 400 --size 160x120 is the CPU job of `reconloop demo --scene`. The plan is the "
        "scene's own settings' (reproject, the device's guide members): a refiner row's training or a row with "
        "more guide members is not re-planned, so compare only rows that fit as many sets",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--seeds",
        nargs="+",
        default=["0"],
        help="fit seeds (space- or comma-separated); every row is run once per seed and the "
        "summary gives the mean over seeds (one fit differs from another by a few tenths of a dB)",
    )
    p.add_argument("--pictures", type=Path, default=None, help="keep each run's eval picture in this folder")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (and a .md table beside)")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="instead of running: merge the --out files of runs with one seed each (e.g. concurrent "
        "processes) into one summary per scene, written to --out",
    )
    args = p.parse_args(argv)
    if args.out is not None and args.out.is_dir():
        p.error(f"--out: {args.out} is a folder; name the JSON file to write (its .md table goes beside it)")
    if args.budget is not None and not args.budget > 0:
        p.error(f"--budget: a time budget in minutes above 0; got {args.budget}")
    if args.merge:
        results = merge_results([json.loads(f.read_text()) for f in args.merge])
        return write_report(results, args.out)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS and v not in REFINE_VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join([*VARIANTS, *REFINE_VARIANTS])}")
    if variants[0] != "default":
        variants.insert(0, "default")
    seeds = [int(v) for arg in args.seeds for v in arg.split(",") if v.strip()]
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "iterations": args.iterations,
        "scenes": {},
    }
    for name in bench_scene_names(p, args.data, args.scenes):
        size = args.size or SCENES[name][3]
        with tempfile.TemporaryDirectory(prefix="reconloop-quality-") as work:
            scene = load_bench_scene(args.data, name, Path(work) / "scene")
            base = bench_config(scene, size, args.iterations, args.budget, args.device)
            size, plan = (base.width, base.height), base.budget.sentence if base.budget else None
            if plan:
                print(f"{name}: {plan}")
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for seed in seeds:
                seeded = replace(base, seed=seed, fit=replace(base.fit, seed=seed))
                start = LoopStart()  # the default row's memory and guide, the loop's start in the rows paired with it
                for v in variants:
                    loop_over, fit_over, gen_over = VARIANTS.get(v, ({}, {}, {}))
                    generator = variant_generator(v, gen_over, args.refine_seconds, args.refine_steps)
                    own = has_baselines(v)  # else paired with the default row: its loop starts from the default's
                    t0 = time.perf_counter()
                    folder_name = f"{v.replace(' ', '_').replace('/', '_')}_seed{seed}"
                    report = evaluate_scene(
                        scene,
                        Path(work) / folder_name,
                        device=args.device,
                        trajectory_mode="heldout",
                        config=EvalConfig(
                            loop=loop_config(seeded, loop_over, fit_over),
                            frames_per_leg=loop_over.get("frames_per_leg", FRAMES_PER_LEG),
                        ),
                        generator=generator,
                        baselines=own,
                        start=start if v == "default" or not own else None,
                    )
                    report["seconds"] = round(time.perf_counter() - t0, 1)
                    report["seed"] = seed
                    if isinstance(generator, RecordingRefiner):
                        picture = (
                            args.pictures / REFINE_PICTURE.format(run=f"{name}_{folder_name}")
                            if args.pictures
                            else None
                        )
                        if picture is not None:
                            args.pictures.mkdir(parents=True, exist_ok=True)
                        refine_report(generator, scene, report, picture)
                    runs[v].append(report)
                    if args.out:  # what a process killed by its time limit leaves behind: the rows done so far
                        partial = scene_result(size, plan, seeds, {k: r for k, r in runs.items() if r})
                        write_report({**results, "scenes": {**results["scenes"], name: partial}}, args.out, quiet=True)
                    if args.pictures:
                        args.pictures.mkdir(parents=True, exist_ok=True)
                        shutil.copy(
                            Path(work) / folder_name / EVAL_PICTURE, args.pictures / f"{name}_{folder_name}.png"
                        )
                    keys = [k for s in SCORE_KEYS for k in (s, f"{s}_masked") if k in report]
                    print(
                        f"{name} {size[0]}x{size[1]} {base.fit.iterations} it, seed {seed}, {v}: "
                        + ", ".join(f"{k} {report[k]['psnr']:.2f}/{report[k]['ssim']:.3f}" for k in keys)
                        + f" ({report['seconds']} s)",
                        flush=True,
                    )
            results["scenes"][name] = scene_result(size, plan, seeds, runs)
            for v, row in results["scenes"][name]["summary"].items():
                print(
                    f"{name}, mean of {len(seeds)} seeds, {v}: "
                    + ", ".join(f"{k} {val:.2f}" for k, val in row.items() if not k.endswith("_std")),
                    flush=True,
                )
    return write_report(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
