"""Run the service's jobs on a pool of Ray actors: one per GPU, or CPU workers on a machine without GPUs.

The ZeroMQ front end (``server.py``), the protocol and the job store stay as they are; only where a job
runs changes. Each actor runs the same ``Worker`` loop as the single-worker service, in its own process
(on any node of the cluster), connected back to the front end by a ZeroMQ PAIR socket over TCP: the
front end binds one PAIR per actor on its private address, the actor connects to it. The messages are
the worker protocol of ``worker.py`` (run, cancel, stop; started, progress, finished), so progress and
cancel keep their order and latency, and results go to the job folder on the shared data dir, hashed
into the manifest by the worker exactly as on one machine.

An actor keeps its process and its copy of the runner between jobs, so the models a runner's
``GeneratorCache`` loaded stay on its GPU (a 14B model is loaded once per GPU, not once per job). Ray reports an actor whose process or node died through the actor's ``serve``
call; the front end then fails the job that actor was running, naming the worker, and starts a new
actor in its place. A job is never handed to a second actor.

Ray has no say over who may submit jobs: the front end's CurveZMQ is the only door from outside, and
the Ray cluster (and these PAIR sockets) must stay on a private network (``docs/cluster.md``).

Example (a local Ray with two CPU workers)::

    svc = Service(ServiceConfig(bind="tcp://127.0.0.1:*", data_dir=tmp, ray=RayConfig(workers=2)))
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from ..signals import keeps_sigterm
from .worker import Runner, Slot, Worker

log = logging.getLogger(__name__)

HEAD_CONNECT_TIMEOUT_S = 5.0  # a --ray HOST:PORT that does not answer in this time has no head there
START_TIMEOUT_S = 120.0  # how long the front end waits for the first actors (imports, scheduling)
STOP_WAIT_S = 10.0
SNDHWM = 1000
REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_CAUSE_CHARS = 300


@dataclass(frozen=True)
class RayConfig:
    """Where and how many Ray workers run the jobs.

    Attributes:
        address: ``None`` or ``"local"``: start a Ray instance on this machine (stopped with the service);
            ``"auto"``: join the cluster this machine is part of (``ray start``); ``"HOST:PORT"``: that cluster's head.
            When Ray is already initialised in this process (tests), that instance is used.
        workers: number of actors; ``None``: one per GPU in the cluster, or one per CPU when it has no GPUs.
        gpus_per_worker: GPUs each actor reserves; ``None``: 1 when the cluster has GPUs, else 0.
        host: the front end's address that actors connect back to; ``None``: 127.0.0.1 for a local Ray,
            else this node's IP as Ray sees it. Must be reachable from every node (a private network).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    host: str | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise ValueError(f"RayConfig.workers must be a positive integer or None; got {self.workers!r}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"RayConfig.gpus_per_worker must be >= 0 or None; got {self.gpus_per_worker!r}")
        if self.address not in (None, "auto", "local"):
            try:
                head_address(self.address)
            except ValueError as err:
                raise ValueError(f"RayConfig.address {err}") from None


class PoolWorker:
    """The Ray actor (wrapped by ``ray.remote`` in ``RayPool``): one process running one job at a time."""

    def __init__(self, name: str) -> None:
        self.name = name

    def info(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def serve(self, endpoint: str, runner: Runner, device: str, threads: int = 0) -> None:
        """Run jobs sent on ``endpoint`` until the front end sends stop (the single-worker loop), with
        ``threads`` CPU threads for torch and OpenMP (0: as Ray started the process)."""
        from .server import resolve_device

        if threads:  # Ray starts an actor that reserves no CPU (a GPU worker) with OMP_NUM_THREADS=1
            os.environ["OMP_NUM_THREADS"] = str(threads)
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(threads)

        context = zmq.Context()
        try:
            Worker(context, endpoint, runner, resolve_device(device)).run()
        finally:
            context.term()


def worker_cpus(cluster_cpus: float, workers: int, gpus_per_worker: float) -> tuple[int, int]:
    """CPUs each actor reserves from Ray and the threads it runs with.

    A CPU worker reserves one CPU (the unit Ray places it by; other pools may share the cluster), a GPU
    worker none (its GPUs place it). Either runs with the cluster's CPUs shared out among the workers
    (at least 1 thread): Ray would otherwise start it with OMP_NUM_THREADS set to its reservation, one
    thread for a GPU worker's CPU stages and for a lone CPU worker on a many-core machine.

    Returns:
        (num_cpus for the actor's options, threads)
    """
    threads = max(1, int(cluster_cpus // max(workers, 1)))
    return (0 if gpus_per_worker else 1), threads


def checkout_runtime_env() -> dict[str, Any] | None:
    """Ray's ``runtime_env`` that lets workers import this package from a source checkout (None when installed).

    Given to ``ray.init`` (the job's environment, so actors start in Ray's pre-started worker processes);
    the path must hold the same checkout on every node, else install the package on each node.
    """
    if not (REPO_ROOT / "pyproject.toml").is_file():
        return None
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def no_cluster_message(address: str | None, err: BaseException) -> str:
    """What to do when ``ray.init(address=...)`` found no cluster (Ray's ConnectionError ``err``), in the
    service's options: ``auto`` needs a ``ray start`` on this node; a HOST:PORT keeps Ray's reason."""
    if address == "auto":
        return (
            "--ray auto: no Ray cluster on this node: start one with `ray start --head`, "
            "or use --ray local / --ray HOST:PORT"
        )
    return (
        f"--ray {address}: no Ray cluster there ({_cause(err)}): start its head with `ray start --head`, "
        "or use --ray local"
    )


def head_address(address: str) -> tuple[str, int]:
    """The host and port of a Ray head's ``[ray://]HOST:PORT`` (an IPv6 host in brackets: ``[::1]:6379``).

    Raises:
        ValueError: not of that form (``serve --ray``'s argparse type says so before anything starts).
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be auto, local or HOST:PORT of a Ray head; got {address!r}")
    return host.strip("[]"), int(port)


def check_head_answers(address: str | None) -> None:
    """Raise ConnectionError (:func:`no_cluster_message`) unless a ``--ray HOST:PORT`` (or ``ray://HOST:PORT``)
    accepts a TCP connection within HEAD_CONNECT_TIMEOUT_S: ``ray.init`` would retry such an address for
    minutes, printing only Ray's own warnings. ``auto`` and ``local`` are Ray's to check."""
    if address in (None, "auto", "local"):
        return
    try:
        socket.create_connection(head_address(address), timeout=HEAD_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(no_cluster_message(address, err)) from None


def _cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    detail = next((line.strip() for line in text if "exit detail" in line.lower()), "")
    out = f"{type(err).__name__}: {first}" + (f" {detail}" if detail else "")
    return out if len(out) <= MAX_CAUSE_CHARS else out[: MAX_CAUSE_CHARS - 3] + "..."


class RayPool:
    """Actors on Ray, each behind a PAIR socket of the front end's context. Used by the front end's thread only."""

    def __init__(self, context: zmq.Context, config: RayConfig, runner: Runner, device: str) -> None:
        self.context = context
        self.config = config
        self.runner = runner
        self.device = device
        self.started_ray = False
        self.slots: list[Slot] = []
        self._count = 0
        self._host = "127.0.0.1"
        self._gpus = 0.0
        self._num_cpus, self._threads = 1, 0  # set by start() from the cluster's CPUs and the worker count

    # -- start and stop -----------------------------------------------------------------------------

    def start(self) -> list[Slot]:
        """Connect to (or start) Ray, start the actors, wait until they are connected; returns the slots."""
        import ray

        address = self.config.address
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": logging.WARNING,
                "log_to_driver": False,
                "configure_logging": True,
            }
            if address in (None, "local"):  # a Ray of its own, even where another runs on this machine
                kwargs["num_cpus"] = max(self.config.workers or 0, os.cpu_count() or 1)
                kwargs["address"] = "local"
            else:
                check_head_answers(address)
                kwargs["address"] = address
            try:
                with keeps_sigterm():  # Ray's own handler exits at once, its core worker's aborts (134)
                    ray.init(**kwargs, runtime_env=checkout_runtime_env())
            except ConnectionError as err:  # Ray's text points at a `--address` flag reconloop does not have
                if address in (None, "local"):  # Ray started here and failed: its own reason stands
                    raise
                raise ConnectionError(no_cluster_message(address, err)) from None
            self.started_ray = True
        local = address in (None, "local")
        self._host = self.config.host or ("127.0.0.1" if local else ray.util.get_node_ip_address())
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0.0))
        wants_cpu = self.device == "cpu"
        self._gpus = self.config.gpus_per_worker
        if self._gpus is None:
            self._gpus = 1.0 if gpus >= 1 and not wants_cpu else 0.0
        workers = self.config.workers
        if workers is None:
            workers = int(gpus // self._gpus) if self._gpus else int(resources.get("CPU", 1))
        workers = max(1, workers)
        self._num_cpus, self._threads = worker_cpus(float(resources.get("CPU", 1)), workers, self._gpus)
        self.slots = [self._new_slot() for _ in range(workers)]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(s.ready for s in self.slots):
            for slot, reason in self.dead():
                raise RuntimeError(f"Ray worker {slot.name} could not start: {reason}")
            for slot in self.slots:
                self.check_ready(slot)
            if time.monotonic() > deadline:
                waiting = [s.name for s in self.slots if not s.ready]
                raise TimeoutError(
                    f"Ray workers {', '.join(waiting)} did not start within {START_TIMEOUT_S:.0f} s "
                    f"(cluster resources: {resources}; each worker asks for {self._gpus} GPU)"
                )
            time.sleep(0.02)
        log.info("Ray pool: %s", "; ".join(s.describe for s in self.slots))
        return self.slots

    def _new_slot(self) -> Slot:
        import ray

        name = f"ray-{self._count}"
        self._count += 1
        pair = self.context.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.setsockopt(zmq.SNDHWM, SNDHWM)
        port = pair.bind_to_random_port(f"tcp://{self._host}")
        endpoint = f"tcp://{self._host}:{port}"
        options: dict[str, Any] = {"num_cpus": self._num_cpus, "num_gpus": self._gpus, "max_restarts": 0}
        actor = ray.remote(PoolWorker).options(**options).remote(name)
        info_ref = actor.info.remote()
        serve_ref = actor.serve.remote(endpoint, self.runner, self.device, self._threads)
        return Slot(
            name=name, pair=pair, describe=f"worker {name}", serve_ref=serve_ref, actor=actor, info_ref=info_ref
        )

    def device_kind(self) -> str:
        """What each worker computes on, for ``hello``'s device: ``1 GPU each`` or ``cpu``."""
        return f"{self._gpus:g} GPU each" if self._gpus else "cpu"

    def check_ready(self, slot: Slot) -> bool:
        """Whether the slot's actor has connected (its PAIR can send); records its pid, node and GPUs then."""
        if slot.ready:
            return True
        if not slot.pair.poll(0, zmq.POLLOUT):
            return False
        import ray

        done, _ = ray.wait([slot.info_ref], timeout=0)
        if done:
            slot.info = ray.get(slot.info_ref)
            gpus = f", GPU {','.join(slot.info['gpus'])}" if slot.info["gpus"] else ""
            slot.describe = f"worker {slot.name} (pid {slot.info['pid']} on {slot.info['node']}{gpus})"
            slot.ready = True
        return slot.ready

    def dead(self) -> list[tuple[Slot, str]]:
        """Slots whose actor has ended (its process or node died), with Ray's reason. Does not block."""
        import ray

        refs = {s.serve_ref: s for s in self.slots if s.serve_ref is not None}
        if not refs:
            return []
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        out = []
        for ref in done:
            slot = refs[ref]
            slot.serve_ref = None
            try:
                ray.get(ref)
                reason = "its actor returned without being asked to stop"
            except Exception as err:  # ActorDiedError, NodeDiedError, a crash in the worker loop
                reason = _cause(err)
            out.append((slot, reason))
        return out

    def replace(self, slot: Slot) -> Slot:
        """A new actor in place of a dead one (same position in ``slots``); it becomes ready later."""
        slot.pair.close(linger=0)
        new = self._new_slot()
        self.slots[self.slots.index(slot)] = new
        return new

    def join(self, wait_s: float = STOP_WAIT_S) -> None:
        """After the front end has sent stop to every slot: wait up to ``wait_s`` for the actors to return."""
        import ray

        refs = [s.serve_ref for s in self.slots if s.serve_ref is not None]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=wait_s)

    def close(self) -> None:
        """Kill the actors, close their sockets, stop Ray if this pool started it."""
        import ray

        for slot in self.slots:
            try:
                ray.kill(slot.actor)
            except Exception as err:  # already gone
                log.debug("ray.kill(%s): %s", slot.name, err)
            slot.pair.close(linger=0)
        if self.started_ray:
            ray.shutdown()
