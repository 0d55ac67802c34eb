"""Step 5 of the loop: generate the segment's frames (DESIGN.md section 1).

The condition video is [retrieved captures ; frames carried over from the previous segment ;
renders of the target poses]. The retrieved captures come with a depth map (the guide's where it is
opaque, else the memory's) so that a generator sampling them at 3D points can test occlusion. The
generator itself is picked by name from :mod:`backend.generators`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..generators import GenerateProgress, Generator
from ..types import Cameras, ConditionVideo, Frames, GeometryMemory, Renders, Views
from .render import RenderConfig, render_memory


def retrieved_views(
    captures: Views,
    picked: Sequence[int],
    memory: GeometryMemory,
    render_cfg: RenderConfig,
    guide_depth: Tensor | None = None,
) -> Views:
    """The retrieved captures with a depth map for occlusion tests.

    Args:
        captures: all captures at the working size.
        picked: indices into ``captures`` (retrieval's choice).
        memory: the memory M, rendered into the picked captures for their depth.
        render_cfg: point splatting settings.
        guide_depth: the guide's depth in every capture, 0 where it is not opaque; it wins over the
            memory's where set. float32 [C, H, W] or None
    Returns:
        Views of the picked captures; ``depth`` float32 [P, H, W] (None when nothing is picked).
    """
    picked = list(picked)
    depth = None
    if picked:
        depth = render_memory(memory, captures.cams[picked], render_cfg).depth
        if guide_depth is not None:
            depth = torch.where(guide_depth[picked] > 0, guide_depth[picked], depth)
    return Views(captures.images[picked], captures.cams[picked], [captures.ids[i] for i in picked], depth)


def generate_segment(
    generator: Generator,
    targets: Cameras,
    renders: Renders,
    retrieved: Views,
    carried: Views,
    *,
    prompt: str,
    num_steps: int,
    seed: int,
    progress: GenerateProgress | None = None,
) -> Frames:
    """The segment's frames from its condition video.

    Args:
        generator: any :class:`~backend.generators.Generator`.
        targets: the segment's cameras. [F]
        renders: M (or the guide) rendered into ``targets``; shapes [F, H, W(, 3)].
        retrieved: the retrieved captures (:func:`retrieved_views`).
        carried: the last frames of the previous segment, ids -1 (empty for the first).
        prompt, num_steps, seed, progress: passed to the generator (``progress`` may raise to cancel).
    Returns:
        Frames: images [F, H, W, 3] and confidence [F, H, W].
    """
    cond = ConditionVideo(targets=targets, renders=renders, memory=retrieved, carried=carried, prompt=prompt)
    frames = generator.generate(cond, num_steps=num_steps, seed=seed, progress=progress)
    frames.check(targets, f"generator {type(generator).__name__}")  # a wrong frame fails here, not in the fit
    return frames
