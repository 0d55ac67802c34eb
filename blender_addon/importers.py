"""Job results as Blender objects: point cloud, Gaussians, generated frames, estimated cameras.

Everything is in Blender world coordinates (the service works in the captures' world frame, which is
Blender's: cameras go over the wire as OpenCV world-to-camera matrices of Blender world points).
Arrays go in with ``foreach_set``; there is no per-point Python loop.
"""

from __future__ import annotations

import math
import os
import re
import shutil

import bpy
import numpy as np

from . import scene_io
from .cameras import blender_from_opencv, render_conflicts
from .errors import ReconLoopError
from .scene_read import apply_camera_params

try:
    from protocol.ply import (
        MAX_SH_DEGREE,
        SH_C0,
        GaussianArrays,
        PlyFormatError,
        PointArrays,
        read_gaussians_ply,
        read_points_ply,
    )
except ImportError:  # pragma: no cover - the extension was built without its protocol wheel
    GaussianArrays = PointArrays = SH_C0 = MAX_SH_DEGREE = None
    PlyFormatError = ValueError
    read_gaussians_ply = read_points_ply = None

# Names of the attributes we write (documented for users who build their own node setups).
ATTR_COLOR = "color"  # FLOAT_COLOR, linear RGBA
ATTR_CONFIDENCE = "confidence"  # FLOAT in [0, 1]
ATTR_SOURCE = "source"  # INT: capture id, -1 for generated
ATTR_SCALE = "scale"  # FLOAT_VECTOR: the Gaussian's axis scales (world units, one sigma)
ATTR_ROTATION = "rotation"  # QUATERNION w x y z (unit)
ATTR_OPACITY = "opacity"  # FLOAT in (0, 1)
ATTR_COLOR_SRGB = "color_srgb"  # FLOAT_COLOR: the Gaussians' base colour as stored (sRGB-encoded values)
# FLOAT_VECTOR: SH coefficient k of the Gaussian, RGB, as fitted (``sh_0`` = the .ply's f_dc, ``sh_1`` ... its
# f_rest, band by band as GaussianArrays.sh orders them): written for k < (d+1)^2 when the Gaussians' SH degree d
# is above 0, none for d = 0. ``sh_0`` keeps the base colour unclipped (``color_srgb`` = 0.5 + C0 * ``sh_0``,
# clipped to [0, 1]): the service adds the bands to 0.5 + C0 * ``sh_0``, then clamps at 0.
ATTR_SH = "sh_{}"
# The Value node in the Gaussians material that picks ``color_srgb`` (1) or ``color`` (0).
SRGB_SWITCH = "sRGB blending"
# Cycles does not read a point cloud attribute named "color" (it renders black): the points node group
# stores a copy under this name for the material.
ATTR_DISPLAY_COLOR = "display_color"
RGBA = 4
U8_MAX = 255.0

# The Gaussians' node groups and material as this add-on builds them: one built by an earlier version (a .blend
# saved before) is rebuilt when Gaussians are imported, and its users take the new one (_reusable, _adopt).
# 2: the rasterizer's low-pass and alpha floor in renders.
GAUSSIANS_VERSION = 2
VERSION_PROP = "reconloop_version"  # the ID property that holds it
LOW_PASS_PROP = "reconloop_low_pass"  # a node group's ID property: built with the low-pass (Blender 5.0 and later)
POINTS_NODES = "ReconLoop Points"
GAUSSIANS_NODES = "ReconLoop Gaussians"
POINTS_MATERIAL = "ReconLoop Points"
GAUSSIANS_MATERIAL = "ReconLoop Gaussians"
POINT_RADIUS_DEFAULT = 0.002  # world units, for the node group's default (each object gets its own)
POINT_RADIUS_FRACTION = 1.0 / 800.0  # a cloud's point radius: this fraction of its robust diagonal
ROBUST_PERCENTILES = (2.0, 98.0)  # the extent of a cloud, ignoring stray points
# The highest opacity one Gaussian reaches: the service's clamp (backend/rasterizers/__init__.py ALPHA_MAX, as
# gsplat's kernels), repeated here because the extension does not ship the backend; and the least alpha it draws
# (ALPHA_MIN: below it a Gaussian adds nothing to a pixel)
ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
# A Gaussian's footprint ends where its alpha falls below ALPHA_MIN, at most here, in standard deviations (opacity
# 1): sqrt(2 ln 255) = 3.33, the service's and gsplat's opacity-aware box (torch_cpu.RADIUS_SIGMAS)
CUTOFF_SIGMA = math.sqrt(2.0 * math.log(1.0 / ALPHA_MIN))
# The instanced shell is an icosahedron (Blender's ico sphere of 1 subdivision: 12 vertices, 20 faces); its
# circumradius is set so its faces (inradius = ICOSAHEDRON_INRADIUS x circumradius) enclose the cutoff sphere.
ICOSAHEDRON_INRADIUS = 0.7947
# The real SH basis in the 3DGS / gsplat sign convention, the constants of backend/rasterizers/sh.py (SH_C0 and
# MAX_SH_DEGREE are protocol.ply's): colour = max(0, 0.5 + sum_k Y_k(dir) sh_k), dir the unit vector from the camera
# to the centre.
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)
SH_OFFSET = 0.5  # colour = 0.5 + SH value (3DGS)
# Renders draw each Gaussian on a card parallel to the camera's image plane (gaussians_node_group). FLOAT_VECTOR
# on instances: the rows of the matrix from the instance's space to the Gaussian's frame in standard deviations
# (the identity for the viewport's shells)
ATTR_FRAME = ("splat_frame_x", "splat_frame_y", "splat_frame_z")
CARD_MAX_SIGMA = 1000.0  # a card's half size at most, in the Gaussian's largest sigmas
CARD_MIN_SIGMA = 1e-3  # and at least, in its sigmas (a Gaussian too faint to draw: no singular instance)
EULER = math.e
# The service's rasterizer (and gsplat's "classic" mode) adds this many px^2 to every Gaussian's projected 2D
# covariance, opacity unchanged: a Gaussian thinner than a pixel is drawn as a blob of at least ~0.55 px sigma
# (backend/rasterizers/torch_cpu.py EPS2D, gsplat's eps2d; repeated here as the extension does not ship the
# backend). Renders' cards do the same in pixels of the render (gaussians_node_group's "Low-pass" input).
LOW_PASS_PX2 = 0.3
LOW_PASS_INPUT = "Low-pass"  # the Gaussians node group's input: px^2 added in renders (0: the Gaussians as fitted)
# Value nodes of the Gaussians node group, driven by the active scene's render size in pixels (resolution x
# percentage): with the active camera's projection matrix they give its focal lengths in the render's pixels
RENDER_SIZE_NODES = (("Render Width", "resolution_x"), ("Render Height", "resolution_y"))
# Cycles gives up on a path after this many transparent surfaces (default 8, too few for overlapping splats).
TRANSPARENT_BOUNCES = 256
FRAME_FILE = "frame_{:06d}.png"  # image sequence names: Blender frame number, zero padded
COLLECTION_KEY = "reconloop_key"
COLLECTION_SOURCE = "reconloop_source"  # what the job's photos came from: a photo folder's path, a collection's name
COLLECTION_JOB = "reconloop_job"
OBJECT_KIND = "reconloop_kind"
FRAME_JOB = "reconloop_job"  # on a generated frame sequence's image: the job it came from
KIND_TRAJECTORY = "trajectory"  # an animated camera on the path the service chose


# ---------------------------------------------------------------------------------------------
# Collections


def job_collection(
    scene: bpy.types.Scene, key: str, job_id: str, source: str = "", *, empty: bool = True
) -> bpy.types.Collection:
    """The collection for one job's results; this scene's collection of an earlier run of the same ``source`` (a
    re-run) is reused, emptied (``empty``; else its results stay until the new job's replace them, kind by kind:
    :func:`remove_kind`, :func:`remove_other_kinds`). Another source's collection of that key (a second photo folder
    named ``images``) is left alone: the new one's key gets a number (``images 2``; its ``COLLECTION_KEY`` says which).

    Args:
        key: what a re-run shares with the run it replaces (the captures' name).
        source: where the photos came from (a folder's absolute path); "": the collection of ``key`` is a re-run's.
            A collection of ``key`` made before sources were recorded is taken as this source's, and records it.
    """

    def numbered(k: object) -> bool:  # key, or key and a number
        return isinstance(k, str) and (k == key or (k.startswith(f"{key} ") and k[len(key) + 1 :].isdigit()))

    # this scene's: another scene's collection of the same key (a photo folder of the same name) is not emptied
    ours = [c for c in scene.collection.children_recursive if numbered(c.get(COLLECTION_KEY))]
    coll = next((c for c in ours if source and c.get(COLLECTION_SOURCE) == source), None)  # its own, whatever number
    if coll is None:
        coll = next((c for c in ours if c[COLLECTION_KEY] == key and (not source or COLLECTION_SOURCE not in c)), None)
    if coll is None:
        taken = {c[COLLECTION_KEY] for c in ours}
        n, wanted = 1, key
        while wanted in taken:
            n += 1
            wanted = f"{key} {n}"
        coll = bpy.data.collections.new(f"ReconLoop {wanted}")
        scene.collection.children.link(coll)
        coll[COLLECTION_KEY] = wanted
    else:
        if empty:
            clear_collection(coll)
        ensure_linked(scene, coll)
    if source:
        coll[COLLECTION_SOURCE] = source
    coll[COLLECTION_JOB] = job_id
    return coll


def existing_job_collection(scene: bpy.types.Scene, job_id: str) -> bpy.types.Collection | None:
    """The collection already holding ``job_id``'s results, whatever its key (linked into ``scene`` if it
    was not), or None. A job imported again goes there instead of into a second, overlapping copy."""
    coll = next((c for c in bpy.data.collections if c.get(COLLECTION_JOB) == job_id), None)
    if coll is not None:
        ensure_linked(scene, coll)
    return coll


def ensure_linked(scene: bpy.types.Scene, coll: bpy.types.Collection) -> None:
    """Link ``coll`` under the scene's collection unless it is already in the scene's tree."""
    if coll not in scene.collection.children_recursive:
        scene.collection.children.link(coll)


def clear_collection(coll: bpy.types.Collection) -> None:
    """Delete the objects of ``coll`` and the data only they used."""
    for obj in list(coll.objects):
        _remove_object(obj)


def remove_kind(coll: bpy.types.Collection, kind: str) -> None:
    """Delete the objects of one kind (points, gaussians, ...) from ``coll`` (a partial result replaced)."""
    for obj in list(coll.objects):
        if obj.get(OBJECT_KIND) == kind:
            _remove_object(obj)


def remove_other_kinds(coll: bpy.types.Collection, kinds: set[str]) -> None:
    """Delete the objects of ``coll`` of a kind not in ``kinds`` (an earlier run's results the new run did not
    replace); objects of no kind (the user's) stay."""
    for obj in list(coll.objects):
        if obj.get(OBJECT_KIND) and obj.get(OBJECT_KIND) not in kinds:
            _remove_object(obj)


def _remove_object(obj: bpy.types.Object) -> None:
    """Delete ``obj``, then its mesh or camera and its animation where nothing else uses them (a re-import
    would otherwise leave ``path.001`` cameras and their actions behind)."""
    data = obj.data
    # the pose's and the lens's action: one action with a slot for each since Blender 4.4, so by name, once
    actions = {
        b.animation_data.action.name
        for b in (obj, data)
        if b is not None and b.animation_data and b.animation_data.action
    }
    bpy.data.objects.remove(obj, do_unlink=True)
    if data is not None and data.users == 0:
        if isinstance(data, bpy.types.Mesh):
            bpy.data.meshes.remove(data)
        elif isinstance(data, bpy.types.Camera):
            bpy.data.cameras.remove(data)
    for name in actions:
        action = bpy.data.actions.get(name)
        if action is not None and action.users == 0:
            bpy.data.actions.remove(action)


# ---------------------------------------------------------------------------------------------
# Meshes from arrays


def _points_mesh(name: str, xyz: np.ndarray) -> bpy.types.Mesh:
    """A mesh of loose vertices at ``xyz`` (world units). xyz: float [N, 3]"""
    mesh = bpy.data.meshes.new(name)
    n = int(xyz.shape[0])
    mesh.vertices.add(n)
    if n:  # a mesh without vertices has no position attribute (a job's empty result: an empty object)
        mesh.attributes["position"].data.foreach_set("vector", np.ascontiguousarray(xyz, dtype=np.float32).ravel())
    return mesh


def _set_attribute(mesh: bpy.types.Mesh, name: str, data_type: str, prop: str, values: np.ndarray) -> None:
    attr = mesh.attributes.new(name, data_type, "POINT")
    attr.data.foreach_set(prop, np.ascontiguousarray(values).ravel())


def _rgba_linear(rgb_srgb: np.ndarray) -> np.ndarray:
    """sRGB colours in [0, 1] [N, 3] to linear RGBA float32 [N, 4] (alpha 1)."""
    out = np.ones((rgb_srgb.shape[0], RGBA), dtype=np.float32)
    out[:, :3] = scene_io.srgb_to_linear(rgb_srgb)
    return out


def _link(obj: bpy.types.Object, coll: bpy.types.Collection, kind: str) -> bpy.types.Object:
    coll.objects.link(obj)
    obj[OBJECT_KIND] = kind
    return obj


def import_points(points, name: str, coll: bpy.types.Collection) -> bpy.types.Object:
    """A point cloud object: mesh vertices with ``color``, ``confidence`` and ``source`` attributes,
    shown as points by a geometry-nodes modifier.

    Args:
        points: ``protocol.ply.PointArrays`` (xyz float32 [N, 3], rgb uint8 [N, 3], confidence [N], source [N]).
    """
    mesh = _points_mesh(name, points.xyz)
    _set_attribute(mesh, ATTR_COLOR, "FLOAT_COLOR", "color", _rgba_linear(points.rgb.astype(np.float32) / U8_MAX))
    _set_attribute(mesh, ATTR_CONFIDENCE, "FLOAT", "value", points.confidence.astype(np.float32))
    _set_attribute(mesh, ATTR_SOURCE, "INT", "value", points.source.astype(np.int32))
    obj = bpy.data.objects.new(name, mesh)
    mod = obj.modifiers.new("Points", "NODES")
    mod.node_group = points_node_group()
    _set_modifier_input(mod, "Point Radius", point_radius(points.xyz))
    return _link(obj, coll, scene_io.KIND_POINTS)


def point_radius(xyz: np.ndarray) -> float:
    """A display radius that suits the cloud's size (a fraction of its robust diagonal). xyz: [N, 3]"""
    if len(xyz) == 0:
        return POINT_RADIUS_DEFAULT
    lo, hi = np.percentile(xyz, ROBUST_PERCENTILES, axis=0)
    diagonal = float(np.linalg.norm(hi - lo))
    return diagonal * POINT_RADIUS_FRACTION if diagonal > 0 else POINT_RADIUS_DEFAULT


def _set_modifier_input(mod: bpy.types.Modifier, name: str, value: float) -> None:
    for item in mod.node_group.interface.items_tree:
        if getattr(item, "in_out", "") == "INPUT" and item.name == name:
            mod[item.identifier] = value
            return
    raise KeyError(f"node group {mod.node_group.name!r} has no input {name!r}")


def import_gaussians(g, name: str, coll: bpy.types.Collection) -> bpy.types.Object:
    """A Gaussians object: vertices at the means with ``scale``, ``rotation``, ``opacity`` and ``color``
    attributes; geometry nodes instance a shell per Gaussian in the viewport and a card parallel to the
    camera's image plane in renders (:func:`gaussians_node_group`), and :func:`gaussian_material` draws it as
    3DGS does (opacity x exp(-r^2/2) from ALPHA_MIN up, alpha-blended; in renders widened by the rasterizer's
    low-pass of LOW_PASS_PX2 px^2) in EEVEE and Cycles. The object
    casts no shadows and is invisible to indirect rays: it shows the reconstruction, it does not light it.

    Gaussians of SH degree d > 0 also carry their (d+1)^2 SH coefficients (``sh_0`` ..., ATTR_SH), and
    their node group is that of degree d, which colours each Gaussian as the service does from the scene
    camera's direction; degree 0 costs nothing more than the base colour.

    Args:
        g: ``protocol.ply.GaussianArrays`` (means [N, 3], log_scales [N, 3], quats wxyz [N, 4],
            opacity_logits [N], sh [N, K, 3]).
    """
    mesh = _points_mesh(name, g.means)
    quats = g.quats.astype(np.float64)  # normalised in float64: float32's norm of 1e-30 is 0, of 3e38 inf
    quats = (quats / np.linalg.norm(quats, axis=1, keepdims=True)).astype(np.float32)
    _set_attribute(mesh, ATTR_SCALE, "FLOAT_VECTOR", "vector", g.scales)
    _set_attribute(mesh, ATTR_ROTATION, "QUATERNION", "value", quats)
    _set_attribute(mesh, ATTR_OPACITY, "FLOAT", "value", g.opacities)
    rgb = g.rgb
    _set_attribute(mesh, ATTR_COLOR, "FLOAT_COLOR", "color", _rgba_linear(rgb))
    _set_attribute(mesh, ATTR_COLOR_SRGB, "FLOAT_COLOR", "color", np.c_[rgb, np.ones(len(rgb), np.float32)])
    degree = g.sh_degree
    if degree > 0:
        sh = np.ascontiguousarray(np.asarray(g.sh, dtype=np.float32).transpose(1, 0, 2))  # [K, N, 3]
        for k in range(sh.shape[0]):
            _set_attribute(mesh, ATTR_SH.format(k), "FLOAT_VECTOR", "vector", sh[k])
    obj = bpy.data.objects.new(name, mesh)
    obj["sh_degree"] = degree
    upgrade_gaussians_groups()  # a file saved with an earlier add-on: every degree's group, not only this one
    mod = obj.modifiers.new("Gaussians", "NODES")
    mod.node_group = gaussians_node_group(degree)
    obj.visible_shadow = obj.visible_diffuse = obj.visible_glossy = obj.visible_volume_scatter = False
    return _link(obj, coll, scene_io.KIND_GAUSSIANS)


def read_points_file(path: str):
    """A point cloud .ply (protocol.ply) as ``PointArrays``. Raises ReconLoopError in plain words."""
    try:
        return read_points_ply(path)
    except (PlyFormatError, OSError) as err:
        raise ReconLoopError(str(err)) from None


def read_gaussians_file(path: str):
    """A Gaussian .ply (protocol.ply) as ``GaussianArrays``; a .ply without Gaussian fields raises
    ReconLoopError ("x.ply has no f_dc_0: not a Gaussian file")."""
    if read_gaussians_ply is None:
        raise ReconLoopError("the protocol package is missing: reinstall the ReconLoop extension")
    try:
        return read_gaussians_ply(path)
    except (PlyFormatError, OSError) as err:
        raise ReconLoopError(str(err)) from None


def import_points_ply(path: str, name: str, coll: bpy.types.Collection) -> bpy.types.Object:
    """Read a point cloud .ply (:func:`read_points_file`) and import it."""
    return import_points(read_points_file(path), name, coll)


def import_gaussians_ply(path: str, name: str, coll: bpy.types.Collection) -> bpy.types.Object:
    """Read a Gaussian .ply (:func:`read_gaussians_file`) and import it."""
    return import_gaussians(read_gaussians_file(path), name, coll)


def mesh_positions(obj: bpy.types.Object) -> np.ndarray:
    """World-space vertex positions of a mesh object (object transform applied). float32 [N, 3]"""
    mesh = obj.data
    co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.attributes["position"].data.foreach_get("vector", co)
    co = co.reshape(-1, 3)
    m = np.array(obj.matrix_world, dtype=np.float64)
    return (co @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


def attribute_values(obj: bpy.types.Object, name: str) -> np.ndarray:
    """The values of a point attribute. [N] or [N, D]"""
    attr = obj.data.attributes[name]
    prop, width = {
        "FLOAT": ("value", 1),
        "INT": ("value", 1),
        "FLOAT_VECTOR": ("vector", 3),
        "FLOAT_COLOR": ("color", 4),
        "QUATERNION": ("value", 4),
    }[attr.data_type]
    dtype = np.int32 if attr.data_type == "INT" else np.float32
    out = np.empty(len(attr.data) * width, dtype=dtype)
    attr.data.foreach_get(prop, out)
    return out if width == 1 else out.reshape(-1, width)


# ---------------------------------------------------------------------------------------------
# Node groups and materials (built once per file, reused)


def _is_current(found) -> bool:
    """Built by this add-on's GAUSSIANS_VERSION, and a node group with the low-pass where this Blender has it
    (a group built under Blender 4.x, which lacks the Camera Info node, is rebuilt under 5.0)."""
    if found.get(VERSION_PROP, 0) < GAUSSIANS_VERSION:  # a newer add-on's stays
        return False
    wants_low_pass = isinstance(found, bpy.types.NodeTree) and hasattr(bpy.types, "GeometryNodeCameraInfo")
    return not wants_low_pass or bool(found.get(LOW_PASS_PROP))


def _reusable(ids, name: str):
    """The Gaussians' node group or material ``name`` in ``ids`` (bpy.data.node_groups or .materials) for reuse:
    (it, None) where it is current (:func:`_is_current`) or linked from a library (not ours to change); (None,
    the older one, renamed aside) where an earlier add-on built it (a .blend saved before: its Gaussians would
    render as that version drew them), for :func:`_adopt` to replace; (None, None) where there is none."""
    found = ids.get(name)
    if found is None:
        return None, None
    if _is_current(found) or found.library is not None:
        return found, None
    found.name = f"{name} (older add-on)"
    return None, found


def _adopt(ids, built, older) -> None:
    """Mark ``built`` as this add-on version's; every user of ``older`` (from :func:`_reusable`) takes it."""
    built[VERSION_PROP] = GAUSSIANS_VERSION
    if older is not None:
        older.user_remap(built)
        ids.remove(older)
    if isinstance(built, bpy.types.NodeTree):  # the remapped modifiers' inputs follow the new interface
        for obj in bpy.data.objects:
            for mod in obj.modifiers:
                if mod.type == "NODES" and mod.node_group == built and obj.library is None:
                    mod.node_group = built


def upgrade_gaussians_groups() -> None:
    """Every Gaussians node group an earlier add-on built (each SH degree's, and the ``.001`` copies that an
    object appended from another file brings; found by name, as the groups before GAUSSIANS_VERSION 2 carry no
    marker) replaced by this version's, its users remapped and the replaced ones named in the console: so that a
    file saved before renders all its Gaussians as the service does, not only those of the degree imported
    next."""
    pattern = re.compile(rf"^{re.escape(GAUSSIANS_NODES)}(?: SH ([1-{MAX_SH_DEGREE}]))?(?:\.\d+)?$")
    stale = [
        (tree.name, int(match[1] or 0))
        for tree in bpy.data.node_groups
        if (match := pattern.match(tree.name)) and tree.library is None and not _is_current(tree)
    ]
    for name, degree in stale:
        current = gaussians_node_group(degree)  # rebuilds the group of that name where it is stale
        tree = bpy.data.node_groups.get(name)  # a ".001" copy, still stale; the group itself is ``current`` now
        if tree is not None and tree != current:
            tree.user_remap(current)
            bpy.data.node_groups.remove(tree)
            _adopt(bpy.data.node_groups, current, None)
    if stale:  # an edit made to one of them is gone with it
        print(f"ReconLoop: replaced node groups of an earlier add-on version: {', '.join(n for n, _ in stale)}")


def _new_tree(name: str) -> bpy.types.NodeTree:
    tree = bpy.data.node_groups.new(name, "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    return tree


def _emission_material(name: str):
    """A new material of an empty node tree holding an output and an emission node: (mat, tree, out, emit)."""
    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:  # Blender before 5.0: node trees are opt-in
        mat.use_nodes = True
    nt = mat.node_tree
    nt.nodes.clear()
    return mat, nt, nt.nodes.new("ShaderNodeOutputMaterial"), nt.nodes.new("ShaderNodeEmission")


def _material(name: str) -> bpy.types.Material:
    """Points: emission coloured by the ``display_color`` attribute."""
    mat = bpy.data.materials.get(name)
    if mat is not None:
        return mat
    mat, nt, out, emit = _emission_material(name)
    color = nt.nodes.new("ShaderNodeAttribute")
    color.attribute_name = ATTR_DISPLAY_COLOR
    color.attribute_type = "GEOMETRY"
    nt.links.new(color.outputs["Color"], emit.inputs["Color"])
    nt.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    mat.diffuse_color = (0.8, 0.8, 0.8, 1.0)
    return mat


def _math(nt, op: str, a, b=None):
    """A Math node ``op`` over sockets or numbers; returns its output socket. Shader and geometry node
    trees alike."""
    node = nt.nodes.new("ShaderNodeMath")
    node.operation = op
    for i, v in enumerate((a, b)):
        if v is None:
            continue
        if isinstance(v, (int, float)):
            node.inputs[i].default_value = float(v)
        else:
            nt.links.new(v, node.inputs[i])
    return node.outputs["Value"]


def _vmath(nt, op: str, a, b=None):
    """A Vector Math node ``op`` over sockets (``b`` is the factor of SCALE); returns its "Value" output
    for DOT_PRODUCT and LENGTH, else "Vector". Shader and geometry node trees alike."""
    node = nt.nodes.new("ShaderNodeVectorMath")
    node.operation = op
    nt.links.new(a, node.inputs[0])
    if b is not None:
        nt.links.new(b, node.inputs["Scale"] if op == "SCALE" else node.inputs[1])
    return node.outputs["Value" if op in ("DOT_PRODUCT", "LENGTH") else "Vector"]


def gaussian_material() -> bpy.types.Material:
    """The splat shader: each ray sees a Gaussian as 3DGS rasterizers draw it.

    The instance's object space is the Gaussian's own frame in standard deviations (instance rotation
    = the Gaussian's, scale = its sigmas), where the Gaussian is isotropic. A ray through it reaches its
    highest density where it passes closest to the centre: at squared distance
    r2 = |p|^2 - (p . d)^2 (p: the hit point, d: the unit ray direction, both in object space), which is
    the squared Mahalanobis distance of the projected 2D Gaussian that 3DGS rasterizes. The ray takes
    alpha = min(opacity exp(-r2 / 2), ALPHA_MAX) for r2 < CUTOFF_SIGMA^2, 0 where that is below ALPHA_MIN (the
    rasterizer drops it: the fitted temple's median opacity is 0.006, and drawn in full such Gaussians were a
    haze), once (back faces are clear), over an emission of the instance's ``color`` (linear) or
    ``color_srgb`` (the values as fitted; the ``sRGB blending`` switch picks): the SH DC colour, or for
    Gaussians of SH degree above 0 their colour seen from the scene camera, which :func:`gaussians_node_group`
    stores on the instances. A render's card carries in its frame the Gaussian widened by the rasterizer's
    low-pass (:func:`gaussians_node_group`).
    """
    mat, older = _reusable(bpy.data.materials, GAUSSIANS_MATERIAL)
    if mat is not None:
        return mat
    mat, nt, out, emit = _emission_material(GAUSSIANS_MATERIAL)
    color = nt.nodes.new("ShaderNodeAttribute")
    color.attribute_name, color.attribute_type = ATTR_COLOR, "INSTANCER"
    color_srgb = nt.nodes.new("ShaderNodeAttribute")
    color_srgb.attribute_name, color_srgb.attribute_type = ATTR_COLOR_SRGB, "INSTANCER"
    pick = nt.nodes.new("ShaderNodeMix")
    pick.data_type = "RGBA"
    switch = nt.nodes.new("ShaderNodeValue")
    switch.name = switch.label = SRGB_SWITCH
    switch.outputs[0].default_value = 0.0
    nt.links.new(switch.outputs[0], pick.inputs["Factor"])
    nt.links.new(color.outputs["Color"], pick.inputs["A"])
    nt.links.new(color_srgb.outputs["Color"], pick.inputs["B"])
    nt.links.new(pick.outputs["Result"], emit.inputs["Color"])
    opacity = nt.nodes.new("ShaderNodeAttribute")
    opacity.attribute_name, opacity.attribute_type = ATTR_OPACITY, "INSTANCER"
    coords = nt.nodes.new("ShaderNodeTexCoord")
    geometry = nt.nodes.new("ShaderNodeNewGeometry")
    to_object = nt.nodes.new("ShaderNodeVectorTransform")
    to_object.vector_type, to_object.convert_from, to_object.convert_to = "VECTOR", "WORLD", "OBJECT"
    nt.links.new(geometry.outputs["Incoming"], to_object.inputs["Vector"])
    # the instance's space (a shell's or a card's) -> the Gaussian's frame in standard deviations
    rows = []
    for name in ATTR_FRAME:
        row = nt.nodes.new("ShaderNodeAttribute")
        row.attribute_name, row.attribute_type = name, "INSTANCER"
        rows.append(row.outputs["Vector"])

    def to_frame(v):
        xyz = nt.nodes.new("ShaderNodeCombineXYZ")
        for k, row in enumerate(rows):
            nt.links.new(_vmath(nt, "DOT_PRODUCT", row, v), xyz.inputs[k])
        return xyz.outputs["Vector"]

    p = to_frame(coords.outputs["Object"])
    d = _vmath(nt, "NORMALIZE", to_frame(to_object.outputs["Vector"]))
    along = _vmath(nt, "DOT_PRODUCT", p, d)
    r2 = _math(nt, "SUBTRACT", _vmath(nt, "DOT_PRODUCT", p, p), _math(nt, "MULTIPLY", along, along))
    density = _math(nt, "EXPONENT", _math(nt, "MULTIPLY", r2, -0.5))
    alpha = _math(nt, "MINIMUM", _math(nt, "MULTIPLY", opacity.outputs["Fac"], density), ALPHA_MAX)
    alpha = _math(nt, "MULTIPLY", alpha, _math(nt, "SUBTRACT", 1.0, _math(nt, "LESS_THAN", alpha, ALPHA_MIN)))
    inside = _math(nt, "LESS_THAN", r2, CUTOFF_SIGMA * CUTOFF_SIGMA)
    # Each splat counts once: at its front face, or, when the camera sits inside its cutoff sphere (a large
    # Gaussian around the viewer; its rays meet only back faces), at the back face.
    camera = nt.nodes.new("ShaderNodeCameraData")
    back = nt.nodes.new("ShaderNodeVectorMath")  # the camera, world: the shading point + incoming x distance
    back.operation = "SCALE"
    nt.links.new(geometry.outputs["Incoming"], back.inputs[0])
    nt.links.new(camera.outputs["View Distance"], back.inputs["Scale"])
    cam_world = _vmath(nt, "ADD", geometry.outputs["Position"], back.outputs["Vector"])
    cam_to_object = nt.nodes.new("ShaderNodeVectorTransform")
    cam_to_object.vector_type, cam_to_object.convert_from, cam_to_object.convert_to = "POINT", "WORLD", "OBJECT"
    nt.links.new(cam_world, cam_to_object.inputs["Vector"])
    cam_obj = to_frame(cam_to_object.outputs["Vector"])
    cam_r2 = _vmath(nt, "DOT_PRODUCT", cam_obj, cam_obj)
    cam_inside = _math(nt, "LESS_THAN", cam_r2, CUTOFF_SIGMA * CUTOFF_SIGMA)
    front = _math(nt, "SUBTRACT", 1.0, geometry.outputs["Backfacing"])
    counted = _math(nt, "ADD", front, _math(nt, "MULTIPLY", geometry.outputs["Backfacing"], cam_inside))
    alpha = _math(nt, "MULTIPLY", _math(nt, "MULTIPLY", alpha, inside), counted)
    transparent = nt.nodes.new("ShaderNodeBsdfTransparent")
    mix = nt.nodes.new("ShaderNodeMixShader")
    nt.links.new(alpha, mix.inputs["Fac"])
    nt.links.new(transparent.outputs["BSDF"], mix.inputs[1])
    nt.links.new(emit.outputs["Emission"], mix.inputs[2])
    nt.links.new(mix.outputs["Shader"], out.inputs["Surface"])
    if hasattr(mat, "surface_render_method"):  # EEVEE (4.2+): sorted, blended transparency
        mat.surface_render_method = "BLENDED"
    mat.use_backface_culling = True  # EEVEE: one surface per splat, as in Cycles
    if hasattr(mat, "use_transparency_overlap"):
        mat.use_transparency_overlap = True
    mat.diffuse_color = (0.8, 0.8, 0.8, 1.0)
    _adopt(bpy.data.materials, mat, older)
    return mat


def _sh_basis(nt, degree: int, direction) -> list:
    """Sockets of the SH basis functions Y_1 .. Y_(K-1) (backend/rasterizers/sh.py's sh_basis) at
    ``direction`` (normalised here). Shader and geometry node trees alike."""
    xyz = nt.nodes.new("ShaderNodeSeparateXYZ")
    nt.links.new(_vmath(nt, "NORMALIZE", direction), xyz.inputs[0])
    x, y, z = xyz.outputs["X"], xyz.outputs["Y"], xyz.outputs["Z"]

    def mul(*factors):
        out = factors[0]
        for f in factors[1:]:
            out = _math(nt, "MULTIPLY", out, f)
        return out

    def sub(a, b):
        return _math(nt, "SUBTRACT", a, b)

    out = [mul(y, -SH_C1), mul(z, SH_C1), mul(x, -SH_C1)]
    if degree >= 2:
        xx, yy, zz = mul(x, x), mul(y, y), mul(z, z)
        xy, xx_yy = mul(x, y), _math(nt, "ADD", xx, yy)
        out += [
            mul(xy, SH_C2[0]),
            mul(y, z, SH_C2[1]),
            mul(sub(mul(zz, 2.0), xx_yy), SH_C2[2]),
            mul(x, z, SH_C2[3]),
            mul(sub(xx, yy), SH_C2[4]),
        ]
    if degree >= 3:
        four_zz = sub(mul(zz, 4.0), xx_yy)  # 4z^2 - x^2 - y^2
        out += [
            mul(y, sub(mul(xx, 3.0), yy), SH_C3[0]),
            mul(xy, z, SH_C3[1]),
            mul(y, four_zz, SH_C3[2]),
            mul(z, sub(mul(zz, 2.0), mul(xx_yy, 3.0)), SH_C3[3]),
            mul(x, four_zz, SH_C3[4]),
            mul(z, sub(xx, yy), SH_C3[5]),
            mul(x, sub(xx, mul(yy, 3.0)), SH_C3[6]),
        ]
    return out


def _sh_color(nt, degree: int, coefficients: list, direction):
    """The colour seen along ``direction`` (camera to centre) as the service computes it (backend/rasterizers/
    sh.py's sh_to_colors): max(0, 0.5 + sum_k Y_k sh_k), in the fitted (sRGB-encoded) values.

    Args:
        degree: the SH degree d.
        coefficients: vector sockets of sh_0 .. sh_(K-1), K = (d+1)^2.
    Returns:
        a vector socket. Shader and geometry node trees alike.
    """
    acc = nt.nodes.new("ShaderNodeVectorMath")  # 0.5 + Y_0 sh_0
    acc.operation = "MULTIPLY_ADD"
    nt.links.new(coefficients[0], acc.inputs[0])
    acc.inputs[1].default_value = (SH_C0,) * 3
    acc.inputs[2].default_value = (SH_OFFSET,) * 3
    total = acc.outputs["Vector"]
    for coefficient, basis in zip(coefficients[1:], _sh_basis(nt, degree, direction), strict=True):
        node = nt.nodes.new("ShaderNodeVectorMath")  # + Y_k sh_k
        node.operation = "MULTIPLY_ADD"
        nt.links.new(coefficient, node.inputs[0])
        nt.links.new(basis, node.inputs[1])
        nt.links.new(total, node.inputs[2])
        total = node.outputs["Vector"]
    floor = nt.nodes.new("ShaderNodeVectorMath")
    floor.operation = "MAXIMUM"
    nt.links.new(total, floor.inputs[0])
    floor.inputs[1].default_value = (0.0, 0.0, 0.0)
    return floor.outputs["Vector"]


def _srgb_to_linear(nt, color):
    """scene_io.srgb_to_linear on a vector socket, clipped to [0, 1] first (as ``color`` is). Shader and
    geometry node trees alike."""
    rgb = nt.nodes.new("ShaderNodeSeparateXYZ")
    nt.links.new(color, rgb.inputs[0])
    out = nt.nodes.new("ShaderNodeCombineXYZ")
    for i in range(3):
        c = _math(nt, "MINIMUM", _math(nt, "MAXIMUM", rgb.outputs[i], 0.0), 1.0)
        linear = _math(nt, "DIVIDE", c, scene_io.SRGB_LINEAR_SLOPE)
        curve = _math(
            nt,
            "POWER",
            _math(nt, "DIVIDE", _math(nt, "ADD", c, scene_io.SRGB_OFFSET), 1.0 + scene_io.SRGB_OFFSET),
            scene_io.SRGB_GAMMA,
        )
        above = _math(nt, "GREATER_THAN", c, scene_io.SRGB_LINEAR_KNEE)
        nt.links.new(
            _math(nt, "ADD", linear, _math(nt, "MULTIPLY", above, _math(nt, "SUBTRACT", curve, linear))), out.inputs[i]
        )
    return out.outputs["Vector"]


def points_node_group() -> bpy.types.NodeTree:
    """Mesh vertices -> points of radius ``Point Radius`` with the points material (colour from ``color``)."""
    tree = bpy.data.node_groups.get(POINTS_NODES)
    if tree is not None:
        return tree
    tree = _new_tree(POINTS_NODES)
    radius = tree.interface.new_socket("Point Radius", in_out="INPUT", socket_type="NodeSocketFloat")
    radius.default_value = POINT_RADIUS_DEFAULT
    radius.min_value = 0.0
    n = tree.nodes
    gin, gout = n.new("NodeGroupInput"), n.new("NodeGroupOutput")
    to_points = n.new("GeometryNodeMeshToPoints")
    read = n.new("GeometryNodeInputNamedAttribute")
    read.data_type = "FLOAT_COLOR"
    read.inputs["Name"].default_value = ATTR_COLOR
    store = n.new("GeometryNodeStoreNamedAttribute")
    store.data_type = "FLOAT_COLOR"
    store.domain = "POINT"
    store.inputs["Name"].default_value = ATTR_DISPLAY_COLOR
    set_mat = n.new("GeometryNodeSetMaterial")
    set_mat.inputs["Material"].default_value = _material(POINTS_MATERIAL)
    tree.links.new(gin.outputs["Geometry"], to_points.inputs["Mesh"])
    tree.links.new(gin.outputs["Point Radius"], to_points.inputs["Radius"])
    tree.links.new(to_points.outputs["Points"], store.inputs["Geometry"])
    tree.links.new(read.outputs["Attribute"], store.inputs["Value"])
    tree.links.new(store.outputs["Geometry"], set_mat.inputs["Geometry"])
    tree.links.new(set_mat.outputs["Geometry"], gout.inputs["Geometry"])
    return tree


def _store_frame(tree: bpy.types.NodeTree, instances, rows):
    """Instances with the ATTR_FRAME rows set (three vectors, or vector field sockets)."""
    for name, row in zip(ATTR_FRAME, rows, strict=True):
        store = tree.nodes.new("GeometryNodeStoreNamedAttribute")
        store.data_type, store.domain = "FLOAT_VECTOR", "INSTANCE"
        store.inputs["Name"].default_value = name
        tree.links.new(instances, store.inputs["Geometry"])
        if isinstance(row, tuple):
            store.inputs["Value"].default_value = row
        else:
            tree.links.new(row, store.inputs["Value"])
        instances = store.outputs["Geometry"]
    return instances


def _store_sh_colors(tree: bpy.types.NodeTree, points, degree: int, position, camera):
    """Points with ``color_srgb`` and ``color`` set to the colour of SH degree ``degree`` seen from
    ``camera`` (a location socket, the points' space)."""
    coefficients = []
    for k in range((degree + 1) ** 2):
        read = tree.nodes.new("GeometryNodeInputNamedAttribute")
        read.data_type = "FLOAT_VECTOR"
        read.inputs["Name"].default_value = ATTR_SH.format(k)
        coefficients.append(read.outputs["Attribute"])
    fitted = _sh_color(tree, degree, coefficients, _vmath(tree, "SUBTRACT", position, camera))
    for name, value in ((ATTR_COLOR_SRGB, fitted), (ATTR_COLOR, _srgb_to_linear(tree, fitted))):
        store = tree.nodes.new("GeometryNodeStoreNamedAttribute")
        store.data_type, store.domain = "FLOAT_COLOR", "POINT"
        store.inputs["Name"].default_value = name
        tree.links.new(points, store.inputs["Geometry"])
        tree.links.new(value, store.inputs["Value"])
        points = store.outputs["Geometry"]
    return points


def _render_size(tree: bpy.types.NodeTree) -> list:
    """Value nodes holding the active scene's render width and height in pixels (resolution x percentage),
    kept up to date by drivers (simple expressions: no Python runs, the file renders without the add-on).
    Returns their output sockets [width, height]."""
    out = []
    for label, prop in RENDER_SIZE_NODES:
        value = tree.nodes.new("ShaderNodeValue")
        value.name = value.label = label
        driver = tree.driver_add(f'nodes["{label}"].outputs[0].default_value').driver
        driver.type = "SCRIPTED"
        for var_name, path in (("size", f"render.{prop}"), ("percent", "render.resolution_percentage")):
            var = driver.variables.new()
            var.name, var.type = var_name, "CONTEXT_PROP"
            var.targets[0].context_property = "ACTIVE_SCENE"
            var.targets[0].data_path = path
        driver.expression = "size * percent / 100"
        out.append(value.outputs[0])
    return out


def _low_pass_rows(tree: bpy.types.NodeTree, rows: list, blurs: list) -> list:
    """The rows of a frame matrix F (instance space -> a Gaussian's frame in standard deviations, where its
    covariance is I) after the Gaussian is convolved with Gaussians of covariance u u^T for each ``u`` of
    ``blurs`` (vector sockets in the frame's coordinates): the rows of G F with G^T G = (I + sum u u^T)^-1.

    One blur at a time: (I + u u^T)^(-1/2) = I - c u^ u^T with c = 1 - 1 / sqrt(1 + |u|^2) (u^ = u / |u|),
    and I + u u^T + v v^T = B (I + w w^T) B with B = (I + u u^T)^(1/2), w = B^-1 v, so the next blur is
    carried by B^-1 first. No matrix is inverted or factored: a blur far wider than the Gaussian (a sigma of
    a thousandth of a pixel) loses no precision. Geometry node fields."""
    n, links = tree.nodes, tree.links
    for j, u in enumerate(blurs):
        unit = _vmath(tree, "NORMALIZE", u)
        c = _math(
            tree,
            "SUBTRACT",
            1.0,
            _math(tree, "INVERSE_SQRT", _math(tree, "ADD", 1.0, _vmath(tree, "DOT_PRODUCT", u, u))),
        )
        comps = n.new("ShaderNodeSeparateXYZ")
        links.new(unit, comps.inputs[0])
        along = None  # sum_k u^_k row_k
        for k, row in enumerate(rows):
            term = _vmath(tree, "SCALE", row, comps.outputs[k])
            along = term if along is None else _vmath(tree, "ADD", along, term)
        rows = [
            _vmath(tree, "SUBTRACT", row, _vmath(tree, "SCALE", along, _math(tree, "MULTIPLY", c, comps.outputs[k])))
            for k, row in enumerate(rows)
        ]
        blurs[j + 1 :] = [
            _vmath(
                tree,
                "SUBTRACT",
                v,
                _vmath(tree, "SCALE", unit, _math(tree, "MULTIPLY", c, _vmath(tree, "DOT_PRODUCT", unit, v))),
            )
            for v in blurs[j + 1 :]
        ]
    return rows


def gaussians_node_group(degree: int = 0) -> bpy.types.NodeTree:
    """Mesh vertices -> one instance per Gaussian; :func:`gaussian_material` draws the Gaussian on it. One
    group per SH degree: "ReconLoop Gaussians" (degree 0), "ReconLoop Gaussians SH 3", ...

    In the viewport the instance is an icosahedron, rotated by ``rotation`` and scaled by ``scale`` (its
    space counts standard deviations), that holds the CUTOFF_SIGMA ellipsoid, drawn once at its front
    face: it looks right from anywhere the user orbits. A render draws it instead on one card through the
    Gaussian's centre, parallel to the scene camera's image plane: every ray meets the cards in the order
    of their centres' depth, the order in which the service's rasterizer composites them. (Shells are met
    where the ray enters them: a wide Gaussian behind an object, a backdrop of the demo scene with sigmas
    of metres, was drawn in front of it; docs/benchmarks.md, "Gaussians in Blender".) The card is the
    bounding box of the ellipse the rasterizer splats (as far as alpha reaches ALPHA_MIN: sqrt(2 ln(opacity /
    ALPHA_MIN)) sigmas, at most CUTOFF_SIGMA), carried along the ray through the centre onto the card's plane:
    each Gaussian axis a (camera axes, one sigma) gives (a_x - a_z x / z, a_y - a_z y / z) for the centre at
    (x, y, z), and the card's half sizes are that many sigmas x the root sums of their squares (at most
    CARD_MAX_SIGMA sigmas). Either instance stores the rows of the matrix from its space to the Gaussian's
    frame (ATTR_FRAME) for the material: where a ray meets the geometry does not change the Gaussian it sees
    there.

    A card draws its Gaussian convolved with the rasterizer's low-pass (the "Low-pass" input, LOW_PASS_PX2 px^2
    in the render's pixels, as the service's eps2d): a Gaussian of sigma z sqrt(eps) / f along the camera's
    x and y at the centre's depth z (f: the focal length in the render's pixels, from the active camera's
    projection matrix and the render size that drivers read from the active scene), which the rasterizer's
    Jacobian maps to eps px^2. It widens the card and enters the frame rows (:func:`_low_pass_rows`). A
    Gaussian thinner than a pixel, common in real fits, is otherwise far thinner in Cycles than in the service's
    render (docs/benchmarks.md, "Gaussians in Blender"). The viewport's shells draw the Gaussians as fitted.

    For SH degree d > 0 the group first overwrites each point's ``color_srgb`` and ``color`` (so the
    instances') with its colour seen from the scene camera, as the service computes it (:func:`_sh_color`
    over the ATTR_SH attributes; dir from the camera to the centre, in the object's axes, which are the
    service's world axes while the object keeps the transform it was imported with). Geometry nodes, not
    the material, evaluate it: EEVEE reads at most 8 instance attributes per material (GPU_MAX_UNIFORM_ATTR)
    and drops the rest, and a degree 3 needs 16 coefficients. The viewport's shells take the same colours:
    the scene camera's view, not the viewport's."""
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"degree must be in 0..{MAX_SH_DEGREE}; got {degree}")
    name = GAUSSIANS_NODES if degree == 0 else f"{GAUSSIANS_NODES} SH {degree}"
    tree, older = _reusable(bpy.data.node_groups, name)
    if tree is not None:
        return tree
    tree = _new_tree(name)
    low_pass = tree.interface.new_socket(LOW_PASS_INPUT, in_out="INPUT", socket_type="NodeSocketFloat")
    low_pass.description = (
        "px^2 added to each Gaussian's 2D covariance in renders, in the render's pixels, as the service's "
        "rasterizer does (0: the Gaussians as fitted, thin ones thinner than the service draws them)"
    )
    low_pass.default_value, low_pass.min_value = LOW_PASS_PX2, 0.0
    n = tree.nodes
    links = tree.links
    gin, gout = n.new("NodeGroupInput"), n.new("NodeGroupOutput")
    to_points = n.new("GeometryNodeMeshToPoints")
    links.new(gin.outputs["Geometry"], to_points.inputs["Mesh"])
    points = to_points.outputs["Points"]
    # the scene camera in the object's space
    camera = n.new("GeometryNodeInputActiveCamera")
    info = n.new("GeometryNodeObjectInfo")
    info.transform_space = "RELATIVE"
    links.new(camera.outputs["Active Camera"], info.inputs["Object"])
    position = n.new("GeometryNodeInputPosition")
    if degree > 0:
        points = _store_sh_colors(tree, points, degree, position.outputs["Position"], info.outputs["Location"])
    material = gaussian_material()
    rot = n.new("GeometryNodeInputNamedAttribute")
    rot.data_type = "QUATERNION"
    rot.inputs["Name"].default_value = ATTR_ROTATION
    scale = n.new("GeometryNodeInputNamedAttribute")
    scale.data_type = "FLOAT_VECTOR"
    scale.inputs["Name"].default_value = ATTR_SCALE

    def instanced(mesh_node, rotation, size) -> bpy.types.NodeSocket:
        set_mat = n.new("GeometryNodeSetMaterial")
        set_mat.inputs["Material"].default_value = material
        links.new(mesh_node.outputs["Mesh"], set_mat.inputs["Geometry"])
        inst = n.new("GeometryNodeInstanceOnPoints")
        links.new(points, inst.inputs["Points"])
        links.new(set_mat.outputs["Geometry"], inst.inputs["Instance"])
        links.new(rotation, inst.inputs["Rotation"])
        links.new(size, inst.inputs["Scale"])
        return inst.outputs["Instances"]

    def math(op: str, a, b=None, vector: bool = False):
        return (_vmath if vector else _math)(tree, op, a, b)

    # viewport: shells in the Gaussian's frame
    shell = n.new("GeometryNodeMeshIcoSphere")
    shell.inputs["Subdivisions"].default_value = 1
    shell.inputs["Radius"].default_value = CUTOFF_SIGMA / ICOSAHEDRON_INRADIUS
    identity = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    shells = _store_frame(tree, instanced(shell, rot.outputs["Attribute"], scale.outputs["Attribute"]), identity)

    # render: cards parallel to the camera's image plane through each centre (the camera in the object's
    # space), as wide and tall as the ellipse the rasterizer splats, carried onto the card's plane
    uncam = n.new("FunctionNodeInvertRotation")
    links.new(info.outputs["Rotation"], uncam.inputs["Rotation"])

    def in_camera(vector) -> bpy.types.NodeSocket:  # object-space direction -> the camera's axes
        node = n.new("FunctionNodeRotateVector")
        links.new(vector, node.inputs["Vector"])
        links.new(uncam.outputs["Rotation"], node.inputs["Rotation"])
        return node.outputs["Vector"]

    centre = n.new("ShaderNodeSeparateXYZ")  # the centre in the camera's axes (in front: z < 0)
    links.new(
        in_camera(math("SUBTRACT", position.outputs["Position"], info.outputs["Location"], vector=True)),
        centre.inputs[0],
    )
    depth = math("MINIMUM", centre.outputs["Z"], -1e-9)
    slope_x, slope_y = math("DIVIDE", centre.outputs["X"], depth), math("DIVIDE", centre.outputs["Y"], depth)
    sigmas = n.new("ShaderNodeSeparateXYZ")
    links.new(scale.outputs["Attribute"], sigmas.inputs["Vector"])
    largest = math("MAXIMUM", math("MAXIMUM", sigmas.outputs[0], sigmas.outputs[1]), sigmas.outputs[2])
    # the low-pass: a Gaussian of LOW_PASS px^2 in the render's pixels, at the centre's depth in world units along
    # the camera's x and y (the rasterizer's Jacobian maps those axes to pixels by f / z): sigma z sqrt(eps) / f
    blur_sigma = [0.0, 0.0]  # Blender before 5.0 has no Camera Info node: no low-pass, the Gaussians as fitted
    if hasattr(bpy.types, "GeometryNodeCameraInfo"):
        lens = n.new("GeometryNodeCameraInfo")
        links.new(camera.outputs["Active Camera"], lens.inputs["Camera"])
        projection = n.new("FunctionNodeSeparateMatrix")  # P00 = 2 fx / width, P11 = 2 fy / height (pixels)
        links.new(lens.outputs["Projection Matrix"], projection.inputs["Matrix"])
        # world units a pixel spans at the centre: |z| / f for a perspective camera (f in pixels), 1 / (pixels a
        # world unit) for an orthographic one, whose P00 W / 2 is that
        ortho = lens.outputs["Is Orthographic"]
        reach = math("ADD", ortho, math("MULTIPLY", math("SUBTRACT", 1.0, ortho), math("ABSOLUTE", depth)))
        blur_sigma = []
        for p, side in zip(("Column 1 Row 1", "Column 2 Row 2"), _render_size(tree), strict=True):
            focal = math("MULTIPLY", math("MULTIPLY", projection.outputs[p], side), 0.5)  # pixels
            per_pixel = math("DIVIDE", reach, focal)
            blur_sigma.append(math("MULTIPLY", per_pixel, math("SQRT", gin.outputs[LOW_PASS_INPUT])))
    var_x, var_y = (math("MULTIPLY", b, b) for b in blur_sigma)
    widest = math("MULTIPLY", math("MAXIMUM", largest, math("MAXIMUM", *blur_sigma)), CARD_MAX_SIGMA)
    axes, blur_x, blur_y = [], n.new("ShaderNodeCombineXYZ"), n.new("ShaderNodeCombineXYZ")
    for k, unit in enumerate(identity):
        turn = n.new("FunctionNodeRotateVector")  # the Gaussian's axis k, one sigma long, in the camera's axes
        turn.inputs["Vector"].default_value = unit
        links.new(rot.outputs["Attribute"], turn.inputs["Rotation"])
        a = in_camera(turn.outputs["Vector"])
        axes.append(a)
        # the blur's axes in the Gaussian's frame (standard deviations): row k of S^-1 R^T times sigma_blur
        unit_parts = n.new("ShaderNodeSeparateXYZ")
        links.new(a, unit_parts.inputs[0])
        for blur, part, b in ((blur_x, "X", blur_sigma[0]), (blur_y, "Y", blur_sigma[1])):
            links.new(math("DIVIDE", math("MULTIPLY", unit_parts.outputs[part], b), sigmas.outputs[k]), blur.inputs[k])
        parts = n.new("ShaderNodeSeparateXYZ")
        links.new(math("SCALE", a, sigmas.outputs[k], vector=True), parts.inputs[0])
        # carried along the ray through the centre onto the card's plane: (a_x - a_z x / z, a_y - a_z y / z)
        u_x = math("SUBTRACT", parts.outputs["X"], math("MULTIPLY", parts.outputs["Z"], slope_x))
        u_y = math("SUBTRACT", parts.outputs["Y"], math("MULTIPLY", parts.outputs["Z"], slope_y))
        sq_x, sq_y = math("MULTIPLY", u_x, u_x), math("MULTIPLY", u_y, u_y)
        var_x, var_y = math("ADD", var_x, sq_x), math("ADD", var_y, sq_y)
    # as far as alpha reaches ALPHA_MIN: sqrt(2 ln(opacity / ALPHA_MIN)) sigmas (0 for a Gaussian fainter than that)
    opacity = n.new("GeometryNodeInputNamedAttribute")
    opacity.data_type = "FLOAT"
    opacity.inputs["Name"].default_value = ATTR_OPACITY
    reach = math("MAXIMUM", math("DIVIDE", opacity.outputs["Attribute"], ALPHA_MIN), 1.0)
    extent = math("SQRT", math("MULTIPLY", math("LOGARITHM", reach, EULER), 2.0))
    extent = math("MAXIMUM", math("MINIMUM", extent, CUTOFF_SIGMA), CARD_MIN_SIGMA)
    half_x = math("MINIMUM", math("MULTIPLY", math("SQRT", var_x), extent), widest)
    half_y = math("MINIMUM", math("MULTIPLY", math("SQRT", var_y), extent), widest)
    size = n.new("ShaderNodeCombineXYZ")
    links.new(half_x, size.inputs["X"])
    links.new(half_y, size.inputs["Y"])
    size.inputs["Z"].default_value = 1.0
    card = n.new("GeometryNodeMeshGrid")  # a 2 x 2 quad in the xy plane, facing +z (the camera's back)
    card.inputs["Size X"].default_value = card.inputs["Size Y"].default_value = 2.0
    card.inputs["Vertices X"].default_value = card.inputs["Vertices Y"].default_value = 2
    cards = instanced(card, info.outputs["Rotation"], size.outputs["Vector"])
    # frame row k = (the Gaussian's axis k in the camera's axes, times the card's size) / sigma_k; then the
    # frame of the Gaussian convolved with the low-pass
    rows = [
        math("DIVIDE", math("MULTIPLY", a, size.outputs["Vector"], vector=True), sigmas.outputs[k], vector=True)
        for k, a in enumerate(axes)
    ]
    rows = _low_pass_rows(tree, rows, [blur_x.outputs["Vector"], blur_y.outputs["Vector"]])
    cards = _store_frame(tree, cards, rows)

    viewport = n.new("GeometryNodeIsViewport")
    pick = n.new("GeometryNodeSwitch")
    pick.input_type = "GEOMETRY"
    links.new(viewport.outputs["Is Viewport"], pick.inputs["Switch"])
    links.new(cards, pick.inputs["False"])
    links.new(shells, pick.inputs["True"])
    links.new(pick.outputs["Output"], gout.inputs["Geometry"])
    tree[LOW_PASS_PROP] = hasattr(bpy.types, "GeometryNodeCameraInfo")
    _adopt(bpy.data.node_groups, tree, older)
    return tree


def prepare_render_for_gaussians(scene: bpy.types.Scene, *, as_fitted: bool = True) -> None:
    """Scene settings under which Gaussians render as the service renders them.

    Cycles may pass through TRANSPARENT_BOUNCES splats per path, without ending paths at random on the
    way (which would make the splats noisy). With ``as_fitted`` the splats blend
    as they were fitted, on the photos' sRGB-encoded values: the material emits ``color_srgb`` and the
    scene's view transform is "Raw" (the render holds those values unchanged); other objects then look
    darker than usual. Without it, the splats emit linear colours and blend in Blender's linear space
    under the "Standard" view: right for opaque splats, brighter where they are see-through.
    """
    cycles = getattr(scene, "cycles", None)
    if cycles is not None:
        cycles.transparent_max_bounces = max(cycles.transparent_max_bounces, TRANSPARENT_BOUNCES)
        # no Russian roulette on the way through the splats: it would turn their soft edges to noise
        cycles.min_transparent_bounces = max(cycles.min_transparent_bounces, TRANSPARENT_BOUNCES)
    scene.view_settings.view_transform = "Raw" if as_fitted else "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure, scene.view_settings.gamma = 0.0, 1.0
    gaussian_material().node_tree.nodes[SRGB_SWITCH].outputs[0].default_value = 1.0 if as_fitted else 0.0


# ---------------------------------------------------------------------------------------------
# Generated frames and estimated cameras


def write_frame_sequence(frames: dict[int, str], folder: str, frame_start: int, frame_end: int) -> str:
    """Lay generated frames out as an image sequence numbered by Blender frame, filling the frames
    between trajectory samples with the latest generated one, so scrubbing shows a frame everywhere.

    Args:
        frames: {Blender frame number: path of the generated PNG}.
        folder: where the sequence goes (created).
    Returns:
        The path of the sequence's first file.
    """
    if not frames:
        raise ReconLoopError("the job returned no generated frames")
    os.makedirs(folder, exist_ok=True)
    fill = scene_io.frame_fill(list(frames), frame_start, max(frame_end, max(frames)))
    first = None
    for f, src_frame in sorted(fill.items()):
        dst = os.path.join(folder, FRAME_FILE.format(f))
        src = frames[src_frame]
        if os.path.abspath(src) != os.path.abspath(dst):
            if os.path.exists(dst):
                os.remove(dst)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        first = first or dst
    return first


def set_background_sequence(
    camera_obj: bpy.types.Object, first_file: str, frame_start: int, frame_count: int, job: str = ""
):
    """Show an image sequence (files numbered by Blender frame) as the camera's background; ``job``: the job
    whose frames they are (``cameras_showing_job`` finds the camera again).

    A call for the sequence the camera already shows (a job's frames arriving one segment after another)
    reloads its image; one for another sequence replaces the camera's earlier frames and removes their image
    where nothing else uses it, so that no stale image stays in the file.
    """
    cam = camera_obj.data
    bg = None
    for old in list(cam.background_images):
        img = old.image
        if img is None or img.get(OBJECT_KIND) != scene_io.KIND_FRAME:
            continue
        shown = os.path.normcase(os.path.abspath(bpy.path.abspath(img.filepath)))
        if bg is None and img.get(FRAME_JOB, "") == job and shown == os.path.normcase(os.path.abspath(first_file)):
            bg = old
            img.reload()
            continue
        cam.background_images.remove(old)
        # Blender counts a removed background as a user still: the image goes only where nothing else (another
        # camera's background, a material's node, the compositor) refers to it and the user has not pinned it
        if not img.use_fake_user and not bpy.data.user_map(subset=[img])[img]:
            bpy.data.images.remove(img)
    if bg is None:
        img = bpy.data.images.load(first_file, check_existing=False)
        img.source = "SEQUENCE"
        if job:
            img[FRAME_JOB] = job
        img[OBJECT_KIND] = scene_io.KIND_FRAME
        bg = cam.background_images.new()
        bg.image = img
    bg.frame_method = "STRETCH"
    bg.alpha = 1.0
    user = bg.image_user
    user.frame_start = frame_start
    user.frame_duration = frame_count
    user.frame_offset = frame_start - 1  # file number = scene frame
    user.use_auto_refresh = True
    user.use_cyclic = False
    cam.show_background_images = True
    return bg


def cameras_showing_job(scene: bpy.types.Scene, job: str) -> list[bpy.types.Object]:
    """The user's cameras in ``scene`` whose background shows ``job``'s generated frames (the trajectory
    camera the job ran on, and any copy of it); a path camera the add-on made is not one."""
    return [
        obj
        for obj in scene.objects
        if obj.type == "CAMERA"
        and obj.get(OBJECT_KIND) != KIND_TRAJECTORY
        and any(bg.image is not None and bg.image.get(FRAME_JOB) == job for bg in obj.data.background_images)
    ]


def import_trajectory_camera(
    frames: list, name: str, coll: bpy.types.Collection, scene: bpy.types.Scene
) -> bpy.types.Object:
    """An animated camera on a trajectory the service chose: pose, lens and shift keyed at each frame.

    The scene's render settings stay as they are (the next job's cameras are read at them): the camera
    matches the path's views wherever the render has their shape.

    Args:
        frames: (Blender frame, ``cameras.OpenCVCamera``) pairs, frames increasing.
    """
    data = bpy.data.cameras.new(name)
    obj = bpy.data.objects.new(name, data)
    _link(obj, coll, KIND_TRAJECTORY)
    previous = None
    for frame, cam in frames:
        params = blender_from_opencv(cam.w2c, cam.K, cam.width, cam.height)
        apply_camera_params(obj, scene, params, set_render=False)
        if previous is not None:  # the Euler angles nearest the last key: no spin at +-180 degrees
            obj.rotation_euler = obj.matrix_world.to_euler("XYZ", previous)
        previous = obj.rotation_euler.copy()
        obj.keyframe_insert("location", frame=frame)
        obj.keyframe_insert("rotation_euler", frame=frame)
        for prop in ("lens", "shift_x", "shift_y"):
            data.keyframe_insert(prop, frame=frame)
    return obj


def import_estimated_cameras(
    cams: list, photos: dict[str, str], coll: bpy.types.Collection, scene: bpy.types.Scene
) -> list[bpy.types.Object]:
    """Blender cameras for cameras the service estimated, each with its photo as background.

    They are the cameras of the job's photos (a photo folder sent without cameras), so the scene's
    render size and pixel aspect become theirs, as when importing a dataset: the next job reads them
    back at those settings. Cameras whose image size or fx/fy differ from the first one's are refused
    before anything is added (a scene has one render size and pixel aspect).

    Args:
        cams: ``scene_io.EstimatedCamera`` list.
        photos: {capture name: photo path on disk} (missing names get no background).
    """
    problem = render_conflicts((e.name, e.camera.K, e.camera.width, e.camera.height) for e in cams)
    if problem:
        raise ReconLoopError(f"estimated cameras: {problem}")
    out = []
    for i, est in enumerate(cams):
        params = est.blender_params()
        data = bpy.data.cameras.new(est.name)
        obj = bpy.data.objects.new(est.name, data)
        _link(obj, coll, scene_io.KIND_CAMERAS)
        apply_camera_params(obj, scene, params, set_render=(i == 0))
        path = photos.get(est.name)
        if path and os.path.isfile(path):
            bg = data.background_images.new()
            bg.image = bpy.data.images.load(path, check_existing=True)
            bg.frame_method = "STRETCH"
            data.show_background_images = True
        out.append(obj)
    return out
