"""The job store: one directory per job under the data dir, surviving restarts.

Layout of ``<data_dir>/<job>/`` (``job`` = 32 hex characters from ``secrets.token_hex``)::

    meta.json        {"job", "created", "key", "format"}; written once, atomically
    journal.jsonl    one JSON event per line: {"seq", "time", "state", "stage", "fraction",
                     "message", "artifacts": [{"name", "size", "sha256"}]}; append-only. A line cut by a
                     crash is skipped at load; its seq is never given to another event
    scene/           scene.json + images/ + masks/ (what backend.scene.load_scene reads)
    artifacts/       the runner's output folder; what clients fetch
    manifest.json    {"format": 1, "artifacts": [{"name", "size", "sha256"}]}; rewritten atomically

A job directory appears complete or not at all: submit builds it under ``.tmp-<job>`` and renames it.
Only the service's main thread writes ``journal.jsonl``; only the worker writes ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from protocol import errors, limits
from protocol.errors import ProtocolError
from protocol.images import encoded_image_size, image_bytes, image_field_size, is_raw_pixels
from protocol.schemas import TERMINAL_STATES

from ..fileio import sha256_file, write_atomic
from ..masks import MaskError, read_mask
from ..scene import SCENE_FILE, Scene, SceneError, load_scene
from .auth import may_access

log = logging.getLogger(__name__)

STORE_FORMAT = 1
JOB_ID_BYTES = limits.JOB_ID_CHARS // 2  # 128 bits: unguessable
META_FILE = "meta.json"
JOURNAL_FILE = "journal.jsonl"
MANIFEST_FILE = "manifest.json"
SCENE_DIR = "scene"
ARTIFACTS_DIR = "artifacts"
IMAGES_DIR = "images"
MASKS_DIR = "masks"  # capture masks, named like their photos (masks/c0003.png beside images/c0003.jpg)
TMP_PREFIX = ".tmp-"
PNG_FAST_COMPRESSION = 1  # raw pixels from the wire become PNGs; speed over size
INTERRUPTED_REASON = "the service stopped while this job was running; submit it again to rerun"
CUT_LINE_SEQ = re.compile(rb'^\{"seq": (\d+)')  # the seq of a journal line cut short (json.dumps writes it first)


def new_job_id() -> str:
    return secrets.token_hex(JOB_ID_BYTES)


def resolve_inside(root: Path, name: str) -> Path:
    """``root/name`` as a regular file inside ``root`` (no symlink anywhere on the way), or ValueError."""
    limits.check_artifact_name(name)
    root = root.resolve()
    path = root.joinpath(*PurePosixPath(name).parts)
    probe = root
    for part in PurePosixPath(name).parts:
        probe = probe / part
        if probe.is_symlink():
            raise ValueError(f"artifact {name!r}: {probe.relative_to(root)} is a symlink")
    if not path.resolve().is_relative_to(root):
        raise ValueError(f"artifact {name!r} lies outside the job's folder")
    if not path.is_file():
        raise ValueError(f"artifact {name!r} is not a regular file")
    return path


# ----------------------------------------------------------------------------------------------
# Scenes on the wire <-> scene folders


def _camera_json(cam: dict[str, Any]) -> dict[str, Any]:
    out = {
        "w2c": np.asarray(cam["w2c"], dtype=np.float64).tolist(),
        "K": np.asarray(cam["K"], dtype=np.float64).tolist(),
        "width": cam["width"],
        "height": cam["height"],
    }
    if cam.get("distortion") is not None:
        out["distortion"] = cam["distortion"]
    return out


def _write_image(image: bytes | np.ndarray, path_stem: Path) -> Path:
    """Write an image field as a PNG/JPEG file; returns the path (suffix from the format)."""
    if is_raw_pixels(image):
        from PIL import Image

        path = path_stem.with_suffix(".png")
        mode = "RGB" if image.shape[2] == 3 else "RGBA"
        Image.fromarray(np.ascontiguousarray(image), mode).save(path, compress_level=PNG_FAST_COMPRESSION)
        return path
    data = image_bytes(image)
    fmt, _w, _h = encoded_image_size(data)
    path = path_stem.with_suffix(".png" if fmt == "png" else ".jpg")
    with open(path, "wb") as f:
        f.write(data)
    return path


_VIEW_NOUN = {"captures": "capture", "heldout": "held-out view"}  # how a problem names the client's view
_SECTIONS = ("captures", "trajectory", "heldout")  # a scene's lists in load_scene's order
_POSITION = re.compile(r"^(\w+)(?:\[(\d+)\])?")


def _by_position(problem: str) -> tuple[int, int]:
    """A problem's place in the scene (``captures[2].mask: ...`` after every problem of ``captures[1]``, before
    the trajectory's and the held-out views'); problems of the scene as a whole last."""
    found = _POSITION.match(problem)
    if found is None:  # not a field path: with the scene's problems as a whole
        return len(_SECTIONS), -1
    name, index = found.groups()
    section = _SECTIONS.index(name) if name in _SECTIONS else len(_SECTIONS)
    return section, -1 if index is None else int(index)


def _mask_size_problems(scene: dict[str, Any]) -> list[str]:
    """The captures whose mask is not their photo's size, each as a problem of :class:`SceneError` (its field path
    without ``scene.``, the client's capture named): load_scene finds them too, but names the service's copy of
    the file."""
    problems: list[str] = []
    for key in ("captures", "heldout"):
        for i, c in enumerate(scene.get(key) or ()):
            if c.get("mask") is None:
                continue
            (mw, mh), (w, h) = image_field_size(c["mask"]), image_field_size(c["image"])
            if (mw, mh) != (w, h):
                problems.append(
                    f"{key}[{i}].mask: {_VIEW_NOUN[key]} {c['name']!r}'s mask is {mw}x{mh}; its image is {w}x{h} "
                    "(a mask has its photo's size)"
                )
    return problems


def _mask_content_problem(path: Path, key: str, i: int, name: str) -> str | None:
    """A written mask the job could not read (a 0/1 label image, a body cut short) as a problem of
    :class:`SceneError` (its field path ``key[i].mask``, without ``scene.``), naming the client's view, not the
    service's file (the codec read its header only); None for a mask the job can read."""
    try:
        read_mask(path)
        return None
    except MaskError as err:
        return f"{key}[{i}].mask: {_VIEW_NOUN[key]} {name!r}'s mask {err.reason}"


def write_scene_message(scene: dict[str, Any], folder: Path) -> Scene:
    """Write a submit request's ``scene`` (validated by the codec) as a scene folder and load it; every problem
    load_scene finds, every mask of another size than its photo and every mask the job could not read, named
    in one error.

    Image files are named by position (``images/c0003.png``), never by the client's names; a capture's
    mask goes to ``masks/`` under its photo's stem (``masks/c0003.png``).
    Raises ProtocolError ``bad_field`` naming the field (``scene.captures[3].camera.K: ...``).
    """
    mask_problems = _mask_size_problems(scene)
    images = folder / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    masks = folder / MASKS_DIR

    def captures(items: list[dict[str, Any]], key: str, prefix: str) -> list[dict[str, Any]]:
        out = []
        for i, c in enumerate(items):
            path = _write_image(c["image"], images / f"{prefix}{i:04d}")
            entry: dict[str, Any] = {"name": c["name"], "image": f"{IMAGES_DIR}/{path.name}"}
            if c.get("mask") is not None:
                masks.mkdir(exist_ok=True)
                mask_path = _write_image(c["mask"], masks / f"{prefix}{i:04d}")
                unread = _mask_content_problem(mask_path, key, i, c["name"])
                if unread:
                    mask_problems.append(unread)
                entry["mask"] = f"{MASKS_DIR}/{mask_path.name}"
            if c.get("camera") is not None:
                entry["camera"] = _camera_json(c["camera"])
            out.append(entry)
        return out

    data: dict[str, Any] = {"version": 1, "captures": captures(scene["captures"], "captures", "c")}
    if scene.get("trajectory"):
        data["trajectory"] = [{"frame": t["frame"], "camera": _camera_json(t["camera"])} for t in scene["trajectory"]]
    if scene.get("heldout"):
        data["heldout"] = captures(scene["heldout"], "heldout", "h")
    if scene.get("settings") is not None:
        data["settings"] = scene["settings"]
    write_atomic(folder / SCENE_FILE, json.dumps(data, indent=1).encode())
    problems: list[str] = []
    try:
        loaded = load_scene(folder)
    except SceneError as err:
        problems = list(err.problems)
    if mask_problems or problems:  # every problem named as the wire's field path; the first is the reply's field
        # a mask's problems said with the client's view, not again with the service's file; in the scene's order
        sized = {p.split(":", 1)[0] for p in mask_problems}
        problems = sorted(mask_problems + [p for p in problems if p.split(":", 1)[0] not in sized], key=_by_position)
        text = str(SceneError.of(problems, prefix="scene."))
        raise ProtocolError(errors.BAD_FIELD, f"submit: {text}", field=f"scene.{problems[0].split(':', 1)[0]}")
    return loaded


def scene_message(scene: Scene) -> dict[str, Any]:
    """A loaded scene as the ``scene`` field of a submit request: files (photos, masks) as uint8 arrays
    (frames)."""

    def camera(cam: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"w2c": cam.w2c, "K": cam.K, "width": cam.width, "height": cam.height}
        if cam.distortion is not None:
            out["distortion"] = {"model": cam.distortion.model, "params": list(cam.distortion.params)}
        return out

    def capture(c: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"name": c.name, "image": np.fromfile(c.image, dtype=np.uint8)}
        if c.mask is not None:
            out["mask"] = np.fromfile(c.mask, dtype=np.uint8)
        if c.camera is not None:
            out["camera"] = camera(c.camera)
        return out

    msg: dict[str, Any] = {"captures": [capture(c) for c in scene.captures], "settings": scene.settings.to_json()}
    if scene.trajectory:
        msg["trajectory"] = [{"frame": t.frame, "camera": camera(t.camera)} for t in scene.trajectory]
    if scene.heldout:
        msg["heldout"] = [capture(c) for c in scene.heldout]
    return msg


# ----------------------------------------------------------------------------------------------
# Jobs


@dataclass
class JobRecord:
    """What the main thread knows of one job (rebuilt from the journal after a restart)."""

    job: str
    dir: Path
    created: float
    key: str | None = None
    owner: str | None = None  # the submitting client's CurveZMQ key, or "local" (see auth.py)
    state: str = "queued"
    stage: str = "queued"
    fraction: float = 0.0
    message: str = ""
    updated: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the highest seq given out, a cut journal line's included (a client may have seen that event before
    # the crash): the next event gets one more, never a seq a client would drop as already seen
    max_seq: int = 0
    journal_cut: bool = False  # the journal may end in a cut line: the next append starts a new line first

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def seq(self) -> int:
        """The latest event's seq (0 before the first)."""
        return self.events[-1]["seq"] if self.events else 0

    def summary(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "state": self.state,
            "stage": self.stage,
            "fraction": self.fraction,
            "message": self.message,
            "created": self.created,
            "updated": self.updated,
        }


def read_manifest(job_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> {name, size, sha256} from ``manifest.json``; entries whose file is gone are dropped.

    Raises ValueError, KeyError, TypeError or AttributeError for a manifest that is not one (damaged on disk, edited
    by hand: ``[]`` has no ``get``).
    """
    path = job_dir / MANIFEST_FILE
    if not path.is_file():
        return {}
    return present_artifacts(job_dir, json.loads(path.read_text()).get("artifacts", []))


def present_artifacts(job_dir: Path, entries: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> {name, size, sha256} of the artifact entries whose file is in the job's output folder at its size."""
    out = {}
    for e in entries:
        try:
            p = resolve_inside(job_dir / ARTIFACTS_DIR, e["name"])
        except ValueError as err:
            log.warning("job %s: artifact dropped: %s", job_dir.name, err)
            continue
        if p.stat().st_size != e["size"]:
            log.warning(
                "job %s: %s has %d bytes, its entry says %d; dropped",
                job_dir.name,
                e["name"],
                p.stat().st_size,
                e["size"],
            )
            continue
        out[e["name"]] = {"name": e["name"], "size": int(e["size"]), "sha256": e["sha256"]}
    return out


class Manifest:
    """The worker's view of a job's finished files; each change rewrites manifest.json atomically."""

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        self.out_dir = job_dir / ARTIFACTS_DIR
        self.entries = read_manifest(job_dir)

    def add(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """Hash and record the named files of the output folder; returns their new entries.

        Raises ValueError for a bad name, or when the job would list more than MAX_ARTIFACTS files
        (``status`` lists them all in one reply); nothing is recorded then.
        """
        changed: dict[str, dict[str, Any]] = {}
        for name in names:
            path = resolve_inside(self.out_dir, name)
            entry = {"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)}
            if self.entries.get(name) != entry:
                changed[name] = entry
        total = len(self.entries.keys() | changed.keys())
        if total > limits.MAX_ARTIFACTS:
            raise ValueError(
                f"a job may list at most {limits.MAX_ARTIFACTS} output files ({limits.MAX_FILES_PER_FRAME} per "
                f"trajectory frame and {limits.MAX_OTHER_ARTIFACTS} more); this one has {total}"
            )
        self.entries.update(changed)
        new = list(changed.values())
        if new:
            body = {"format": STORE_FORMAT, "artifacts": sorted(self.entries.values(), key=lambda e: e["name"])}
            write_atomic(self.job_dir / MANIFEST_FILE, json.dumps(body, indent=1).encode())
        return new

    def unlisted(self) -> list[str]:
        """Regular files under the output folder not yet in the manifest (symlinks skipped)."""
        names = []
        for path in sorted(self.out_dir.rglob("*")):
            if path.is_symlink() or not path.is_file() or path.name.startswith("."):
                continue
            name = path.relative_to(self.out_dir).as_posix()
            try:
                limits.check_artifact_name(name)
            except ValueError as err:
                log.warning("job %s: output file not listed: %s", self.job_dir.name, err)
                continue
            if name not in self.entries:
                names.append(name)
        return names


@dataclass(frozen=True)
class PreparedJob:
    """A job written whole under a ``TMP_PREFIX`` folder by ``JobStore.prepare``, not yet listed.

    Attributes:
        record: the job as it will be listed (``dir`` the folder it will have); no events applied yet.
        event: its first event (queued), already in the folder's journal.
        tmp: the folder it is written in.
    """

    record: JobRecord
    event: dict[str, Any]
    tmp: Path


class JobStore:
    """Job directories under ``root``. Used by the service's main thread only (the worker uses Manifest), but for
    ``prepare``, which the service's writer thread runs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, JobRecord] = {}
        self.keys: dict[tuple[str | None, str], str] = {}  # (owner, idempotency key) -> job
        self._doomed: queue.SimpleQueue[Path] = queue.SimpleQueue()  # moved-aside folders the deleter removes
        self._deleter: threading.Thread | None = None

    # -- creation ---------------------------------------------------------------------------------

    def create(self, msg: dict[str, Any], owner: str | None = None) -> JobRecord:
        """Build a job directory from a validated submit request; raises ProtocolError for a bad scene."""
        return self.commit(self.prepare(msg, owner))

    def prepare(self, msg: dict[str, Any], owner: str | None = None) -> PreparedJob:
        """A job's whole folder written under a ``TMP_PREFIX`` name, not yet listed: the slow part of ``create``
        (images written, raw pixels encoded, the scene loaded and its masks read). Touches no shared state, so
        the service runs it on its writer thread while the main thread answers other requests; ``commit`` lists
        it.

        Raises:
            ProtocolError: ``bad_field`` naming every problem of the scene; nothing is left behind.
        """
        job = new_job_id()
        tmp = self.root / f"{TMP_PREFIX}{job}"
        try:
            tmp.mkdir()
            write_scene_message(msg["scene"], tmp / SCENE_DIR)
            (tmp / ARTIFACTS_DIR).mkdir()
            created = time.time()
            meta = {"format": STORE_FORMAT, "job": job, "created": created, "key": msg.get("key"), "owner": owner}
            write_atomic(tmp / META_FILE, json.dumps(meta).encode())
            record = JobRecord(
                job=job, dir=self.root / job, created=created, key=msg.get("key"), owner=owner, updated=created
            )
            event = self._event(record, "queued", "queued", 0.0, "waiting for the worker", [])
            with open(tmp / JOURNAL_FILE, "a") as f:
                f.write(json.dumps(event) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return PreparedJob(record, event, tmp)

    def commit(self, prepared: PreparedJob) -> JobRecord:
        """List a prepared job: its folder moved to its job id in one step (a job is listed whole or not at all;
        ``load`` sweeps a folder a crash left under its ``TMP_PREFIX`` name). Main thread only."""
        record, event = prepared.record, prepared.event
        try:
            os.replace(prepared.tmp, record.dir)
        except BaseException:
            shutil.rmtree(prepared.tmp, ignore_errors=True)
            raise
        self._apply(record, event)
        self.jobs[record.job] = record
        if record.key:
            self.keys[(record.owner, record.key)] = record.job
        return record

    # -- events -------------------------------------------------------------------------------------

    @staticmethod
    def _event(
        record: JobRecord, state: str, stage: str, fraction: float, message: str, artifacts: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The job's next event. Every event is made here, so its texts are clipped here to the protocol's
        limits (UTF-8 bytes): the push to watchers, ``status`` and replays all carry them."""
        return {
            "seq": record.max_seq + 1,
            "time": time.time(),
            "state": state,
            "stage": limits.clip_utf8(str(stage), limits.MAX_NAME_BYTES),
            "fraction": fraction,
            "message": limits.clip_utf8(str(message), limits.MAX_STR_BYTES),
            "artifacts": artifacts,
        }

    @staticmethod
    def _apply(record: JobRecord, event: dict[str, Any]) -> None:
        record.events.append(event)
        record.max_seq = max(record.max_seq, event["seq"])
        record.state, record.stage = event["state"], event["stage"]
        record.fraction, record.message, record.updated = event["fraction"], event["message"], event["time"]
        for a in event["artifacts"]:
            record.artifacts[a["name"]] = a

    def append(
        self,
        record: JobRecord,
        state: str,
        stage: str,
        fraction: float,
        message: str,
        artifacts: list[dict[str, Any]] = (),
    ) -> dict[str, Any]:  # type: ignore[assignment]
        """Record a new event in memory and in the journal (fsync on state changes); return it."""
        event = self._event(record, state, stage, fraction, message, list(artifacts))
        is_transition = state != record.state
        try:
            with open(record.dir / JOURNAL_FILE, "a") as f:
                f.write(("\n" if record.journal_cut else "") + json.dumps(event) + "\n")
                if is_transition:
                    f.flush()
                    os.fsync(f.fileno())
            record.journal_cut = False
        except OSError as err:  # a full disk must not stop the service: the event lives in memory
            log.error("job %s: journal not written, event %d kept in memory only: %s", record.job, event["seq"], err)
            record.journal_cut = True  # part of the line may be written: the next one must not join it
        self._apply(record, event)
        return event

    # -- restart --------------------------------------------------------------------------------------

    def load(self) -> list[JobRecord]:
        """Read every job directory; running jobs become interrupted. Returns the jobs still queued, in order."""
        for tmp in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)  # a submit cut short: never acknowledged
        for job_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and limits.is_job_id(p.name)):
            try:
                record = self._load_one(job_dir)
            except (OSError, ValueError, KeyError) as err:
                log.warning("job %s: cannot be read, skipped: %s", job_dir.name, err)
                continue
            self.jobs[record.job] = record
            if record.key:
                self.keys[(record.owner, record.key)] = record.job
        for record in self.jobs.values():
            if record.state == "running":
                self.append(record, "interrupted", record.stage, record.fraction, INTERRUPTED_REASON)
        queued = [r for r in self.jobs.values() if r.state == "queued"]
        return sorted(queued, key=lambda r: r.created)

    def _load_one(self, job_dir: Path) -> JobRecord:
        meta = json.loads((job_dir / META_FILE).read_text())
        record = JobRecord(
            job=job_dir.name, dir=job_dir, created=float(meta["created"]), key=meta.get("key"), owner=meta.get("owner")
        )
        data = (job_dir / JOURNAL_FILE).read_bytes()
        record.journal_cut = bool(data) and not data.endswith(b"\n")
        for n, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:  # JSONDecodeError, UnicodeDecodeError
                cut = CUT_LINE_SEQ.match(line)
                if cut:  # its event may have reached a client: its seq stays used
                    record.max_seq = max(record.max_seq, int(cut.group(1)))
                log.warning("job %s: journal line %d unreadable (cut by a crash?); ignored", job_dir.name, n + 1)
                continue
            self._apply(record, event)
        if not record.events:
            raise ValueError("empty journal")
        try:
            record.artifacts = read_manifest(job_dir)  # the manifest, not the journal, is the truth about files
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # the job stays listed, its files with it
            log.warning(
                "job %s: %s unreadable (%s: %s); its files as its events listed them",
                job_dir.name,
                MANIFEST_FILE,
                type(err).__name__,
                err,
            )
            record.artifacts = present_artifacts(job_dir, record.artifacts.values())
        return record

    def expired(self, max_age_s: float, now: float | None = None) -> list[JobRecord]:
        """The ended jobs (done, failed, cancelled, interrupted) whose last event is older than ``max_age_s``:
        what ``serve --keep-days`` deletes. Queued and running jobs never are."""
        cutoff = (time.time() if now is None else now) - max_age_s
        return [r for r in self.jobs.values() if r.is_terminal and r.updated < cutoff]

    def delete(self, record: JobRecord) -> None:
        """Delete an ended job: its folder is first renamed to a ``TMP_PREFIX`` name in one step (a job is listed
        whole or not at all; ``load`` sweeps what a crash leaves), then deleted by the store's one deleter
        thread, so a large folder does not hold up requests (and a long ``--keep-days`` pass starts no crowd).

        Raises:
            ValueError: the job has not ended (queued or running).
            OSError: the folder could not be moved; the job stays listed.
        """
        if not record.is_terminal:
            raise ValueError(f"JobStore.delete: job {record.job} is {record.state}; only an ended job is deleted")
        doomed = self.root / f"{TMP_PREFIX}{record.job}"
        os.replace(record.dir, doomed)
        del self.jobs[record.job]
        if record.key and self.keys.get((record.owner, record.key)) == record.job:
            del self.keys[(record.owner, record.key)]
        self._doomed.put(doomed)
        if self._deleter is None:
            self._deleter = threading.Thread(target=self._delete_forever, name="reconloop-delete", daemon=True)
            self._deleter.start()

    def _delete_forever(self) -> None:
        def failed(function: Any, path: str, exc_info: Any) -> None:
            log.warning("could not delete %s (%s); the next start sweeps it", path, exc_info[1])

        while True:
            shutil.rmtree(self._doomed.get(), onerror=failed)

    def listed(self, requester: str) -> list[JobRecord]:
        """The jobs ``requester`` may see (``auth.may_access``), oldest first, at most MAX_JOBS_LISTED: the newest.

        The owner comes first and the cap after, so another client's jobs never push one's own off the list.
        """
        jobs = sorted((r for r in self.jobs.values() if may_access(r.owner, requester)), key=lambda r: r.created)
        return jobs[-limits.MAX_JOBS_LISTED :]

    def artifact_path(self, record: JobRecord, name: str) -> Path:
        """The file of a listed artifact; ProtocolError not_found otherwise."""
        if name not in record.artifacts:
            known = ", ".join(sorted(record.artifacts)[:20]) or "none yet"
            raise ProtocolError(
                errors.NOT_FOUND, f"fetch: job {record.job} has no artifact {name!r}; it has: {known}", field="name"
            )
        try:
            return resolve_inside(record.dir / ARTIFACTS_DIR, name)
        except ValueError as err:
            raise ProtocolError(errors.NOT_FOUND, f"fetch: {err}", field="name") from None
