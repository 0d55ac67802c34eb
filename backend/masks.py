"""Capture masks: which pixels of a photo are the object (or what to keep).

A capture's mask comes from, in this order: its ``mask`` file in scene.json (greyscale, or RGBA whose
alpha is the mask; a pixel above half, 127 of 255, is kept), the photo's own alpha channel, or nowhere (None: every pixel
counts). Importers make mask files from a dataset's ``mask/`` folder (IDR/NeuS DTU) or from
silhouettes (:func:`threshold_silhouette`, the Middlebury recipe).

Masks are boolean [H, W] arrays at the photo's size, undistorted with the photo and resized to the
working size by nearest neighbour (a mask pixel is never half object).

Example::

    >>> m = threshold_silhouette(np.zeros((8, 8, 3), np.uint8), threshold=0.19, dilate_px=1, erode_px=1)
    >>> m.shape, bool(m.any())
    ((8, 8), False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .scene import Camera, Capture, SceneError

U8_MAX = 255.0
MASK_LEVEL = 127  # a mask or alpha pixel above this (of 255) is kept
OPAQUE = 255  # an alpha of this everywhere masks nothing
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes of a 16-bit grey level
U16_PER_U8 = 257  # 65535 / 255


class MaskError(SceneError):
    """A mask file the job cannot use; ``reason`` says why without the file's name (for a client that sent it)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"mask: {path} {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (a process pool's error), not as its text
        return type(self), (self.path, self.reason), self.__dict__


def eight_bit(im: Any) -> Any:
    """A Pillow image with a 16-bit grey level (a 16-bit greyscale PNG: mode ``I;16`` or ``I``) as an 8-bit one
    (``L``, value / 257); any other as it is. Pillow's own conversion clips such a level at 255, so a 16-bit photo
    read almost white and a mask's soft edge as kept."""
    from PIL import Image

    if im.mode not in HIGH_BIT_MODES:
        return im
    level = np.asarray(im, dtype=np.float64) / U16_PER_U8
    return Image.fromarray(np.clip(np.rint(level), 0, 255).astype(np.uint8), mode="L")


def read_mask(path: Path) -> np.ndarray:
    """A mask file: alpha when the image has one that masks anything, else its grey level (16-bit too); above half
    is kept. bool [H, W]

    An alpha opaque everywhere is no mask (an editor's black-and-white export with an alpha channel): the grey
    level is. An all-black mask is a view without the object (its masked score is left out: ``masked_score``);
    one whose marks all sit at or below half (a 0/1 label image) raises MaskError naming the file,
    rather than being read as empty, as does a file that cannot be decoded."""
    from PIL import Image  # not in Blender's Python: only where a mask is read or written

    try:
        with Image.open(path) as im:
            grey = None
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                grey = np.asarray(im.convert("RGBA"))[..., 3]
            if grey is None or grey.min() == OPAQUE:
                grey = np.asarray(eight_bit(im).convert("L"))
    except Exception as err:  # PIL raises several types (SyntaxError too) for a file cut short or corrupt
        raise MaskError(path, f"cannot be decoded ({type(err).__name__})") from err
    mask = grey > MASK_LEVEL
    peak = int(grey.max())
    if 0 < peak <= MASK_LEVEL:  # marks, none above half: a label image (0/1), not an empty view
        raise MaskError(
            path,
            f"keeps no pixel (its highest value {peak} is not above {MASK_LEVEL} of 255); "
            "a mask is white (255) where the object is",
        )
    return mask


def image_alpha(path: Path) -> np.ndarray | None:
    """The photo's alpha channel as a mask (above half kept), or None when it has none or it is opaque everywhere
    (a PNG saved with an alpha channel it does not use: no mask, so no hull and no masked scores). bool [H, W]"""
    from PIL import Image  # not in Blender's Python: only where a mask is read or written

    with Image.open(path) as im:
        if im.mode not in ("RGBA", "LA", "PA") and not (im.mode == "P" and "transparency" in im.info):
            return None
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
    return None if alpha.min() == OPAQUE else alpha > MASK_LEVEL


def capture_mask(capture: Capture, camera: Camera | None = None) -> np.ndarray | None:
    """A capture's mask at its photo's size (the ``mask`` file, else the photo's alpha), undistorted
    like the photo when ``camera`` has distortion; None when it has neither. bool [H, W]"""
    mask = read_mask(capture.mask) if capture.mask is not None else image_alpha(capture.image)
    if mask is None:
        return None
    if camera is not None and camera.distortion is not None and not camera.distortion.is_identity:
        from .formats.undistort import undistort_mask

        mask = undistort_mask(mask, camera)
    return mask


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask at another size, nearest neighbour. bool [height, width]"""
    from PIL import Image  # not in Blender's Python: only where a mask is read or written

    if mask.shape == (height, width):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(im) > MASK_LEVEL


def write_mask(mask: np.ndarray, path: Path) -> Path:
    """Write a mask as an 8-bit greyscale PNG (255 kept, 0 masked out). Returns ``path``."""
    from PIL import Image  # not in Blender's Python: only where a mask is read or written

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def threshold_silhouette(image: np.ndarray, *, threshold: float, dilate_px: int, erode_px: int) -> np.ndarray:
    """An object's silhouette on a dark backdrop: any channel above ``threshold`` (0..1), then a
    dilation by ``dilate_px`` and an erosion by ``erode_px`` (square structuring elements), which
    closes dark shadows on the object and leaves the silhouette a few pixels generous.

    Args:
        image: the photo, 8-bit sRGB. uint8 [H, W, 3]
        threshold: brightness (max over channels, 0..1) above which a pixel is the object.
        dilate_px, erode_px: radii in pixels.
    Returns:
        the silhouette. bool [H, W]
    """
    import cv2

    bright = (image.max(axis=-1).astype(np.float32) / U8_MAX) > threshold
    mask = bright.astype(np.uint8)
    if dilate_px > 0:
        mask = cv2.dilate(mask, np.ones((2 * dilate_px + 1, 2 * dilate_px + 1), np.uint8))
    if erode_px > 0:
        mask = cv2.erode(mask, np.ones((2 * erode_px + 1, 2 * erode_px + 1), np.uint8))
    return mask > 0


def stack_masks(
    captures: list[Capture], cameras: list[Camera], width: int, height: int, device, *, need_pixels: bool = True
):
    """The captures' masks at the working size, or None when none of them has one (a capture
    without a mask keeps every pixel). ``need_pixels``: masks that all keep no pixel are an error (captures to fit;
    held-out views without the object only leave their masked score out). bool [C, height, width]"""
    import torch  # kept out of the module's imports: the CLI's parser imports the importers, not torch

    found = [capture_mask(c, cam) for c, cam in zip(captures, cameras)]
    if all(m is None for m in found):
        return None
    full = [np.ones((height, width), bool) if m is None else resize_mask(m, width, height) for m in found]
    if need_pixels and not any(m.any() for m in full):  # nothing left to reconstruct at this size: say why
        where = ", ".join(f"{c.name} ({c.mask.name if c.mask is not None else 'its alpha'})" for c in captures)
        raise SceneError(
            f"captures: every mask keeps no pixel at the working size {width}x{height}: {where}; a mask keeps the "
            "object white (or opaque in the photo's alpha channel) and the rest black"
        )
    return torch.from_numpy(np.stack(full)).to(device)
