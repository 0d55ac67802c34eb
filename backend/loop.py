"""The reconstruction loop, end to end (DESIGN.md section 1), in one readable function: ``run_loop``.

Captures (photos with cameras) and a camera trajectory go in; a job folder comes out (see
``backend/outputs.py`` for its files). Each numbered step is one module of ``backend/stages/``:

    0 cameras    captures with cameras (SfM where missing), the trajectory, the working size
    1 memory     the point memory M from the posed captures (plane-sweep MVS)
    1b guide     Gaussians on the captures alone (on CUDA a mean of 3 fits), rendered for the generator (ours)
    2 segments   cut the trajectory into segments
    per segment:
      3 retrieval  pick the captures that cover the segment
      4 render     splat M (and the guide) into the segment's cameras: colour, depth, mask
      5 generate   fill what M misses (generator by name: ``reproject`` by default)
      6 update     lift the generated frames into M (the closed loop)
    7 fit        3D Gaussians on captures (confidence 1) and generated frames (their confidence)

Between steps ``progress`` gets a ProgressEvent naming every finished artifact; a callback that
raises ``Cancelled`` stops the job there (the exception propagates to the caller).

Example::

    >>> from backend.scene import load_scene
    >>> result = run_loop(load_scene("demo_scene"), Path("out"), device="cpu")   # doctest: +SKIP
    >>> result.gaussians_path
    PosixPath('out/gaussians.ply')
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from protocol.ply import PointArrays

from . import outputs
from .budget import BudgetPlan, StepClock, measure_step_costs, measure_step_seconds, plan_budget, thin_memory
from .generators import GENERATORS, Generator, GeneratorCache, GeneratorConfig
from .progress import ProgressFn, ProgressTracker, no_progress, throttled
from .scene import Scene, Settings
from .stages.cameras import prepare_captures
from .stages.fit import (
    FitConfig,
    FitViews,
    Gaussians,
    captures_and_frames,
    crop_to_masks,
    default_rasterizer,
    fit_gaussians,
    gaussians_to_arrays,
    render_gaussians,
)
from .stages.generate import generate_segment, retrieved_views
from .stages.guide import GuideConfig, fit_guide, guided_renders, rasterizer_guide, render_guide
from .stages.memory import MemoryConfig, build_memory, memory_to_ply_arrays
from .stages.render import RenderConfig, render_memory
from .stages.retrieval import RetrievalConfig, retrieve_views
from .stages.segments import SegmentConfig, split_segments
from .stages.update import UpdateConfig, update_memory
from .types import Cameras, Frames, GeometryMemory, Views

log = logging.getLogger(__name__)

BLIND_COVERAGE = 0.01  # a segment whose renders cover less of its pixels is named in a note (a camera looking away)
# Share of the job's progress bar per step (rough CPU proportions; only the order matters).
PROGRESS_SHARES = {
    "cameras": 0.03,
    "memory": 0.1,
    "guide": 0.2,
    "generate": 0.3,
    "update": 0.0,
    "fit": 0.32,
    "outputs": 0.05,
}


@dataclass(frozen=True)
class LoopConfig:
    """Everything the loop needs besides the scene: one frozen config per step.

    Attributes:
        width, height: working resolution of renders, generated frames and Gaussian fitting. When
            the trajectory's aspect differs, the trajectory's aspect wins at about the same pixel count.
        estimator: geometry estimator name for step 1 (``mvs``; the job's ``geometry`` setting).
        generator: step 5's generator by name with its options (memory mode, attention, steps).
        seed, prompt: passed to the generator (segment k gets ``seed + k``).
        default_frames: frames of the path made through the captures when the scene has none.
        overview_rows: rows of overview.png.
        has_fit: step 7 on; off (Settings.gaussian_iterations = 0) writes no gaussians.ply (and
            fits no guide).
        has_crop_to_masks: when the captures have masks, gaussians.ply keeps only the Gaussians
            inside their visual hull (``backend.stages.fit.crop_to_masks``).
        budget: the time budget's plan (backend.budget) that set the working size, the fit's steps
            and its Gaussian cap; None without a budget, and without a fit (``has_fit`` off: the plan
            is sized by the fit's measured step cost, so a job with no fit runs at its own size).
    """

    width: int = Settings.width
    height: int = Settings.height
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    segments: SegmentConfig = field(default_factory=SegmentConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    estimator: str = "mvs"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    seed: int = Settings.seed
    prompt: str = ""
    default_frames: int = 24
    overview_rows: int = 4
    has_fit: bool = True
    has_crop_to_masks: bool = False
    budget: BudgetPlan | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        device: torch.device | str = "cpu",
        num_captures: int | None = None,
        **overrides: Any,
    ) -> LoopConfig:
        """The loop's config for a job's Settings (scene.json, Blender sidebar, CLI) on ``device``
        (which picks the Gaussian rasterizer: gsplat on CUDA, ``torch_cpu`` elsewhere).
        ``num_captures`` sizes what a generator's preparation adds to the time budget (the refiner's
        leave-out fits; None: the most it could be)."""
        base = cls()
        rasterizer = default_rasterizer(device)
        cfg = replace(
            base,
            width=settings.width,
            height=settings.height,
            guide=rasterizer_guide(replace(base.guide, enabled=settings.guide), rasterizer),
            segments=replace(base.segments, length=settings.segment_length, overlap=settings.segment_overlap),
            retrieval=replace(base.retrieval, k=settings.retrieval_k),
            update=replace(base.update, enabled=settings.update_memory),
            fit=replace(
                base.fit,
                iterations=max(settings.gaussian_iterations, 1),
                seed=settings.seed,
                rasterizer=rasterizer,
            ),
            has_fit=settings.gaussian_iterations > 0,
            estimator=settings.geometry,
            generator=GeneratorConfig.from_settings(settings),
            seed=settings.seed,
            prompt=settings.prompt,
        )
        # backend.budget: size the work to the time, from the fit's step cost (no fit: no plan; the
        # setting's help says so)
        if settings.time_budget_min and cfg.has_fit:
            fits, reserved_s = (1 + cfg.guide.members if cfg.guide.enabled else 1), 0.0
            cost = getattr(GENERATORS.get(cfg.generator.name), "preparation_cost", None)
            if cost is not None:  # a generator that fits and trains before the segments (``refine``)
                extra_fits, reserved_s = cost(cfg.generator, num_captures, has_guide=cfg.guide.enabled)
                fits += extra_fits
            views = cfg.fit.batch_size
            plan = plan_budget(
                settings.time_budget_min,
                measure_step_costs(rasterizer, device, views),
                max_iterations=cfg.fit.iterations,
                max_size=(cfg.width, cfg.height),
                fits=fits,
                reserved_s=reserved_s,
                reserved_for=f"the {cfg.generator.name} generator's training",
                measure=lambda n, w, h: measure_step_seconds(rasterizer, device, n, (w, h), views),
            )
            fit = replace(cfg.fit, iterations=plan.iterations, max_gaussians=plan.max_gaussians)
            cfg = replace(cfg, width=plan.width, height=plan.height, fit=fit, budget=plan)
        return replace(cfg, **overrides)


@dataclass
class LoopResult:
    """What a finished run leaves behind (files under ``out_dir``) plus the in-memory results.

    Attributes:
        out_dir: the job folder.
        artifacts: every file written, relative to out_dir, in the order announced.
        memory_initial, memory_final: M before and after the loop.
        frames: generated frames of the whole trajectory: images [F, H, W, 3], confidence [F, H, W].
        trajectory: the cameras the frames were generated at (working size).
        frame_numbers: their trajectory frame numbers.
        captures: the captures as used: images at working size, cameras, ids.
        gaussians: the fitted Gaussians (backend.stages.fit.Gaussians), None when fitting is off.
        metrics: what metrics.json holds.
    """

    out_dir: Path
    artifacts: list[str]
    memory_initial: GeometryMemory
    memory_final: GeometryMemory
    frames: Frames
    trajectory: Cameras
    frame_numbers: list[int]
    captures: Views
    gaussians: Any
    metrics: dict[str, Any]

    @property
    def gaussians_path(self) -> Path:
        return self.out_dir / outputs.GAUSSIANS_FILE


def run_loop(
    scene: Scene,
    out_dir: Path,
    *,
    device: torch.device | str,
    progress: ProgressFn = no_progress,
    config: LoopConfig | None = None,
    generator: Generator | None = None,
    guide: Sequence[Gaussians] = (),
    memory: GeometryMemory | None = None,
    memory_notes: Sequence[str] = (),
) -> LoopResult:
    """Run the whole loop on ``scene`` and write the job folder ``out_dir``.

    Args:
        scene: a loaded scene (captures, optional trajectory, settings).
        out_dir: the job folder (created). An earlier run's outputs there are replaced: the files the
            loop writes (``outputs.clear_outputs``) are removed first, so that none of them passes for
            this run's (fewer frames, no gaussians.ply); other files in the folder stay.
        device: where the stages run (``cuda``, ``cpu``); picked once by the caller.
        progress: called between steps with every finished artifact; may raise Cancelled.
        config: the loop's config; default ``LoopConfig.from_settings(scene.settings)``.
        generator: a ready generator (e.g. one a service's ``GeneratorCache`` keeps loaded between
            jobs); default: built from ``config.generator``, its weights located by the environment, and let go
            when the job ends (a multi-GPU generator's process group closed, so that the next job can make one).
        guide: the guide's members fitted already on these captures at the working size as
            ``fit_guide`` fits them with ``config.fit`` and ``config.guide`` (e.g. the guide an evaluation
            fitted and scored); the rest of ``config.guide.members`` are fitted here. Ignored when the
            guide is off.
        memory: a ready initial memory M, built by ``build_memory`` from these captures at the
            working size with ``config.memory`` and ``config.estimator`` (e.g. the one an evaluation
            built for its baselines: PatchMatch takes 15-85 s); default: built here.
        memory_notes: the notes building ``memory`` gave (fallbacks), added to the job's notes.
    Returns:
        LoopResult (files written under out_dir, plus in-memory results).
    """
    # a generator loaded here is let go when the job ends; one given is its owner's to keep
    with GeneratorCache() if generator is None else contextlib.nullcontext() as cache:
        return _run_loop(
            scene,
            out_dir,
            device=device,
            progress=progress,
            config=config,
            generator=generator,
            cache=cache,
            guide=guide,
            memory=memory,
            memory_notes=memory_notes,
        )


def _run_loop(
    scene: Scene,
    out_dir: Path,
    *,
    device: torch.device | str,
    progress: ProgressFn,
    config: LoopConfig | None,
    generator: Generator | None,
    cache: GeneratorCache | None,
    guide: Sequence[Gaussians],
    memory: GeometryMemory | None,
    memory_notes: Sequence[str],
) -> LoopResult:
    """:func:`run_loop`'s work; ``cache`` loads the generator where none is given."""
    device = torch.device(device)
    cfg = config or LoopConfig.from_settings(scene.settings, device=device, num_captures=len(scene.captures))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meter = outputs.StageMeter(device)
    with meter.measure("outputs"):
        outputs.clear_outputs(out_dir)
    track = ProgressTracker(progress, PROGRESS_SHARES)
    if cfg.budget is not None:  # what the time budget chose, first in the log, the report and Blender
        log.info(cfg.budget.sentence)
        track.finish("cameras", cfg.budget.sentence, share=0.0)

    # 0. Captures and cameras: photos as stored (sRGB untouched); SfM for captures without a camera.
    with meter.measure("cameras"):
        step0 = prepare_captures(
            scene,
            width=cfg.width,
            height=cfg.height,
            default_frames=cfg.default_frames,
            device=device,
            progress=throttled(track.within("cameras")),
        )
    captures, targets_all, W, H = step0.captures, step0.targets, step0.width, step0.height
    placed = [n for n in step0.notes if n.startswith("SfM could not place")]  # named to the user, not dropped
    needed = getattr(
        type(generator) if generator is not None else GENERATORS.get(cfg.generator.name), "min_captures", 1
    )
    if len(captures) < needed:  # said now, not after the memory and the guide
        raise ValueError(
            f"generator {cfg.generator.name!r} needs at least {needed} captures with cameras; this job has "
            f"{len(captures)}" + "".join(f" ({n})" for n in placed)
        )
    if cfg.budget is not None:
        step0.notes.insert(0, cfg.budget.sentence)
    track.finish(
        "cameras",
        f"{len(captures)} captures at {W}x{H}; {step0.num_estimated} cameras estimated; {len(targets_all)} "
        f"trajectory frames" + "".join(f"; {n}" for n in placed),
    )

    # 1. Geometry memory M from the posed captures.
    with meter.measure("memory"):
        if memory is None:
            memory = build_memory(
                captures,
                cfg.memory,
                estimator=cfg.estimator,
                notes=step0.notes,
                progress=throttled(track.within("memory")),
            )
        else:
            step0.notes.extend(memory_notes)
            memory = memory.to(device)
        memory_initial = memory
    if cfg.has_fit and cfg.fit.max_gaussians and len(memory) > cfg.fit.max_gaussians:  # thinned in the fits
        step0.notes.append(thin_memory(memory, cfg.fit.max_gaussians).note)
    with meter.measure("outputs"):  # every file the job writes is timed as outputs
        outputs.write_points(out_dir / outputs.POINTS_FILE, _points(memory))
        cams_name = outputs.write_cameras(
            out_dir, step0.records, list(zip(step0.frame_numbers, step0.trajectory, strict=True))
        )
    track.finish("memory", f"initial memory: {len(memory)} points", [outputs.POINTS_FILE, cams_name])

    # 1b. The guide: Gaussians on the captures alone, rendered for the generator.
    guide_depth = None  # the guide's depth in the captures where it is opaque, else 0 [C, H, W]
    guide_clock, fitted_members = StepClock(), 0  # the guide's steps as they ran: the last fit's under a time budget
    if cfg.guide.enabled and cfg.has_fit:
        with meter.measure("guide"):
            on_step = guide_clock.wrap(track.steps("guide", "guide Gaussians on the captures", cfg.fit.iterations))
            fitted_members = cfg.guide.members - len(guide or [])  # in lockstep: one step moves them all
            guide = fit_guide(captures, memory, cfg.fit, cfg.guide, device=device, ready=guide, progress=on_step)
            guide_depth = render_guide(guide, captures.cams, cfg.fit, cfg.guide)[1]
        sets = f" in {len(guide)} sets" if len(guide) > 1 else ""
        track.finish("guide", f"guide: {sum(map(len, guide))} Gaussians{sets} on the captures alone")
    else:
        guide = []
        track.skip("guide")

    # 2. Segments of the trajectory.
    segments = split_segments(len(targets_all), cfg.segments)
    gen = generator or cache.get(cfg.generator, device)
    if hasattr(gen, "prepare"):  # a generator that learns from the captures first (``refine``)
        with meter.measure("prepare"):
            gen.prepare(captures, cfg, device=device, progress=track.within("prepare"), notes=step0.notes)
    F_all = len(targets_all)
    frame_images = torch.zeros(F_all, H, W, 3, device=device)
    frame_conf = torch.zeros(F_all, H, W, device=device)
    point_rgb = torch.zeros(F_all, H, W, 3, device=device)  # M's render, for overview.png
    frame_cams = targets_all.to_scene()
    frame_index: dict[int, dict[str, Any]] = {}  # frames/cameras.json: this run's frames, kept here
    blind: set[int] = set()  # the trajectory's frames (indices) that see (almost) nothing of M or the guide
    for k, seg in enumerate(segments):
        targets = targets_all[seg.indices]
        # 3. Retrieval: captures that cover this segment's views of M.
        with meter.measure("retrieval"):
            picked = retrieve_views(memory, targets, captures.cams, cfg.retrieval)
        # 4. Render M (and the guide where it is opaque) into the segment's cameras.
        with meter.measure("render"):
            memory_renders = render_memory(memory, targets, cfg.render)  # M's own: overview.png and the update
            point_rgb[seg.indices] = memory_renders.rgb
            renders = guided_renders(memory_renders, guide, targets, cfg.fit, cfg.guide) if guide else memory_renders
            retrieved = retrieved_views(captures, picked, memory, cfg.render, guide_depth)
        # 5. Generate the frames from [retrieved captures ; carried frames ; renders].
        carried_idx = list(seg.carried)
        carried = Views(frame_images[carried_idx], targets_all[carried_idx], [-1] * len(carried_idx))
        with meter.measure("generate"):
            frames = generate_segment(
                gen,
                targets,
                renders,
                retrieved,
                carried,
                prompt=cfg.prompt,
                num_steps=cfg.generator.num_steps,
                seed=cfg.seed + k,
                progress=track.within("generate"),
            )
        frame_images[seg.indices] = frames.images
        frame_conf[seg.indices] = frames.confidence
        with meter.measure("outputs"):
            names = outputs.write_frames(
                out_dir,
                [step0.frame_numbers[i] for i in seg.indices],
                frames.images,
                frames.confidence,
                [frame_cams[i] for i in seg.indices],
                index=frame_index,
            )
        # 6. Update M with the generated frames (the closed loop).
        if cfg.update.enabled:
            with meter.measure("update"):
                lifted = Views(frames.images, targets, [-1] * len(targets))
                memory = update_memory(memory, lifted, memory_renders, frames.confidence, captures, cfg.update)
        covered = renders.mask.float().mean(dim=(1, 2))  # [F]
        coverage = float(covered.mean())
        span = f"{step0.frame_numbers[seg.start]}-{step0.frame_numbers[seg.stop - 1]}"
        # a segment under BLIND_COVERAGE, and any frame that sees none of it (one camera looking away mid-path,
        # which the segment's mean hides; a frame of a small memory's point render may see the object in 0.5 %)
        blind.update(i for i, share in zip(seg.indices, covered.tolist()) if coverage < BLIND_COVERAGE or share == 0)
        track.finish(
            "generate",
            f"segment {k + 1}/{len(segments)}: frames {span}, {len(picked)} captures "
            f"retrieved, {coverage:.0%} of pixels rendered, memory {len(memory)} points",
            names,
            share=PROGRESS_SHARES["generate"] / len(segments),
        )
    if blind:
        step0.notes.append(
            f"the trajectory's frames {', '.join(_spans(sorted(blind), step0.frame_numbers))} see almost nothing the "
            f"captures saw (under {BLIND_COVERAGE:.0%} of their pixels, or none of a frame's): those frames are the "
            "generator's guess; check that the trajectory looks at the scene from near the captures"
        )
    if note := getattr(gen, "segments_note", None):  # what a learning generator did per segment (``refine``)
        step0.notes.append(note)
    with meter.measure("outputs"):
        outputs.write_points(out_dir / outputs.POINTS_FINAL_FILE, _points(memory))
    track.finish("update", f"final memory: {len(memory)} points", [outputs.POINTS_FINAL_FILE])

    # 7. Fit Gaussians on captures (confidence 1) and generated frames (their confidence), from the
    #    captures' memory (the updates steer later segments; the fit starts from what was measured).
    #    Resuming the guide's Gaussians instead lost on the H200 (docs/benchmarks.md, run 22).
    gaussians, fit_cfg = None, cfg.fit
    if cfg.has_fit:
        if cfg.budget is not None:  # a job behind its plan gives the time back in its last fit's steps
            guide_step = guide_clock.seconds_per_step()
            iterations, late = cfg.budget.last_fit_steps(
                meter.summary()["total_seconds"], guide_step / fitted_members if guide_step else None
            )
            if late:
                log.warning(late)
                step0.notes.append(late)
                fit_cfg = replace(fit_cfg, iterations=iterations)
        views = captures_and_frames(captures, FitViews(frame_images, targets_all, frame_conf), fit_cfg.capture_share)
        with meter.measure("fit"):
            on_step = track.steps("fit", "Gaussians", fit_cfg.iterations)
            gaussians = fit_gaussians(views, memory_initial, fit_cfg, device=device, progress=on_step)
            if cfg.has_crop_to_masks and captures.masks is not None:
                gaussians = crop_to_masks(gaussians, captures.cams, captures.masks)
        with meter.measure("outputs"):
            outputs.write_gaussians(out_dir / outputs.GAUSSIANS_FILE, gaussians_to_arrays(gaussians))
        track.finish("fit", f"{len(gaussians)} Gaussians after {fit_cfg.iterations} steps", [outputs.GAUSSIANS_FILE])
    else:
        track.skip("fit")

    # Outputs: overview.png and metrics.json.
    with meter.measure("outputs"):
        overview_name = write_overview(out_dir, captures, point_rgb, frame_images, gaussians, targets_all, cfg)
    if cfg.budget is not None and (overrun := cfg.budget.overrun_note(meter.summary()["total_seconds"])):
        log.warning(overrun)
        step0.notes.append(overrun)
    metrics = {
        "scene": str(scene.root),
        "working_size": [W, H],
        "captures": len(captures),
        "frames": F_all,
        "segments": len(segments),
        "generator": cfg.generator.name,
        "update_memory": cfg.update.enabled,
        "points_initial": len(memory_initial),
        "points_final": len(memory),
        "gaussians": len(gaussians) if gaussians is not None else 0,
        "fit_iterations": fit_cfg.iterations if cfg.has_fit else 0,
        "mean_confidence": float(frame_conf.mean()),
        "notes": step0.notes,
        "timing": meter.summary(),
    }
    if cfg.budget is not None:  # the plan as fields (the note says it for people): what another run can compare
        metrics["budget"] = cfg.budget.as_json()
    metrics_name = outputs.write_metrics(out_dir, metrics)
    track.finish("outputs", "overview and metrics written", [overview_name, metrics_name])

    return LoopResult(
        out_dir=out_dir,
        artifacts=track.artifacts,
        memory_initial=memory_initial,
        memory_final=memory,
        frames=Frames(frame_images, frame_conf),
        trajectory=targets_all,
        frame_numbers=step0.frame_numbers,
        captures=captures,
        gaussians=gaussians,
        metrics=metrics,
    )


def _spans(indices: Sequence[int], numbers: Sequence[int]) -> list[str]:
    """Runs of consecutive trajectory indices (ascending) as frame numbers: ``["3", "7-9"]``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [f"{numbers[r[0]]}" if len(r) == 1 else f"{numbers[r[0]]}-{numbers[r[-1]]}" for r in runs]


def _points(memory: GeometryMemory) -> PointArrays:
    xyz, rgb, conf, source = memory_to_ply_arrays(memory)
    return PointArrays(xyz=xyz, rgb=rgb, confidence=conf, source=source)


def write_overview(
    out_dir: Path,
    captures: Views,
    point_renders: torch.Tensor,
    frames: torch.Tensor,
    gaussians: Gaussians | None,
    targets: Cameras,
    cfg: LoopConfig,
) -> str:
    """overview.png: rows of [capture | M's render with holes | generated frame | Gaussian render]
    at evenly spread frames (no Gaussian column without Gaussians). Returns its name."""
    picks = outputs.spread(len(targets), cfg.overview_rows)
    columns = [captures.images[[r % len(captures) for r in range(len(picks))]], point_renders[picks], frames[picks]]
    if gaussians is not None:
        columns.append(render_gaussians(gaussians, targets[picks], cfg.fit))
    return outputs.write_overview(out_dir, outputs.overview_rows(columns, range(len(picks))))
