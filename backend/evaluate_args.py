"""The arguments of ``reconloop eval``, kept apart from ``backend.evaluate`` so that building the
CLI's parser (``reconloop --help``) does not import torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from .devices import DEVICE_HELP

TRAJECTORY_MODES = ("auto", "scene", "heldout", "interpolate")
PROTOCOLS = ("llff", "ring", "ring-arc", "dtu")
DEFAULT_TRAIN_VIEWS = 3  # AnyRecon/ReconX sparse-view setting


def size_wxh(text: str) -> tuple[int, int]:
    """An argparse ``type`` for working sizes written WIDTHxHEIGHT (``640x480``): (width, height), each in the
    range of the job settings ``width`` and ``height`` (protocol.settings), so that a size no job can run at is
    refused at once (10000x10000 ran out of memory after a minute; 10x10 failed in the fit's SSIM)."""
    from protocol.settings import BY_NAME

    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480; got {text!r}") from None
    (wlo, whi), (hlo, hhi) = BY_NAME["width"].range, BY_NAME["height"].range
    if not (wlo <= width <= whi and hlo <= height <= hhi):
        raise argparse.ArgumentTypeError(f"width must be in [{wlo}, {whi}] and height in [{hlo}, {hhi}]; got {text!r}")
    return width, height


def positive_int(text: str) -> int:
    """An argparse ``type`` for a whole number >= 1 (a count such as ``--train-views``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text!r}")
    return value


def existing_dir(text: str) -> Path:
    """An argparse ``type`` for a folder that exists (a scene or data folder a script reads)."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path}" if not path.exists() else f"{path} is not a folder")
    return path


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``reconloop eval`` to a (sub)parser."""
    parser.add_argument(
        "scene", type=Path, help="scene folder (scene.json), or with --format a source folder to import"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for eval.json, eval.png and the loop's outputs")
    parser.add_argument(
        "--format", default=None, help="import SCENE from this format first (middlebury, llff, colmap, ...)"
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help="hold out views by a standard protocol (llff: every 8th; ring: all but N spread views; "
        "dtu: pixelNeRF's split of a 49-view DTU scan)",
    )
    parser.add_argument(
        "--train-views", type=positive_int, default=DEFAULT_TRAIN_VIEWS, help="training views (default %(default)s)"
    )
    parser.add_argument(
        "--trajectory-mode", choices=TRAJECTORY_MODES, default="auto", help="the loop's path (default %(default)s)"
    )
    parser.add_argument(
        "--size",
        type=size_wxh,
        default=None,
        metavar="WxH",
        help="working size (default: the scene's settings; under a time budget the most the plan may choose)",
    )
    parser.add_argument(
        "--iterations",
        type=positive_int,
        default=None,
        help="Gaussian iterations (default: the scene's settings; under a time budget the most the plan may choose)",
    )
    parser.add_argument("--no-update", action="store_true", help="turn the memory update (step 6) off")
    parser.add_argument(
        "--silhouettes",
        action="store_true",
        help="with --format middlebury: object masks by the dataset's recipe (masked scores, visual hull)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help=f"{DEVICE_HELP} (default %(default)s)",
    )
