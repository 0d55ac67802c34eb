"""The compute device, named in one place: ``auto`` picks CUDA, then Apple's ``mps``, then the CPU.

Entry points (CLI, service) resolve the user's ``--device`` once with :func:`pick_device` and pass
the result down; stages take the device from their inputs. What differs per device is chosen here
by name, not by ``if`` branches through the loop: the Gaussian rasterizer
(``backend.stages.fit.default_rasterizer``: ``gsplat`` needs CUDA, the torch one runs on ``mps`` and
the CPU) and the default time budget (:data:`DEFAULT_BUDGET_MIN`).
"""

from __future__ import annotations

DEVICE_KINDS = ("cuda", "mps", "cpu")  # the order ``auto`` tries them in
DEVICE_HELP = f"compute device: auto ({', else '.join(DEVICE_KINDS)}), {', '.join(DEVICE_KINDS)} or cuda:N"
# Time budget a job gets when it sets none, minutes, per device kind (backend.budget); None: no
# budget, the settings as given (on CUDA the budget only applies when the user sets one).
DEFAULT_BUDGET_MIN = {"cuda": None, "mps": 5.0, "cpu": 4.0}


def device_kind(device: object) -> str:
    """``cuda``, ``mps`` or ``cpu`` of a device or its name (``cuda:1`` -> ``cuda``), without torch."""
    return str(device).split(":", 1)[0]


def default_budget_min(device: object) -> float | None:
    """The budget a job on ``device`` gets when it sets none: minutes, or None (no budget)."""
    return DEFAULT_BUDGET_MIN.get(device_kind(device))


def is_available(kind: str) -> bool:
    """Whether torch can run on this kind of device here."""
    if kind == "cpu":
        return True
    import torch  # only here: the CPU and --help need no torch

    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return False


def pick_device(name: str = "auto") -> str:
    """The device for ``--device NAME``: ``auto`` -> ``cuda:0``, else ``mps``, else ``cpu``; any other
    name is checked and returned as torch spells it (``cuda:1``, ``mps``, ``cpu``).

    Raises:
        ValueError: an unknown device name, or one torch cannot use on this machine.
    """
    if name == "auto":
        for kind in DEVICE_KINDS:
            if is_available(kind):
                return "cuda:0" if kind == "cuda" else kind
    if name == "cpu":
        return name
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, {', '.join(DEVICE_KINDS)} or cuda:N; got {name!r}") from None
    if device.type not in DEVICE_KINDS:
        raise ValueError(f"--device must be auto, {', '.join(DEVICE_KINDS)} or cuda:N; got {name!r}")
    if not is_available(device.type):
        raise ValueError(f"--device {name}: torch sees no {device.type} device on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 up")
    return str(device)


OOM_CLASS_NAMES = frozenset({"OutOfMemoryError", "MemoryError", "_ArrayMemoryError"})


CPU_ALLOCATOR_FAILURE = "can't allocate memory"  # torch's DefaultCPUAllocator raises a plain RuntimeError


def is_out_of_memory(err: BaseException) -> bool:
    """MemoryError (host), torch's OutOfMemoryError (GPU, either spelling), by class, without importing torch, or
    the RuntimeError of torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, RuntimeError) and CPU_ALLOCATOR_FAILURE in str(err):
        return True
    return any(cls.__name__ in OOM_CLASS_NAMES for cls in type(err).__mro__)
