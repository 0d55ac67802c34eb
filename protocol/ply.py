"""The .ply files ReconLoop writes and reads (DESIGN.md section 3), numpy and plyfile only.

Two layouts, both binary little endian, one ``vertex`` element:

**Gaussians** (the INRIA layout every 3DGS viewer reads), every property float32, in this order::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3*((d+1)^2-1)-1}
    opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3

``opacity`` is a logit, ``scale_*`` are natural logs, ``rot_*`` is a quaternion w, x, y, z (not
necessarily unit), the normals are zero. ``f_rest`` is grouped by colour channel: all red
coefficients first, then green, then blue (``f_rest[c * (K - 1) + k]`` is channel c of SH band
coefficient k + 1, K = (d + 1)^2). The base colour is ``0.5 + SH_C0 * f_dc``.

**Points** (the geometry memory): ``x y z`` float32, ``red green blue`` uchar, ``confidence``
float32 in [0, 1] and ``source`` int32 (the capture id, -1 for points from generated frames).

This module runs inside Blender too: no torch here. Readers check what they read and raise
:class:`PlyFormatError` naming the file, the field and the rule ("gaussians.ply has no f_dc_0: not
a Gaussian file"). Reading and writing are vectorised: 1M Gaussians take a fraction of a second.

Example::

    >>> import numpy as np
    >>> g = GaussianArrays(means=np.zeros((100, 3), np.float32), log_scales=np.full((100, 3), -3, np.float32),
    ...                    quats=np.tile(np.float32([1, 0, 0, 0]), (100, 1)),
    ...                    opacity_logits=np.zeros(100, np.float32), sh=np.zeros((100, 4, 3), np.float32))
    >>> write_gaussians_ply("gaussians.ply", g)
    >>> read_gaussians_ply("gaussians.ply").sh_degree
    1
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from plyfile import PlyData, PlyElement

# Zeroth spherical-harmonics basis constant, 1 / (2 sqrt(pi)): colour = 0.5 + SH_C0 * f_dc.
SH_C0 = 0.28209479177387814
LOG_SCALE_MAX = 80.0  # a Gaussian's log-scale above this is refused (float32's exp overflows near 88.7)
# The SH degrees the layout carries (3DGS uses 3; viewers accept 0..3).
MAX_SH_DEGREE = 3

VERTEX = "vertex"
POSITION_FIELDS = ("x", "y", "z")
NORMAL_FIELDS = ("nx", "ny", "nz")
DC_FIELDS = ("f_dc_0", "f_dc_1", "f_dc_2")
OPACITY_FIELD = "opacity"
SCALE_FIELDS = ("scale_0", "scale_1", "scale_2")
ROT_FIELDS = ("rot_0", "rot_1", "rot_2", "rot_3")
REST_PREFIX = "f_rest_"
COLOR_FIELDS = ("red", "green", "blue")
CONFIDENCE_FIELD = "confidence"
SOURCE_FIELD = "source"

GAUSSIAN_DTYPE = np.dtype("<f4")
POINT_XYZ_DTYPE = np.dtype("<f4")
POINT_RGB_DTYPE = np.dtype("u1")
POINT_CONFIDENCE_DTYPE = np.dtype("<f4")
POINT_SOURCE_DTYPE = np.dtype("<i4")
GENERATED_SOURCE = -1  # ``source`` of points lifted from generated frames
DEFAULT_CONFIDENCE = 1.0  # read for files without a confidence property (other tools' point clouds)

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]


class PlyFormatError(ValueError):
    """A .ply file that does not follow the layout; the message names the file and the field."""


def num_sh_bases(degree: int) -> int:
    """K = (degree + 1)^2, the SH coefficients per colour channel."""
    return (degree + 1) ** 2


def num_rest_fields(degree: int) -> int:
    """How many ``f_rest_*`` properties a file of this SH degree has: 3 * (K - 1)."""
    return 3 * (num_sh_bases(degree) - 1)


def gaussian_field_names(sh_degree: int) -> list[str]:
    """The property names of a Gaussian .ply of SH degree ``sh_degree``, in file order."""
    if not 0 <= sh_degree <= MAX_SH_DEGREE:
        raise ValueError(f"sh_degree must be in 0..{MAX_SH_DEGREE}; got {sh_degree}")
    rest = [f"{REST_PREFIX}{i}" for i in range(num_rest_fields(sh_degree))]
    return [*POSITION_FIELDS, *NORMAL_FIELDS, *DC_FIELDS, *rest, OPACITY_FIELD, *SCALE_FIELDS, *ROT_FIELDS]


def _check_array(owner: str, name: str, value: object, shape: tuple[int | None, ...]) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{owner}.{name} must be a numpy array; got {type(value).__name__}")
    ok = value.ndim == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{owner}.{name} must be {want}; got {tuple(value.shape)}")
    return value


@dataclass(frozen=True)
class GaussianArrays:
    """3D Gaussians in their stored (raw) parameterisation, numpy.

    Attributes:
        means: centres, world coordinates. float32 [N, 3]
        log_scales: natural logs of the three axis scales. float32 [N, 3]
        quats: rotations, w x y z (not necessarily unit). float32 [N, 4]
        opacity_logits: logits of the opacities. float32 [N]
        sh: SH coefficients, band-major then RGB; ``sh[:, 0]`` is f_dc. float32 [N, K, 3], K = (d+1)^2
    """

    means: np.ndarray
    log_scales: np.ndarray
    quats: np.ndarray
    opacity_logits: np.ndarray
    sh: np.ndarray

    def __post_init__(self) -> None:
        owner = "GaussianArrays"
        n = _check_array(owner, "means", self.means, (None, 3)).shape[0]
        _check_array(owner, "log_scales", self.log_scales, (n, 3))
        _check_array(owner, "quats", self.quats, (n, 4))
        _check_array(owner, "opacity_logits", self.opacity_logits, (n,))
        _check_array(owner, "sh", self.sh, (n, None, 3))
        k = self.sh.shape[1]
        if k not in [num_sh_bases(d) for d in range(MAX_SH_DEGREE + 1)]:
            raise ValueError(f"{owner}.sh must have K = (d+1)^2 coefficients for d in 0..{MAX_SH_DEGREE}; got K={k}")

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        return int(round(np.sqrt(self.sh.shape[1]))) - 1

    @property
    def rgb(self) -> np.ndarray:
        """View-independent base colour 0.5 + SH_C0 * f_dc, clipped to [0, 1]. float32 [N, 3]"""
        return np.clip(0.5 + SH_C0 * self.sh[:, 0, :], 0.0, 1.0).astype(np.float32)

    @property
    def opacities(self) -> np.ndarray:
        """Opacities in (0, 1), the sigmoid of the logits. float32 [N]"""
        return (1.0 / (1.0 + np.exp(-self.opacity_logits.astype(np.float64)))).astype(np.float32)

    @property
    def scales(self) -> np.ndarray:
        """Axis scales (exp of the logs), world units. float32 [N, 3]"""
        return np.exp(self.log_scales).astype(np.float32)


@dataclass(frozen=True)
class PointArrays:
    """A coloured point cloud with confidence and provenance, numpy.

    Attributes:
        xyz: world positions. float32 [N, 3]
        rgb: 8-bit sRGB colours. uint8 [N, 3]
        confidence: per-point confidence in [0, 1]. float32 [N]
        source: id of the capture a point came from, -1 for generated frames. int32 [N]
    """

    xyz: np.ndarray
    rgb: np.ndarray
    confidence: np.ndarray
    source: np.ndarray

    def __post_init__(self) -> None:
        owner = "PointArrays"
        n = _check_array(owner, "xyz", self.xyz, (None, 3)).shape[0]
        _check_array(owner, "rgb", self.rgb, (n, 3))
        _check_array(owner, "confidence", self.confidence, (n,))
        _check_array(owner, "source", self.source, (n,))
        if self.rgb.dtype != POINT_RGB_DTYPE:
            raise ValueError(f"PointArrays.rgb must be uint8; got {self.rgb.dtype}")
        if not np.issubdtype(self.source.dtype, np.integer):
            raise ValueError(f"PointArrays.source must be an integer array; got {self.source.dtype}")

    def __len__(self) -> int:
        return int(self.xyz.shape[0])


# ---------------------------------------------------------------------------------------------
# Writing


def _write_vertex_table(path: str | os.PathLike[str] | BinaryIO, table: np.ndarray) -> None:
    """Write one binary little-endian ``vertex`` element; a path is replaced atomically."""
    data = PlyData([PlyElement.describe(table, VERTEX)], text=False, byte_order="<")
    if not isinstance(path, (str, os.PathLike)):
        data.write(path)
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        data.write(f)
    os.replace(tmp, path)


def _check_finite(owner: str, name: str, values: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ValueError(f"{owner}: {bad} of {values.size} values of {name} are not finite (NaN or inf)")


def gaussians_to_table(g: GaussianArrays) -> np.ndarray:
    """The structured vertex table of ``g`` in the INRIA layout (see module docstring). [N]"""
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh"):
        _check_finite("write_gaussians_ply", name, getattr(g, name))
    names = gaussian_field_names(g.sh_degree)
    n = len(g)
    table = np.zeros(n, dtype=[(name, GAUSSIAN_DTYPE) for name in names])
    flat = table.view(GAUSSIAN_DTYPE).reshape(n, len(names))  # [N, P], one column per property
    rest = g.sh[:, 1:, :].transpose(0, 2, 1).reshape(n, num_rest_fields(g.sh_degree))  # [N, 3 * (K - 1)], by channel
    col = 0
    for block in (
        g.means,
        np.zeros((n, len(NORMAL_FIELDS))),
        g.sh[:, 0, :],
        rest,
        g.opacity_logits[:, None],
        g.log_scales,
        g.quats,
    ):
        flat[:, col : col + block.shape[1]] = block
        col += block.shape[1]
    return table


def write_gaussians_ply(path: PathOrFile, g: GaussianArrays) -> None:
    """Write Gaussians as an INRIA-layout binary .ply (module docstring). NaN or inf is refused.

    Args:
        path: file to write (replaced atomically), or a binary stream.
        g: the Gaussians, raw parameters.
    """
    _write_vertex_table(path, gaussians_to_table(g))


def write_points_ply(path: PathOrFile, p: PointArrays) -> None:
    """Write a point cloud: x y z float32, red green blue uchar, confidence float32, source int32.

    Args:
        path: file to write (replaced atomically), or a binary stream.
        p: the points.
    """
    _check_finite("write_points_ply", "xyz", p.xyz)
    _check_finite("write_points_ply", "confidence", p.confidence)
    fields = [(f, POINT_XYZ_DTYPE) for f in POSITION_FIELDS] + [(f, POINT_RGB_DTYPE) for f in COLOR_FIELDS]
    fields += [(CONFIDENCE_FIELD, POINT_CONFIDENCE_DTYPE), (SOURCE_FIELD, POINT_SOURCE_DTYPE)]
    table = np.empty(len(p), dtype=fields)
    for i, f in enumerate(POSITION_FIELDS):
        table[f] = p.xyz[:, i]
    for i, f in enumerate(COLOR_FIELDS):
        table[f] = p.rgb[:, i]
    table[CONFIDENCE_FIELD] = p.confidence
    table[SOURCE_FIELD] = p.source
    _write_vertex_table(path, table)


# ---------------------------------------------------------------------------------------------
# Reading


def _display_name(source: PathOrFile, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name
    stream_name = getattr(source, "name", None)
    return Path(str(stream_name)).name if stream_name else "<stream>"


def _has_fileno(stream: object) -> bool:
    try:
        stream.fileno()  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return False
    return True


def _read_vertex(source: PathOrFile, name: str) -> np.ndarray:
    """The ``vertex`` element's structured array (callers copy out of it), or a PlyFormatError.

    Files are memory-mapped while reading; the readers copy every column out, so the returned
    arrays hold no file open.
    """
    try:
        if isinstance(source, (str, os.PathLike)):
            data = PlyData.read(os.fspath(source))  # memory-mapped: no per-row parsing
        elif hasattr(source, "fileno") and _has_fileno(source):
            data = PlyData.read(source)
        else:
            # plyfile parses unmappable streams row by row (minutes for 1M Gaussians): spill to a file.
            with tempfile.TemporaryFile() as spill:
                shutil.copyfileobj(source, spill)
                spill.seek(0)
                return _read_vertex(spill, name)
    except FileNotFoundError:
        raise PlyFormatError(f"{name}: no such file") from None
    except Exception as err:  # plyfile raises several types for malformed headers and bodies
        raise PlyFormatError(f"{name} is not a readable .ply file: {err}") from None
    if VERTEX not in data:
        present = ", ".join(e.name for e in data.elements) or "none"
        raise PlyFormatError(f"{name} has no '{VERTEX}' element (elements: {present}): not a ReconLoop .ply")
    table = data[VERTEX].data
    if table.dtype.names is None:
        raise PlyFormatError(f"{name}: the '{VERTEX}' element has list properties only")
    return table


def _require(table: np.ndarray, fields: tuple[str, ...] | list[str], name: str, what: str) -> None:
    for f in fields:
        if f not in table.dtype.names:
            raise PlyFormatError(f"{name} has no {f}: not a {what} file")
    for f in fields:
        kind = table.dtype[f].kind
        if kind not in "fiu":
            raise PlyFormatError(f"{name}: property {f} must be numeric; got {table.dtype[f]}")


def _columns(table: np.ndarray, fields: list[str] | tuple[str, ...], dtype: np.dtype) -> np.ndarray:
    """Copy ``fields`` of a structured table into one [N, len(fields)] array of ``dtype``.

    When every property of the table has ``dtype`` (the usual all-float32 Gaussian file), the
    table is viewed as an [N, P] matrix and a run of adjacent fields is one strided block copy;
    otherwise each field is copied on its own.
    """
    names = table.dtype.names
    n = table.shape[0]
    homogeneous = all(table.dtype[f] == dtype for f in names) and table.dtype.itemsize == dtype.itemsize * len(names)
    if homogeneous and n:
        matrix = table.view(dtype).reshape(n, len(names))  # [N, P], no copy
        idx = [names.index(f) for f in fields]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return np.array(matrix[:, idx[0] : idx[0] + len(idx)], dtype=dtype)
        return matrix[:, idx].astype(dtype, copy=False)
    out = np.empty((n, len(fields)), dtype=dtype)
    for i, f in enumerate(fields):
        out[:, i] = table[f]
    return out


def _finite_or_raise(values: np.ndarray, field: str, name: str) -> None:
    rows_ok = np.isfinite(values).all(axis=tuple(range(1, values.ndim)))  # [N]
    bad = int(np.count_nonzero(~rows_ok))
    if bad:
        raise PlyFormatError(f"{name}: {bad} of {values.shape[0]} Gaussians have a NaN or inf {field}")


def read_gaussians_ply(source: PathOrFile, *, name: str | None = None) -> GaussianArrays:
    """Read an INRIA-layout Gaussian .ply (any SH degree 0..3), checking fields and values.

    Args:
        source: path, or a binary stream.
        name: how messages name the file (default: its file name).

    Returns:
        The Gaussians; the SH degree follows from the number of ``f_rest_*`` properties.

    Raises:
        PlyFormatError: unreadable file, a missing property ("gaussians.ply has no f_dc_0: not a
            Gaussian file"), an ``f_rest`` count that is no SH degree, or NaN/inf values.
    """
    name = _display_name(source, name)
    table = _read_vertex(source, name)
    what = "Gaussian"
    _require(table, (*POSITION_FIELDS, *DC_FIELDS, OPACITY_FIELD, *SCALE_FIELDS, *ROT_FIELDS), name, what)
    n_rest = sum(1 for f in table.dtype.names if f.startswith(REST_PREFIX))
    degrees = {num_rest_fields(d): d for d in range(MAX_SH_DEGREE + 1)}
    if n_rest not in degrees:
        allowed = ", ".join(str(k) for k in degrees)
        raise PlyFormatError(
            f"{name} has {n_rest} f_rest properties; a Gaussian file has {allowed} (SH degree 0..{MAX_SH_DEGREE})"
        )
    degree = degrees[n_rest]
    rest_fields = [f"{REST_PREFIX}{i}" for i in range(n_rest)]
    _require(table, rest_fields, name, what)

    n = table.shape[0]
    k = num_sh_bases(degree)
    means = _columns(table, POSITION_FIELDS, GAUSSIAN_DTYPE)
    sh = np.empty((n, k, 3), dtype=GAUSSIAN_DTYPE)
    sh[:, 0, :] = _columns(table, DC_FIELDS, GAUSSIAN_DTYPE)
    if k > 1:
        rest = _columns(table, rest_fields, GAUSSIAN_DTYPE)  # [N, 3 * (K - 1)], grouped by channel
        sh[:, 1:, :] = rest.reshape(n, 3, k - 1).transpose(0, 2, 1)
    opacity = _columns(table, (OPACITY_FIELD,), GAUSSIAN_DTYPE)[:, 0]
    log_scales = _columns(table, SCALE_FIELDS, GAUSSIAN_DTYPE)
    quats = _columns(table, ROT_FIELDS, GAUSSIAN_DTYPE)
    for field, values in (
        ("position", means),
        ("SH coefficient", sh),
        ("opacity", opacity[:, None]),
        ("scale", log_scales),
        ("rotation", quats),
    ):
        _finite_or_raise(values, field, name)
    huge = int(np.count_nonzero((log_scales > LOG_SCALE_MAX).any(axis=1)))
    if huge:  # exp overflows float32 near 88.7: the scale would be inf
        raise PlyFormatError(
            f"{name}: {huge} of {n} Gaussians have a scale_* above {LOG_SCALE_MAX:g} (e^{LOG_SCALE_MAX:g} world units "
            "or more: no scene is that large)"
        )
    zero_quats = int(np.count_nonzero(~np.any(quats != 0, axis=1)))
    if zero_quats:
        raise PlyFormatError(f"{name}: {zero_quats} of {n} Gaussians have an all-zero rotation (rot_0..3)")
    return GaussianArrays(means=means, log_scales=log_scales, quats=quats, opacity_logits=opacity, sh=sh)


def read_points_ply(source: PathOrFile, *, name: str | None = None) -> PointArrays:
    """Read a point cloud .ply: x y z and red green blue required; confidence and source optional.

    A file without ``confidence`` reads as confidence 1.0 and one without ``source`` as -1 (other
    tools' point clouds); colours must be uchar (0..255).

    Args:
        source: path, or a binary stream.
        name: how messages name the file (default: its file name).

    Raises:
        PlyFormatError: unreadable file, missing x/y/z or colour, colours that are not uchar,
            NaN/inf positions or confidences.
    """
    name = _display_name(source, name)
    table = _read_vertex(source, name)
    what = "point cloud"
    _require(table, (*POSITION_FIELDS, *COLOR_FIELDS), name, what)
    for f in COLOR_FIELDS:
        if table.dtype[f] != POINT_RGB_DTYPE:
            raise PlyFormatError(f"{name}: property {f} must be uchar (0..255); got {table.dtype[f]}")
    n = table.shape[0]
    xyz = _columns(table, POSITION_FIELDS, POINT_XYZ_DTYPE)
    rgb = _columns(table, COLOR_FIELDS, POINT_RGB_DTYPE)
    names = table.dtype.names
    if CONFIDENCE_FIELD in names:
        confidence = np.ascontiguousarray(table[CONFIDENCE_FIELD], dtype=POINT_CONFIDENCE_DTYPE)
    else:
        confidence = np.full(n, DEFAULT_CONFIDENCE, dtype=POINT_CONFIDENCE_DTYPE)
    if SOURCE_FIELD in names:
        if table.dtype[SOURCE_FIELD].kind not in "iu":
            raise PlyFormatError(f"{name}: property {SOURCE_FIELD} must be an integer; got {table.dtype[SOURCE_FIELD]}")
        source_ids = np.ascontiguousarray(table[SOURCE_FIELD], dtype=POINT_SOURCE_DTYPE)
    else:
        source_ids = np.full(n, GENERATED_SOURCE, dtype=POINT_SOURCE_DTYPE)
    bad_xyz = int(np.count_nonzero(~np.isfinite(xyz).all(axis=1)))
    if bad_xyz:
        raise PlyFormatError(f"{name}: {bad_xyz} of {n} points have a NaN or inf position")
    bad_conf = int(np.count_nonzero(~np.isfinite(confidence)))
    if bad_conf:
        raise PlyFormatError(f"{name}: {bad_conf} of {n} points have a NaN or inf confidence")
    return PointArrays(xyz=xyz, rgb=rgb, confidence=confidence, source=source_ids)
