"""Round trips and rejections of the .ply conventions (DESIGN.md section 3)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from protocol.ply import (
    SH_C0,
    GaussianArrays,
    PlyFormatError,
    PointArrays,
    gaussian_field_names,
    read_gaussians_ply,
    read_points_ply,
    write_gaussians_ply,
    write_points_ply,
)


def random_gaussians(n: int, degree: int, seed: int = 0) -> GaussianArrays:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return GaussianArrays(
        means=rng.normal(size=(n, 3)).astype(f32),
        log_scales=rng.normal(-3, 1, size=(n, 3)).astype(f32),
        quats=rng.normal(size=(n, 4)).astype(f32),
        opacity_logits=rng.normal(size=n).astype(f32),
        sh=rng.normal(size=(n, (degree + 1) ** 2, 3)).astype(f32),
    )


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_gaussians_round_trip_every_degree(tmp_path, degree):
    g = random_gaussians(257, degree, seed=degree)
    path = tmp_path / "gaussians.ply"
    write_gaussians_ply(path, g)
    back = read_gaussians_ply(path)
    assert back.sh_degree == degree
    for field in ("means", "log_scales", "quats", "opacity_logits", "sh"):
        np.testing.assert_array_equal(getattr(back, field), getattr(g, field), err_msg=field)
        assert getattr(back, field).dtype == np.float32


def test_gaussian_file_layout_is_inria(tmp_path):
    """Property order, types, binary little endian, f_rest grouped by colour channel."""
    g = random_gaussians(5, 2)
    path = tmp_path / "g.ply"
    write_gaussians_ply(path, g)
    data = PlyData.read(str(path))
    assert data.byte_order == "<" and not data.text
    props = data["vertex"].properties
    names = [p.name for p in props]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9 : 9 + 24] == [f"f_rest_{i}" for i in range(24)]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == gaussian_field_names(2)
    assert {p.val_dtype for p in props} == {"f4"}
    v = data["vertex"].data
    # f_rest_{c*(K-1)+k} is channel c of band coefficient k+1 (K = 9 here).
    np.testing.assert_array_equal(v["f_rest_0"], g.sh[:, 1, 0])
    np.testing.assert_array_equal(v["f_rest_1"], g.sh[:, 2, 0])
    np.testing.assert_array_equal(v["f_rest_8"], g.sh[:, 1, 1])
    np.testing.assert_array_equal(v["f_rest_23"], g.sh[:, 8, 2])
    np.testing.assert_array_equal(v["rot_0"], g.quats[:, 0])  # w first
    np.testing.assert_array_equal(v["nx"], 0)
    np.testing.assert_allclose(g.rgb, np.clip(0.5 + SH_C0 * g.sh[:, 0], 0, 1))


def test_gaussians_through_a_stream():
    g = random_gaussians(64, 1)
    buf = io.BytesIO()
    write_gaussians_ply(buf, g)
    buf.seek(0)
    back = read_gaussians_ply(buf, name="upload.ply")
    np.testing.assert_array_equal(back.sh, g.sh)


def test_empty_gaussians_round_trip(tmp_path):
    g = random_gaussians(0, 0)
    write_gaussians_ply(tmp_path / "e.ply", g)
    assert len(read_gaussians_ply(tmp_path / "e.ply")) == 0


def test_points_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    p = PointArrays(
        xyz=rng.normal(size=(n, 3)).astype(np.float32),
        rgb=rng.integers(0, 256, size=(n, 3), dtype=np.uint8),
        confidence=rng.random(n).astype(np.float32),
        source=rng.integers(-1, 5, size=n).astype(np.int32),
    )
    path = tmp_path / "points.ply"
    write_points_ply(path, p)
    data = PlyData.read(str(path))
    assert [(q.name, q.val_dtype) for q in data["vertex"].properties] == [
        ("x", "f4"),
        ("y", "f4"),
        ("z", "f4"),
        ("red", "u1"),
        ("green", "u1"),
        ("blue", "u1"),
        ("confidence", "f4"),
        ("source", "i4"),
    ]
    back = read_points_ply(path)
    for field in ("xyz", "rgb", "confidence", "source"):
        np.testing.assert_array_equal(getattr(back, field), getattr(p, field), err_msg=field)
    assert back.rgb.dtype == np.uint8 and back.source.dtype == np.int32


def test_foreign_point_cloud_reads_with_defaults(tmp_path):
    table = np.zeros(4, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    PlyData([PlyElement.describe(table, "vertex")]).write(str(tmp_path / "c.ply"))
    back = read_points_ply(tmp_path / "c.ply")
    np.testing.assert_array_equal(back.confidence, 1.0)
    np.testing.assert_array_equal(back.source, -1)


def test_point_cloud_is_not_a_gaussian_file(tmp_path):
    p = PointArrays(
        np.zeros((3, 3), np.float32), np.zeros((3, 3), np.uint8), np.ones(3, np.float32), np.zeros(3, np.int32)
    )
    write_points_ply(tmp_path / "gaussians.ply", p)
    with pytest.raises(PlyFormatError, match=r"^gaussians\.ply has no f_dc_0: not a Gaussian file$"):
        read_gaussians_ply(tmp_path / "gaussians.ply")


def test_rejections_name_file_and_field(tmp_path):
    path = tmp_path / "bad.ply"
    path.write_bytes(b"this is not a ply file at all")
    with pytest.raises(PlyFormatError, match=r"bad\.ply is not a readable \.ply file"):
        read_gaussians_ply(path)
    with pytest.raises(PlyFormatError, match=r"missing\.ply: no such file"):
        read_gaussians_ply(tmp_path / "missing.ply")

    # A truncated body.
    write_gaussians_ply(path, random_gaussians(10, 0))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(PlyFormatError, match=r"bad\.ply is not a readable"):
        read_gaussians_ply(path)

    # An f_rest count that is no SH degree.
    g = random_gaussians(4, 1)
    names = gaussian_field_names(1)
    keep = [n for n in names if n != "f_rest_8"]
    write_gaussians_ply(path, g)
    table = PlyData.read(str(path))["vertex"].data[keep]
    PlyData([PlyElement.describe(np.array(table.tolist(), dtype=[(n, "f4") for n in keep]), "vertex")]).write(str(path))
    with pytest.raises(PlyFormatError, match=r"bad\.ply has 8 f_rest properties"):
        read_gaussians_ply(path)

    # NaN values are refused with a count.
    g = random_gaussians(6, 0)
    table = np.zeros(6, dtype=[(n, "f4") for n in gaussian_field_names(0)])
    for n in table.dtype.names:
        table[n] = 0.5
    table["opacity"][[1, 4]] = np.nan
    PlyData([PlyElement.describe(table, "vertex")]).write(str(path))
    with pytest.raises(PlyFormatError, match=r"bad\.ply: 2 of 6 Gaussians have a NaN or inf opacity"):
        read_gaussians_ply(path)

    with pytest.raises(ValueError, match="not finite"):
        write_gaussians_ply(path, GaussianArrays(g.means, g.log_scales, g.quats, np.full(6, np.nan, np.float32), g.sh))


def test_dataclass_shapes_are_checked():
    g = random_gaussians(3, 0)
    with pytest.raises(ValueError, match=r"GaussianArrays.quats must be \[3, 4\]; got \(3, 3\)"):
        GaussianArrays(g.means, g.log_scales, g.quats[:, :3], g.opacity_logits, g.sh)
    with pytest.raises(ValueError, match=r"K = \(d\+1\)\^2"):
        GaussianArrays(g.means, g.log_scales, g.quats, g.opacity_logits, np.zeros((3, 5, 3), np.float32))
    with pytest.raises(ValueError, match="rgb must be uint8"):
        PointArrays(
            np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), np.ones(2, np.float32), np.zeros(2, np.int32)
        )


def test_large_file_reads_fast(tmp_path):
    """No per-row parsing: 200k Gaussians of degree 3 (50 MB) take a fraction of a CPU second.

    Measured in CPU time of this process, so a loaded machine does not fail it; plyfile's row by
    row path takes over 20 CPU seconds here.
    """
    g = random_gaussians(200_000, 3)
    path = tmp_path / "big.ply"
    write_gaussians_ply(path, g)
    start = time.process_time()
    back = read_gaussians_ply(path)
    elapsed = time.process_time() - start
    np.testing.assert_array_equal(back.sh[-1], g.sh[-1])
    assert elapsed < 1.0, f"reading 200k Gaussians took {elapsed:.2f} CPU s"


def test_opacities_are_the_sigmoid_and_scales_the_exp():
    g = random_gaussians(3, 0)
    g = GaussianArrays(g.means, g.log_scales, g.quats, np.array([-2.0, 0.0, 2.0], np.float32), g.sh)
    np.testing.assert_allclose(g.opacities, [0.1192029, 0.5, 0.8807971], rtol=1e-5)
    np.testing.assert_allclose(g.scales, np.exp(g.log_scales.astype(np.float64)), rtol=1e-6)
