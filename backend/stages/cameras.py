"""Step 0 of the loop: captures and cameras (DESIGN.md section 1).

The captures' photos as stored (8-bit sRGB, no colour management), each with its camera: given by
the scene, or estimated with SfM (pycolmap) when some are missing. Distorted photos are undistorted
to ideal pinholes. The trajectory is the scene's, or a closed path through the captures when it has
none. Everything is brought to the working size, at the trajectory's aspect.

Example::

    >>> from backend.scene import load_scene
    >>> step = prepare_captures(load_scene("scene"), width=320, height=240, default_frames=24,
    ...                         device="cpu")   # doctest: +SKIP
    >>> step.captures.images.shape   # [C, H, W, 3]
    torch.Size([3, 240, 320, 3])
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from protocol.errors import listed
from protocol.settings import BY_NAME

from ..camera_paths import default_trajectory, similarity, transform_camera
from ..formats.undistort import undistort_image
from ..masks import eight_bit, stack_masks
from ..outputs import CaptureCamera
from ..progress import WorkProgress, no_work_progress
from ..scene import SIM_MIN_CAMERAS, Camera, Capture, Scene, SceneError, image_size, relative_posix
from ..types import Cameras, Views

U8_MAX = 255.0
MIN_SIDE, MAX_SIDE = BY_NAME["height"].range  # the working size's sides as the settings allow them (16, 4096)


@dataclass
class CaptureStep:
    """What step 0 hands to the rest of the loop.

    Attributes:
        captures: the captures used, at the working size; ``ids`` index them (= memory source ids).
        targets: the trajectory's cameras at the working size. [F]
        trajectory: the trajectory's cameras as given (or made), at their own size.
        frame_numbers: the trajectory's frame numbers.
        records: each used capture's name, image and full-size camera, for cameras.json.
        num_estimated: how many of the used cameras came from SfM.
        notes: plain-language lines for the job's report (what was estimated, dropped or made).
    """

    captures: Views
    targets: Cameras
    trajectory: list[Camera]
    frame_numbers: list[int]
    records: list[CaptureCamera]
    num_estimated: int
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.targets.width

    @property
    def height(self) -> int:
        return self.targets.height


def load_views(
    captures: Sequence[Capture],
    width: int,
    height: int,
    device: torch.device | str,
    *,
    cameras: Sequence[Camera] | None = None,
    pinholes: Sequence[tuple[np.ndarray, Camera]] | None = None,
) -> Views:
    """Photos as views at a working size: undistorted, resized, with their masks where they have
    them; ids 0..n-1 in the given order.

    Args:
        captures: the photos (and their masks).
        width, height: the working size.
        device: where the tensors go.
        cameras: each photo's camera as stored (default: the capture's own ``camera``).
        pinholes: the photos already undistorted with their pinhole cameras (:func:`undistorted`),
            when the caller has them; default: made here.
    """
    cameras = [c.camera for c in captures] if cameras is None else list(cameras)
    if pinholes is None:
        pinholes = [
            undistorted(load_image(c.image, capture=c.name), cam) for c, cam in zip(captures, cameras, strict=True)
        ]
    return Views(
        to_tensor([resize_image(img, width, height) for img, _ in pinholes], device),
        Cameras.from_scene([cam for _, cam in pinholes], width, height, device=device),
        list(range(len(pinholes))),
        masks=stack_masks(captures, cameras, width, height, device),
    )


def prepare_captures(
    scene: Scene,
    *,
    width: int,
    height: int,
    default_frames: int,
    device: torch.device | str,
    progress: WorkProgress = no_work_progress,
) -> CaptureStep:
    """Step 0: the captures with cameras, the trajectory, both at the working size.

    Args:
        scene: a loaded scene.
        width, height: the configured working size; the trajectory's aspect wins (:func:`working_size`).
        default_frames: frames of the closed path made through the captures when the scene has no
            trajectory.
        device: where the image tensors go.
        progress: ``(fraction, message)`` of SfM, where captures have no camera; it may raise ``Cancelled``.
    """
    notes: list[str] = []
    cams_found, is_estimated = capture_cameras(scene, notes, progress)
    kept = [i for i, c in enumerate(cams_found) if c is not None]
    if len(kept) < len(cams_found):
        missing = [c.name for c, cam in zip(scene.captures, cams_found, strict=True) if cam is None]
        notes.append(f"SfM could not place {len(missing)} of {len(cams_found)} photos; left out: {', '.join(missing)}")
    used = [scene.captures[i] for i in kept]
    pinholes = [
        undistorted(load_image(c.image, capture=c.name), cams_found[i]) for c, i in zip(used, kept, strict=True)
    ]
    trajectory = [t.camera for t in scene.trajectory]
    frame_numbers = [t.frame for t in scene.trajectory]
    if not trajectory:
        trajectory = default_trajectory([c for _, c in pinholes], default_frames)
        frame_numbers = list(range(1, len(trajectory) + 1))
        notes.append(
            f"the scene has no trajectory: made a closed path of {len(trajectory)} frames through the captures"
        )
    W, H, note = working_size(width, height, trajectory)
    if note:
        notes.append(note)
    # ids = memory.source ids: indices into the captures used
    captures = load_views(used, W, H, device, cameras=[cams_found[i] for i in kept], pinholes=pinholes)
    if captures.masks is not None:  # a capture whose mask keeps nothing adds nothing: said, not silent
        kept_any = captures.masks.flatten(1).any(dim=1).tolist()  # one read of the device
        empty = [c.name for c, kept in zip(used, kept_any, strict=True) if not kept]
        if empty:
            many = len(empty) > 1
            notes.append(
                f"the mask{'s' if many else ''} of {len(empty)} capture{'s' if many else ''} ({listed(empty, sep=', ')}) "
                f"keep{'' if many else 's'} no pixel at the working size {W}x{H}: "
                f"{'they add' if many else 'it adds'} nothing to the memory or the fit (a mask is white, or opaque in "
                "the photo's alpha, where the object is; an inverted or blank mask?)"
            )
    records = [
        CaptureCamera(
            name=c.name, image=relative_posix(c.image, scene.root), camera=cams_found[i], is_estimated=is_estimated[i]
        )
        for c, i in zip(used, kept, strict=True)
    ]
    return CaptureStep(
        captures=captures,
        targets=Cameras.from_scene(trajectory, W, H, device=device),
        trajectory=trajectory,
        frame_numbers=frame_numbers,
        records=records,
        num_estimated=sum(is_estimated[i] for i in kept),
        notes=notes,
    )


def load_image(
    path: Path, width: int | None = None, height: int | None = None, *, capture: str | None = None
) -> np.ndarray:
    """An 8-bit sRGB image as stored (no colour management; a 16-bit grey level to 8 bits), optionally resized.
    uint8 [H, W, 3]

    A file that cannot be read or decoded (truncated, not an image) raises SceneError naming the
    capture (``capture``, when the caller knows it) and the file: the scene's check reads only the
    header, so a broken photo is found here, and Pillow's own error names neither.
    """
    try:
        with Image.open(path) as im:
            im = eight_bit(im).convert("RGB")
            if width is not None and height is not None and im.size != (width, height):
                im = im.resize((width, height), Image.BILINEAR)
            return np.asarray(im).copy()
    except (OSError, SyntaxError, ValueError) as err:  # Pillow: OSError (truncated), SyntaxError (bad chunks)
        who = f"capture {capture!r}: " if capture is not None else ""
        raise SceneError(f"{who}cannot read the image {path}: {err}") from err


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an 8-bit image (bilinear with antialiasing). uint8 [height, width, 3]"""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def to_tensor(images: Sequence[np.ndarray], device: torch.device | str) -> Tensor:
    """uint8 images to floats in [0, 1]. [F, H, W, 3]"""
    return torch.from_numpy(np.stack(images)).to(device=device, dtype=torch.float32) / U8_MAX


def working_size(width: int, height: int, trajectory: Sequence[Camera]) -> tuple[int, int, str]:
    """(width, height, note): the configured size, or the trajectory's aspect at about its pixel count."""
    if not trajectory:
        return width, height, ""
    tw, th = trajectory[0].width, trajectory[0].height
    if abs(tw / th - width / height) < 1e-3:
        return width, height, ""
    scale = math.sqrt(width * height / (tw * th))
    raised = scale * min(tw, th) < MIN_SIDE  # a very wide or tall trajectory: its short side MIN_SIDE at least
    scale = max(scale, MIN_SIDE / min(tw, th))
    w, h = min(round(tw * scale), MAX_SIDE), min(round(th * scale), MAX_SIDE)  # the long side MAX_SIDE at most
    how = f"its short side raised to {MIN_SIDE} pixels" if raised else "at about the same pixel count"
    note = (
        f"working size {width}x{height} has another aspect than the trajectory ({tw}x{th}); "
        f"using {w}x{h}, the trajectory's aspect {how}"
    )
    return w, h, note


def capture_cameras(
    scene: Scene, notes: list[str], progress: WorkProgress = no_work_progress
) -> tuple[list[Camera | None], list[bool]]:
    """Each capture's camera; when some are missing, all are estimated with SfM (pycolmap).

    With 3 or more given cameras, the SfM frame is aligned to them (similarity on camera centres)
    and the given cameras are kept; otherwise the SfM cameras are used for all captures. A capture
    SfM could not register gets None. Returns (cameras, is_estimated).
    """
    given = [c.camera for c in scene.captures]
    if all(c is not None for c in given):
        return given, [False] * len(given)
    from ..estimators.sfm import SfMConfig, estimate_cameras

    known = [c for c in given if c is not None]
    sizes = {(c.width, c.height) for c in known}
    same_size = len(sizes) == 1 and all(image_size(c.image) == next(iter(sizes)) for c in scene.captures)
    # SfM may hold every photo to the given intrinsics only where the given cameras share one pinhole (no zoom
    # between them, no lens distortion left to model)
    one_pinhole = all(
        np.allclose(c.K, known[0].K) and (c.distortion is None or c.distortion.is_identity) for c in known
    )
    known_K = known[0].K if known and same_size and one_pinhole else None
    with tempfile.TemporaryDirectory(prefix="reconloop-sfm-") as work:
        sfm = SfMConfig(camera_grouping=scene.settings.photo_cameras)
        estimated = estimate_cameras(
            [c.image for c in scene.captures],
            known_K=known_K,
            work_dir=work,
            cfg=sfm,
            photo_names=[c.name for c in scene.captures],  # the user's names, not a job store's files
            progress=progress,
        )
    pairs = [(g, e) for g, e in zip(given, estimated, strict=True) if g is not None and e is not None]
    if len(pairs) >= SIM_MIN_CAMERAS:
        s, R, t = similarity([e.center for _, e in pairs], [g.center for g, _ in pairs])
        estimated = [None if e is None else transform_camera(e, s, R, t) for e in estimated]
        cams = [g if g is not None else e for g, e in zip(given, estimated, strict=True)]
        notes.append(f"estimated {sum(g is None for g in given)} cameras with SfM, aligned to {len(pairs)} given ones")
        return cams, [g is None for g in given]
    if known and scene.trajectory:  # load_scene let it through: enough given, too few placed
        raise SceneError(
            f"trajectory: SfM placed {len(pairs)} of the {len(known)} captures that have cameras, fewer than the "
            f"{SIM_MIN_CAMERAS} its frame is aligned by, so the trajectory's cameras would not be where the photos "
            "are; give more captures their cameras, or photos SfM can match"
        )
    if known:
        notes.append(
            f"only {len(known)} captures had cameras (fewer than {SIM_MIN_CAMERAS} to align to): SfM cameras used for all"
        )
    return list(estimated), [True] * len(given)


def undistorted(image: np.ndarray, camera: Camera) -> tuple[np.ndarray, Camera]:
    """The image as an ideal pinhole would see it, and its camera without distortion."""
    if camera.distortion is None or camera.distortion.is_identity:
        return image, replace(camera, distortion=None)
    return undistort_image(image, camera), replace(camera, distortion=None)
