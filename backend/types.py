"""Typed data passed between the loop's stages and the estimators and generators they call
(DESIGN.md section 1), and the camera projections they share.

Letters in shapes: N points, C cameras, F frames, H, W image size. Cameras are OpenCV/COLMAP
world-to-camera (x right, y down, z forward); K in pixels, pixel i spans [i, i+1] (the gsplat
``viewmats``/``Ks`` convention). Colours are linear floats in [0, 1] that hold sRGB-encoded values
as read from 8-bit files (no colour conversion anywhere in the loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .scene import Camera


@dataclass(frozen=True)
class Cameras:
    """A batch of pinhole cameras sharing one image size.

    Attributes:
        w2c: world-to-camera, OpenCV. float32 [C, 4, 4]
        K: intrinsics, pixels. float32 [C, 3, 3]
        width, height: image size in pixels.
    """

    w2c: Tensor
    K: Tensor
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.w2c.ndim != 3 or self.w2c.shape[1:] != (4, 4):
            raise ValueError(f"Cameras.w2c must be [C, 4, 4]; got {tuple(self.w2c.shape)}")
        if self.K.shape != (self.w2c.shape[0], 3, 3):
            raise ValueError(f"Cameras.K must be [C, 3, 3] with C={self.w2c.shape[0]}; got {tuple(self.K.shape)}")

    def __len__(self) -> int:
        return int(self.w2c.shape[0])

    @property
    def device(self) -> torch.device:
        return self.w2c.device

    @property
    def c2w(self) -> Tensor:
        """Camera-to-world, OpenCV. [C, 4, 4]"""
        return torch.linalg.inv(self.w2c)

    @property
    def centers(self) -> Tensor:
        """Camera centres in world coordinates. [C, 3]"""
        R, t = self.w2c[:, :3, :3], self.w2c[:, :3, 3]
        return -(R.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(self.w2c.to(device), self.K.to(device), self.width, self.height)

    def __getitem__(self, idx: int | slice | Sequence[int] | Tensor) -> Cameras:
        if isinstance(idx, int):
            idx = [idx]
        return Cameras(self.w2c[idx], self.K[idx], self.width, self.height)

    def resized(self, width: int, height: int) -> Cameras:
        """The same cameras at another image size (K scaled per axis)."""
        scale = torch.tensor([width / self.width, height / self.height, 1.0], dtype=self.K.dtype, device=self.K.device)
        return Cameras(self.w2c, self.K * scale[None, :, None], width, height)

    @staticmethod
    def cat(items: Sequence[Cameras]) -> Cameras:
        sizes = {(c.width, c.height) for c in items}
        if len(sizes) != 1:
            raise ValueError(f"Cameras.cat needs one image size; got {sorted(sizes)}")
        w, h = sizes.pop()
        return Cameras(torch.cat([c.w2c for c in items]), torch.cat([c.K for c in items]), w, h)

    @staticmethod
    def from_scene(
        cams: Sequence[Camera], width: int | None = None, height: int | None = None, device: torch.device | str = "cpu"
    ) -> Cameras:
        """Batch scene cameras, scaled to (width, height) (default: the first camera's size)."""
        if not cams:
            raise ValueError("Cameras.from_scene needs at least one camera")
        width = int(width or cams[0].width)
        height = int(height or cams[0].height)
        scaled = [c.scaled(width, height) for c in cams]
        w2c = torch.tensor(np.stack([c.w2c for c in scaled]), dtype=torch.float32, device=device)
        K = torch.tensor(np.stack([c.K for c in scaled]), dtype=torch.float32, device=device)
        return Cameras(w2c, K, width, height)

    def to_scene(self) -> list[Camera]:
        w2c = self.w2c.detach().cpu().double().numpy()
        K = self.K.detach().cpu().double().numpy()
        return [Camera(w2c=w2c[i], K=K[i], width=self.width, height=self.height) for i in range(len(self))]


# Camera projections (DESIGN.md section 3): pixel i spans [i, i+1], so its centre is i + 0.5.
PIXEL_CENTER = 0.5


def project_points(xyz: Tensor, cams: Cameras) -> tuple[Tensor, Tensor]:
    """Project world points into every camera (no distortion).

    Args:
        xyz: world points. float32 [N, 3]
        cams: C cameras.
    Returns:
        uv: continuous pixel coordinates (pixel i spans [i, i+1]); meaningless where z <= 0. [C, N, 2]
        z: camera-space depth. [C, N]
    """
    R, t = cams.w2c[:, :3, :3], cams.w2c[:, :3, 3]
    cam = torch.einsum("cij,nj->cni", R, xyz) + t[:, None, :]  # [C, N, 3]
    z = cam[..., 2]
    uvw = torch.einsum("cij,cnj->cni", cams.K, cam)  # [C, N, 3]
    uv = uvw[..., :2] / uvw[..., 2:3].clamp_min(torch.finfo(xyz.dtype).tiny)
    return uv, z


def pixel_rays(cams: Cameras) -> Tensor:
    """Camera-space rays with z = 1 through every pixel centre. [C, H, W, 3]"""
    H, W = cams.height, cams.width
    dev = cams.device
    v, u = torch.meshgrid(
        torch.arange(H, device=dev, dtype=torch.float32) + PIXEL_CENTER,
        torch.arange(W, device=dev, dtype=torch.float32) + PIXEL_CENTER,
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], -1)  # [H, W, 3]
    Kinv = torch.linalg.inv(cams.K)  # [C, 3, 3]
    return torch.einsum("cij,hwj->chwi", Kinv, pix)


def backproject(depth: Tensor, cams: Cameras) -> Tensor:
    """World points of every pixel at its depth.

    Args:
        depth: camera z per pixel. [C, H, W]
        cams: C cameras matching the depth maps' size.
    Returns:
        world points. [C, H, W, 3]
    """
    cam_pts = pixel_rays(cams) * depth[..., None]
    c2w = cams.c2w
    return torch.einsum("cij,chwj->chwi", c2w[:, :3, :3], cam_pts) + c2w[:, None, None, :3, 3]


@dataclass
class GeometryMemory:
    """The scene memory M: a coloured point cloud with confidence and provenance.

    Attributes:
        xyz: world positions. float32 [N, 3]
        rgb: colours in [0, 1]. float32 [N, 3]
        confidence: per-point confidence in [0, 1]. float32 [N]
        source: id of the capture a point came from, -1 for generated frames. int32 [N]
    """

    xyz: Tensor
    rgb: Tensor
    confidence: Tensor
    source: Tensor

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def device(self) -> torch.device:
        return self.xyz.device

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> GeometryMemory:
        return GeometryMemory(
            torch.zeros(0, 3, device=device),
            torch.zeros(0, 3, device=device),
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.int32, device=device),
        )

    @staticmethod
    def cat(items: Sequence[GeometryMemory]) -> GeometryMemory:
        return GeometryMemory(
            torch.cat([m.xyz for m in items]),
            torch.cat([m.rgb for m in items]),
            torch.cat([m.confidence for m in items]),
            torch.cat([m.source for m in items]),
        )

    def select(self, keep: Tensor) -> GeometryMemory:
        """Points where ``keep`` (bool [N] or indices) holds."""
        return GeometryMemory(self.xyz[keep], self.rgb[keep], self.confidence[keep], self.source[keep])

    def to(self, device: torch.device | str) -> GeometryMemory:
        return GeometryMemory(
            self.xyz.to(device), self.rgb.to(device), self.confidence.to(device), self.source.to(device)
        )


GUIDE_SOURCE = -2  # Renders.source of the pixels the guide's render took over (backend.stages.guide)
ENSEMBLE_SOURCE = -3  # the same where the guide is a self-ensemble: its members' mean colour


@dataclass
class Renders:
    """The memory rendered into a batch of cameras.

    Attributes:
        rgb: colour in [0, 1], zero where nothing was rendered. float32 [C, H, W, 3]
        depth: camera z of the nearest point, 0 where empty. float32 [C, H, W]
        mask: pixels the memory covers. bool [C, H, W]
        source: capture id of the nearest point, -1 where empty or generated, ``GUIDE_SOURCE`` where
            the loop's guide (Gaussians on the captures) coloured the pixel, ``ENSEMBLE_SOURCE`` where
            a guide of several Gaussian sets did. int32 [C, H, W]
    """

    rgb: Tensor
    depth: Tensor
    mask: Tensor
    source: Tensor


@dataclass
class Views:
    """Images with their cameras (captures or frames) at one size.

    Attributes:
        images: colours in [0, 1]. float32 [F, H, W, 3]
        cams: their cameras (width, height match the images).
        ids: capture ids, or -1 for generated frames. list of F ints
        depth: optional camera z per pixel (0: unknown), for occlusion tests when sampling these
            views at 3D points. float32 [F, H, W] or None
        masks: optional object masks (True: the object, or what to keep). bool [F, H, W] or None
    """

    images: Tensor
    cams: Cameras
    ids: list[int]
    depth: Tensor | None = None
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class ConditionVideo:
    """What a generator gets for one segment (DESIGN.md section 1 step 5).

    The condition video is [memory.images ; carried.images ; renders.rgb] in that order; its mask is
    ones for memory and carried frames and ``renders.mask`` for the targets.

    Attributes:
        targets: the segment's trajectory cameras, F of them.
        renders: the memory rendered at ``targets``: rgb [F, H, W, 3], depth, mask, source.
        memory: the retrieved captures, resized to the target size (M views, may be 0).
        carried: the last frames generated for the previous segment (P views, may be 0).
        prompt: optional text prompt.
    """

    targets: Cameras
    renders: Renders
    memory: Views
    carried: Views
    prompt: str = ""


IMAGE_SLACK = 1e-3  # generated colours may pass [0, 1] by this much (a blend's or a decoder's rounding)


@dataclass
class Frames:
    """A generator's output at the target cameras.

    Attributes:
        images: generated colours in [0, 1]. float32 [F, H, W, 3]
        confidence: per-pixel confidence in [0, 1] (1 where the memory was rendered). float32 [F, H, W]
    """

    images: Tensor
    confidence: Tensor

    def check(self, targets: Cameras, who: str) -> None:
        """Raise ValueError, naming ``who`` (the generator), unless these are frames for ``targets``: images
        [F, H, W, 3], floating point, finite, in [0, 1] to rounding (IMAGE_SLACK), confidence [F, H, W] in
        [0, 1] (the fit's rule), F, H, W the cameras'. One host sync."""
        f, h, w = len(targets), targets.height, targets.width
        if tuple(self.images.shape) != (f, h, w, 3):
            raise ValueError(f"{who}: Frames.images must be [{f}, {h}, {w}, 3]; got {tuple(self.images.shape)}")
        if tuple(self.confidence.shape) != (f, h, w):
            raise ValueError(f"{who}: Frames.confidence must be [{f}, {h}, {w}]; got {tuple(self.confidence.shape)}")
        if not (self.images.is_floating_point() and self.confidence.is_floating_point()):  # 0/1 bytes pass the range
            raise ValueError(
                f"{who}: Frames.images and Frames.confidence must be floating point; got {self.images.dtype} and "
                f"{self.confidence.dtype}"
            )
        if f == 0:
            return
        bounds = [t.float().to(self.images.device) for t in (*self.images.aminmax(), *self.confidence.aminmax())]
        lo, hi, lo_conf, hi_conf = torch.stack(bounds).tolist()  # a NaN anywhere makes its tensor's min and max NaN
        if not (-IMAGE_SLACK <= lo and hi <= 1.0 + IMAGE_SLACK):  # False for NaN
            raise ValueError(f"{who}: Frames.images must be finite in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
        if not (0.0 <= lo_conf and hi_conf <= 1.0):
            raise ValueError(
                f"{who}: Frames.confidence must be finite in [0, 1]; got values in [{lo_conf:.3g}, {hi_conf:.3g}]"
            )
