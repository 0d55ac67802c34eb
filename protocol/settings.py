"""Job settings, declared once: name, type, default, range, label, help, and where the sidebar shows them.

This table is part of the wire format: a submit's ``scene.settings`` map and scene.json's
``settings`` object hold these names. Everything else reads it: ``backend.scene.Settings`` (the frozen
dataclass the loop uses) builds its fields and checks from it, the Blender add-on builds its scene
properties and the sidebar's Settings panel from it, and the add-on sends exactly these names.
Stdlib only (runs inside Blender and on the service).

Adding a setting is one :class:`Setting` row appended to :data:`SETTINGS`, plus the code that uses it:
the loop's configs read ``Settings`` in their ``from_settings`` (``backend.loop.LoopConfig``; a
generator sees only ``GeneratorConfig``, so a setting it reads is a field there too), and
``python -m protocol`` regenerates the settings table in ``protocol/README.md`` (a test compares them).

Example::

    >>> from protocol.settings import SETTINGS, check_settings
    >>> check_settings({"width": 64, "guide": False})
    {'width': 64, 'guide': False}
    >>> check_settings({"width": 8})
    Traceback (most recent call last):
    ...
    protocol.settings.SettingError: settings.width: must be in [16, 4096]; got 8
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("int", "float", "bool", "str", "enum")
# Where a setting appears in the Blender sidebar's Settings panel (None in a row: not shown).
SECTION_MAIN = "main"
SECTION_ADVANCED = "advanced"
SECTIONS = (SECTION_MAIN, SECTION_ADVANCED)
MAX_STR_CHARS = 4096  # a string setting (the prompt); the codec bounds any string at 64 KiB anyway


class SettingError(ValueError):
    """A setting value that breaks its row's rule; the message starts with ``settings.<name>``."""


@dataclass(frozen=True)
class Setting:
    """One job setting.

    Attributes:
        name: the key on the wire and in scene.json; a Python identifier.
        kind: "int", "float", "bool", "str" or "enum".
        default: the value when a job does not give one (a CPU's time budget plans a job within them).
        label: short name in the sidebar (fits a narrow sidebar: about 16 characters).
        help: one or two sentences: what it changes and what it costs.
        range: (min, max), inclusive, for "int" and "float"; None for the others.
        choices: for "enum", the values accepted; with ``open_choices`` they are only the values offered
            until the service lists its own (generator names come from the service's registry).
        open_choices: "enum" only: any non-empty string is accepted here, and the backend checks it against
            its registry (``check_settings``'s ``names``).
        section: where the sidebar shows it (SECTIONS), or None for not at all.
    """

    name: str
    kind: str
    default: Any
    label: str
    help: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    open_choices: bool = False
    section: str | None = SECTION_MAIN

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Setting.name: must be an identifier; got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Setting {self.name}.kind: must be one of {KINDS}; got {self.kind!r}")
        if (self.range is not None) != (self.kind in ("int", "float")):
            raise ValueError(f"Setting {self.name}.range: int and float settings need one, others none")
        if (self.kind == "enum") != bool(self.choices):
            raise ValueError(f"Setting {self.name}.choices: enum settings need choices, others none")
        if self.section is not None and self.section not in SECTIONS:
            raise ValueError(f"Setting {self.name}.section: must be one of {SECTIONS} or None; got {self.section!r}")
        self.check(self.default, path=f"Setting {self.name}.default")

    def check(self, value: Any, path: str | None = None, names: Collection[str] | None = None) -> Any:
        """Return ``value`` if it obeys this row (ints accepted for floats, as float); else SettingError.

        ``names``: for an ``open_choices`` row, the values this side has (the backend's registry); None:
        any non-empty name.
        """
        path = path or f"settings.{self.name}"
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise SettingError(f"{path}: must be true or false; got {value!r}")
            return value
        if kind in ("int", "float"):
            number_ok = isinstance(value, int) or (kind == "float" and isinstance(value, float))
            if isinstance(value, bool) or not number_ok:
                raise SettingError(f"{path}: must be {'an integer' if kind == 'int' else 'a number'}; got {value!r}")
            if kind == "float":
                value = float(value)
                if not math.isfinite(value):
                    raise SettingError(f"{path}: must be a finite number; got {value!r}")
            lo, hi = self.range
            if not lo <= value <= hi:
                raise SettingError(f"{path}: must be in [{lo}, {hi}]; got {value}")
            return value
        if not isinstance(value, str):
            raise SettingError(f"{path}: must be a string; got {value!r}")
        if len(value) > MAX_STR_CHARS:
            raise SettingError(f"{path}: at most {MAX_STR_CHARS} characters; got {len(value)}")
        if kind == "enum":
            if self.open_choices and not value:
                raise SettingError(f"{path}: must be a non-empty name; got ''")
            choices = names if self.open_choices else self.choices
            if choices is not None and value not in choices:
                raise SettingError(f"{path}: must be one of {', '.join(choices)}; got {value!r}")
        return value


# The table. Append rows here; keep labels short enough for the sidebar.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "generator",
        "enum",
        "reproject",
        "Generator",
        "How new views are made: 'reproject' warps the captures (fast, CPU); 'refine' corrects reproject's "
        "frames with a small network trained on the job's captures (no weights; Refiner time); 'anyrecon' "
        "is the video diffusion model (GPU). The service lists the generators it has",
        choices=("reproject", "refine", "anyrecon"),
        open_choices=True,
    ),
    Setting(
        "width",
        "int",
        320,
        "Width",
        "Working resolution: generated frames and Gaussian fitting",
        range=(16, 4096),
    ),
    Setting(
        "height", "int", 240, "Height", "Working resolution: generated frames and Gaussian fitting", range=(16, 4096)
    ),
    Setting(
        "segment_length",
        "int",
        40,
        "Segment",
        "Trajectory frames generated together (AnyRecon is trained on 40-frame clips)",
        range=(2, 512),
    ),
    Setting(
        "segment_overlap",
        "int",
        2,
        "Overlap",
        "Frames of the previous segment carried into the next, for continuity (at most the whole previous segment)",
        range=(0, 16),
        section=SECTION_ADVANCED,
    ),
    Setting(
        "retrieval_k",
        "int",
        10,
        "Views",
        "Captures given to the generator for each segment, the nearest to its cameras",
        range=(0, 64),
    ),
    Setting("num_steps", "int", 4, "Steps", "Denoising steps of a diffusion generator", range=(1, 1000)),
    Setting(
        "generator_memory",
        "enum",
        "none",
        "GPU memory",
        "Where a diffusion generator's weights live: 'none' all on the GPU (about 40 GB), 'fp8' stored in "
        "8 bits, 'group_offload' streamed from CPU memory (for 24 GB cards, slower), 'model_offload' each "
        "model on the GPU only while it runs",
        choices=("none", "fp8", "group_offload", "model_offload"),
        section=SECTION_ADVANCED,
    ),
    Setting(
        "gpus",
        "int",
        0,
        "GPUs",
        "GPUs one job's diffusion generator spans on its worker's box (sequence parallel); 0: all the GPUs "
        "the worker has",
        range=(0, 64),
        section=SECTION_ADVANCED,
    ),
    Setting(
        "generator_attention",
        "enum",
        "auto",
        "Attention",
        "A diffusion generator's attention: 'auto' what its weights were trained with (full for AnyRecon's "
        "released weights), 'full', or 'block' (AnyRecon's sparse pattern, for weights trained with it)",
        choices=("auto", "full", "block"),
        section=SECTION_ADVANCED,
    ),
    Setting(
        "refine_seconds",
        "int",
        10,
        "Refiner time",
        "Generator 'refine': seconds its small network trains on the job's own captures (leave one out, "
        "learn to correct the reprojection) before it corrects the frames",
        range=(1, 3600),
        section=SECTION_ADVANCED,
    ),
    Setting(
        "gaussian_iterations",
        "int",
        3000,
        "Iterations",
        "Optimisation steps of each Gaussian fit (the guide's and the final one); more is sharper and slower. "
        "A time budget (Minutes; CPU services have one by default) plans fewer where they do not fit",
        range=(0, 1_000_000),
    ),
    Setting(
        "guide",
        "bool",
        True,
        "Guide",
        "Fit Gaussians on the captures first and render them for the generator (on a CUDA GPU three fits "
        "with different seeds, their mean): better frames where the captures are far apart, two to three "
        "times the fitting time",
    ),
    Setting(
        "update_memory",
        "bool",
        True,
        "Update memory",
        "Add each generated segment's geometry to the point memory before the next (the closed loop)",
        section=SECTION_ADVANCED,
    ),
    Setting(
        "time_budget_min",
        "int",
        0,
        "Minutes",
        "About how long the job may take: the service sizes the working resolution, the Gaussians and the "
        "fitting steps to it from measured step costs (0: no budget; CPU services default to a few minutes). "
        "The plan is sized by the Gaussian fit's cost: with 0 Iterations (no fit) it has no effect",
        range=(0, 24 * 60),
    ),
    Setting(
        "geometry",
        "enum",
        "mvs",
        "Geometry",
        "How the captures' depth is found: 'mvs' plane-sweep stereo (CPU or GPU); 'patchmatch' COLMAP's "
        "PatchMatch (needs pycolmap's CUDA build; a little better on the door's textured photos, worse on close "
        "forward-facing ones, 15-50 s more on an H200); 'hull' the visual hull of the captures' masks. Falls back when it finds too little",
        choices=("mvs", "patchmatch", "hull"),
        section=SECTION_ADVANCED,
    ),
    Setting(
        "photo_cameras",
        "enum",
        "auto",
        "Photo cameras",
        "Photos without cameras: which share one lens when SfM estimates them. 'auto': photos of one size "
        "with the same EXIF camera and focal length; 'one': all photos; 'each': every photo its own",
        choices=("auto", "one", "each"),
        section=SECTION_ADVANCED,
    ),
    Setting("seed", "int", 0, "Seed", "Random seed of generation and fitting", range=(0, 2**31 - 1)),
    Setting("prompt", "str", "", "Prompt", "Optional text for the generator"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
if len(NAMES) != len(SETTINGS):  # pragma: no cover - a table edit that repeats a name
    raise ValueError("protocol.settings.SETTINGS: two rows share a name")


def defaults() -> dict[str, Any]:
    """Every setting's default, by name."""
    return {s.name: s.default for s in SETTINGS}


def in_section(section: str) -> tuple[Setting, ...]:
    """The rows the sidebar shows in ``section``, in table order."""
    return tuple(s for s in SETTINGS if s.section == section)


def check_settings(
    d: Any, path: str = "settings", names: Mapping[str, Collection[str]] | None = None
) -> dict[str, Any]:
    """Check a settings map (wire or scene.json); returns the given values, checked. Raises SettingError.

    ``names``: per ``open_choices`` row, the values this side has (the backend passes its generator
    registry's names); a row missing here takes any non-empty name.
    """
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise SettingError(f"{path}: must be an object; got {type(d).__name__}")
    out: dict[str, Any] = {}
    for key, value in d.items():
        row = BY_NAME.get(key)
        if row is None:
            raise SettingError(f"{path}.{key}: unknown setting; known: {', '.join(sorted(NAMES))}")
        out[key] = row.check(value, f"{path}.{key}", (names or {}).get(key))
    return out


# ----------------------------------------------------------------------------------------------
# Documentation from the table (protocol/README.md, ``python -m protocol``)

PIPE = "\\|"  # a "|" inside a markdown table cell (protocol.schemas's tables too)


def _wire_value(value: Any) -> str:
    """A default as it reads on the wire: JSON-like (true, "reproject", 320)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value:g}" if isinstance(value, float) else str(value)


def _allowed(s: Setting) -> str:
    if s.kind in ("int", "float"):
        lo, hi = s.range
        return f"{_wire_value(lo)}..{_wire_value(hi)}"
    if s.kind == "enum":
        choices = ", ".join(s.choices)
        return f"a name in hello's `generators` (offered: {choices})" if s.open_choices else choices
    if s.kind == "str":
        return f"at most {MAX_STR_CHARS} characters"
    return ""


def settings_markdown() -> str:
    """The table of job settings (``scene.settings``) for protocol/README.md, rendered from SETTINGS.

    Each name is followed by its sidebar label, which the help texts use to name other settings.
    """
    head = [
        "| name (label) | type | range or choices | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    wire_type = {"enum": "str"}  # an enum travels as a string
    rows = [
        f"| `{s.name}` ({s.label}) | {wire_type.get(s.kind, s.kind)} | {_allowed(s)} | {_wire_value(s.default)} "
        f"| {s.help.replace('|', PIPE)} |"
        for s in SETTINGS
    ]
    return "\n".join(head + rows) + "\n"
