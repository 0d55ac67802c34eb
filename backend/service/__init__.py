"""The ReconLoop service: a ZeroMQ ROUTER answering protocol requests, a job store, one worker thread.

Start it with ``reconloop serve`` or ``Service(ServiceConfig(...)).serve_forever()``.
"""

from .server import DEFAULT_BIND, Service, ServiceConfig, default_data_dir
from .store import JobStore, scene_message, write_scene_message
from .worker import Runner, default_runner

__all__ = [
    "DEFAULT_BIND",
    "JobStore",
    "Runner",
    "Service",
    "ServiceConfig",
    "default_data_dir",
    "default_runner",
    "scene_message",
    "write_scene_message",
]
