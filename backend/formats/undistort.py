"""Undistorted copies of captured photos (and of their mask files), same K, so that every later stage
sees ideal pinholes.

OpenCV's remap puts pixel centres at integer coordinates; ours (DESIGN.md section 3) sit at i + 0.5.
The maps are therefore built with K shifted by half a pixel, so the output pixel with centre
(u + 0.5, v + 0.5) under K samples the photo where the distorted camera sees the same ray.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from backend.fileio import write_atomic
from backend.masks import MASK_LEVEL, read_mask, write_mask
from backend.scene import Camera, Capture, SceneError

UNDISTORTED_DIR = "undistorted"
# Held-out views beside the captures' folder, not in it: a capture's name may hold a "/" (``heldout/r_0``), so
# no folder inside another's is safe from its names. Each folder's masks go to ``<folder>_masks`` alike.
UNDISTORTED_HELDOUT_DIR = "undistorted_heldout"
MASKS_SUFFIX = "_masks"
JPEG_QUALITY = 95  # undistorted JPEGs are re-encoded; PNGs stay lossless
HALF_PIXEL = 0.5


def opencv_pixel_K(K: np.ndarray) -> np.ndarray:
    """K with the principal point moved half a pixel, from our convention (pixel i spans [i, i+1]) to
    OpenCV's image sampling convention (pixel i centred on i). float64 [3, 3]"""
    K = np.array(K, dtype=np.float64)
    K[0, 2] -= HALF_PIXEL
    K[1, 2] -= HALF_PIXEL
    return K


def undistort_image(image: np.ndarray, camera: Camera) -> np.ndarray:
    """Remap a photo taken with ``camera`` (with distortion) to the ideal pinhole with the same K.

    Args:
        image: the photo, any channel count and dtype OpenCV remaps. [H, W] or [H, W, D]
        camera: its camera; ``camera.distortion`` must be set.
    Returns:
        The undistorted image, same shape and dtype; pixels that see outside the photo are 0.
    """
    import cv2

    if camera.distortion is None:
        raise ValueError("undistort_image: camera.distortion is None; nothing to undistort")
    K_cv = opencv_pixel_K(camera.K)
    size = (camera.width, camera.height)
    map_x, map_y = cv2.initUndistortRectifyMap(K_cv, camera.distortion.to_opencv(), None, K_cv, size, cv2.CV_32FC1)
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def undistort_mask(mask: np.ndarray, camera: Camera) -> np.ndarray:
    """A mask remapped like its photo (:func:`undistort_image`), kept above
    :data:`backend.masks.MASK_LEVEL`. bool [H, W] -> bool [H, W]"""
    return undistort_image(mask.astype(np.uint8) * 255, camera) > MASK_LEVEL


def undistort_capture(capture: Capture, dst: Path, folder: str = UNDISTORTED_DIR) -> Capture:
    """Write the undistorted photo to ``dst/<folder>/<name><suffix>`` and, when the capture has a
    ``mask`` file, its undistorted mask (:func:`undistort_mask`) to ``dst/<folder>_masks/<name>.png``; return the capture with that image, that mask and
    the camera without distortion. Captures without distortion come back as they are (an identity
    distortion is only dropped: photo and mask already agree with the pinhole).

    Names are unique among a scene's captures, not between captures and held-out views (NeRF's
    ``train/r_0`` and ``test/r_0``), so held-out views go to a folder of their own beside the captures'
    (:data:`UNDISTORTED_HELDOUT_DIR`): one must never overwrite a capture's photo or mask, whatever the names."""
    import cv2

    cam = capture.camera
    if cam is None or cam.distortion is None:
        return capture
    if cam.distortion.is_identity:
        return replace(capture, camera=replace(cam, distortion=None))
    image = cv2.imread(str(capture.image), cv2.IMREAD_UNCHANGED)  # no EXIF rotation, like PIL's size
    if image is None:
        raise SceneError(f"{capture.name}: cannot read {capture.image}")
    if image.shape[:2] != (cam.height, cam.width):
        raise SceneError(f"{capture.name}: image is {image.shape[1]}x{image.shape[0]}; camera {cam.width}x{cam.height}")
    mask = None
    if capture.mask is not None:  # before anything is written: a bad mask leaves no half-undistorted capture
        mask = read_mask(capture.mask)
        if mask.shape != (cam.height, cam.width):
            raise SceneError(
                f"{capture.name}: mask {capture.mask} is {mask.shape[1]}x{mask.shape[0]}; camera {cam.width}x{cam.height}"
            )
    suffix = capture.image.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(suffix, undistort_image(image, cam), params)
    if not ok:
        raise SceneError(f"{capture.name}: cannot encode the undistorted image as {suffix}")
    out = write_atomic(Path(dst) / folder / f"{capture.name}{capture.image.suffix}", encoded.tobytes())
    mask_out = capture.mask
    if mask is not None:
        mask_out = write_mask(
            undistort_mask(mask, cam), Path(dst) / f"{folder}{MASKS_SUFFIX}" / f"{capture.name}.png"
        ).resolve()
    return replace(capture, image=out.resolve(), mask=mask_out, camera=replace(cam, distortion=None))
