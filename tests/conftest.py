"""Shared fixtures: the real scenes in ../shared/data (never copied into the project)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECONLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))


def missing(msg: str) -> NoReturn:
    """Something a test needs is missing: a failure under CI=true (CI has all of it), else a skip (also at a
    module's top)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg, allow_module_level=True)


def require_shared_data(name: str = "") -> Path:
    """Path of ``../shared/data/name``. Missing: :func:`missing`."""
    path = SHARED_DATA / name if name else SHARED_DATA
    if not path.exists():
        missing(f"real test data missing: {path} (../shared/data beside the clone)")
    return path


def require_module(name: str, why: str = ""):
    """The module ``name``, imported. Missing: :func:`missing` (``make setup`` installs every module a test asks
    for)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing(f"{name} is not installed ({err}){': ' + why if why else ''}; `make setup` installs it")


@pytest.fixture
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture
def temple_dir() -> Path:
    return require_shared_data("middlebury_temple")


@pytest.fixture
def dino_dir() -> Path:
    return require_shared_data("middlebury_dino")


@pytest.fixture
def fern_dir() -> Path:
    return require_shared_data("llff_fern")


@pytest.fixture
def door_dir() -> Path:
    return require_shared_data("lund_door")


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests."""
    import torch  # not at the top: most tests never load torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two pytest workers share two cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loopback_router():
    """A ZeroMQ ROUTER bound to a free loopback port: a test that plays the service reads the requests
    and sends the replies, or none (a hung service, a wrong CurveZMQ key)."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock
    sock.close()


@pytest.fixture
def silent_endpoint(loopback_router) -> str:
    """The address of a socket that accepts connections and never answers."""
    import zmq

    return loopback_router.getsockopt_string(zmq.LAST_ENDPOINT)
