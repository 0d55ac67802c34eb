"""Generators: fill what the memory renders miss (DESIGN.md section 1 step 5).

A generator is any object with ``generate(cond, *, num_steps, seed, progress=None) -> Frames``
(``progress``: :data:`GenerateProgress`); the loop checks the frames' shapes and ranges
(``Frames.check``). Optional: ``prepare(captures, ...)`` learns from the captures before the first
segment (``refine``), ``segments_note`` says what it did. Implementations register under a lowercase
name with ``@GENERATORS.register("name")``; each is one self-contained module in this package, named
in the ``GENERATORS`` map below, which imports it when its name is asked for (a module not named there
is never imported). The job's ``generator`` setting takes any registered name; what a generator reads
from the job's settings comes through ``GeneratorConfig`` (a new setting it needs: a field there and a
line in ``GeneratorConfig.from_settings``). As diffusers builds a pipeline from its loaded components, a generator is
built by ``make_generator(config, components)``: ``config`` (``GeneratorConfig``) holds what a job
chooses, ``components`` the loaded models (None for a generator without learned parts). A learned
generator's class has ``load_components(weights, config, device)``, and ``GeneratorCache`` (held by
whoever serves) keeps the loaded models between jobs, located by ``GeneratorWeights`` (the service's
configuration: ``reconloop serve --weights NAME=PATH --lora NAME=PATH``; environment variables only as
a fallback).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..devices import is_out_of_memory
from ..progress import WorkProgress
from ..registry import Registry

if TYPE_CHECKING:  # torch loads with the first generator, not with the service's options
    from ..types import ConditionVideo, Frames

logger = logging.getLogger(__name__)


# ``progress(fraction, message)`` of one segment's generation, fraction in [0, 1]; it may raise
# (``backend.progress.Cancelled``) to stop: a learned generator calls it after each denoising step
GenerateProgress = WorkProgress


@runtime_checkable
class Generator(Protocol):
    def generate(
        self, cond: ConditionVideo, *, num_steps: int, seed: int, progress: GenerateProgress | None = None
    ) -> Frames: ...


# Each implementation registers itself when its module is imported; heavy ones (diffusers) load only when named.
GENERATORS: Registry[Any] = Registry(
    "generator",
    {
        "reproject": "backend.generators.reproject",
        "anyrecon": "backend.generators.anyrecon",
        "refine": "backend.generators.refine",
    },
)

MEMORY_MODES = ("none", "fp8", "group_offload", "model_offload")  # where a learned generator's weights live
# "auto": the attention the weights were trained with (GeneratorWeights.trained_attention)
ATTENTION_SETTINGS = ("auto", "full", "block", "window_ours", "stock")
TRAINED_ATTENTION = ("full", "block")  # what a checkpoint can have been trained with

# Fallback locations of a learned generator's weights when the service names none (docs/anyrecon.md).
WEIGHTS_ENV = "RECONLOOP_{NAME}_WEIGHTS"
LORA_ENV = "RECONLOOP_{NAME}_LORA"
ALLOW_DOWNLOAD_ENV = "RECONLOOP_ALLOW_DOWNLOAD"


class GeneratorWeightsError(ValueError):
    """A learned generator's weights could not be loaded (plain-language message naming where to give them).

    A ValueError, so the CLI reports it in one line as bad input, and a service job fails with it."""


@dataclass(frozen=True)
class GeneratorConfig:
    """What a job chooses about its generator (the generator's user-facing options).

    Attributes:
        name: registry name (``GENERATORS.names()``).
        memory: where a learned generator's weights live: ``none`` (all on the GPU), ``fp8``
            (transformer stored in float8), ``group_offload`` (transformer blocks streamed from CPU;
            for 24 GB cards) or ``model_offload`` (each model on the GPU only while it runs).
        attention: ``auto`` (what the weights were trained with), ``full``, ``block`` (only for
            weights trained with it), ``window_ours`` (experimental) or ``stock`` (diffusers' own).
        num_steps: denoising steps (AnyRecon: 4).
        window_frames: +-frames of ``window_ours``.
        gpus: GPUs of one box a learned generator spans (sequence parallel); 0: all the worker has.
        refine_seconds: training time of ``refine``'s per-scene network.
    """

    name: str = "reproject"
    memory: str = "none"
    attention: str = "auto"
    num_steps: int = 4
    window_frames: int = 8
    gpus: int = 1
    refine_seconds: int = 10

    def __post_init__(self) -> None:
        if self.name not in GENERATORS.names():
            raise ValueError(f"GeneratorConfig.name must be one of {GENERATORS.names()}; got {self.name!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"GeneratorConfig.memory must be one of {MEMORY_MODES}; got {self.memory!r}")
        if self.attention not in ATTENTION_SETTINGS:
            raise ValueError(f"GeneratorConfig.attention must be one of {ATTENTION_SETTINGS}; got {self.attention!r}")
        if not 1 <= self.num_steps <= 1000:
            raise ValueError(f"GeneratorConfig.num_steps must be in [1, 1000]; got {self.num_steps}")
        if not 0 <= self.window_frames <= 512:
            raise ValueError(f"GeneratorConfig.window_frames must be in [0, 512]; got {self.window_frames}")
        if not 0 <= self.gpus <= 64:
            raise ValueError(f"GeneratorConfig.gpus must be in [0, 64]; got {self.gpus}")
        if not 1 <= self.refine_seconds <= 3600:
            raise ValueError(f"GeneratorConfig.refine_seconds must be in [1, 3600]; got {self.refine_seconds}")

    @classmethod
    def from_settings(cls, settings: Any) -> GeneratorConfig:
        """From a job's settings (``generator``, ``generator_memory``, ``generator_attention``, ``num_steps``,
        ``gpus``, ``refine_seconds``)."""
        return cls(
            name=settings.generator,
            memory=settings.generator_memory,
            attention=settings.generator_attention,
            num_steps=settings.num_steps,
            gpus=settings.gpus,
            refine_seconds=settings.refine_seconds,
        )


@dataclass(frozen=True)
class GeneratorWeights:
    """Where a learned generator's weights are: the service's configuration, not a job's.

    Attributes:
        path: a local folder or hub id of the base model; None: the class's default hub id. A leading
            ``~`` is expanded (zsh and ``sh`` leave ``--weights NAME=~/...`` and the environment as typed).
        lora: a LoRA / fine-tune checkpoint merged on top (AnyRecon: ``full_attention.ckpt``), or None;
            ``~`` expanded as in ``path``.
        trained_attention: the attention the checkpoint was trained with, ``full`` or ``block``;
            checked at load against what a job asks for.
        allow_download: may reach the hub (else only local folders and an existing hub cache).
    """

    path: str | None = None
    lora: str | None = None
    trained_attention: str = "full"
    allow_download: bool = False

    def __post_init__(self) -> None:
        for name in ("path", "lora"):  # frozen: set through object.__setattr__
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                object.__setattr__(self, name, os.path.expanduser(value))
        if self.trained_attention not in TRAINED_ATTENTION:
            raise ValueError(
                f"GeneratorWeights.trained_attention must be one of {TRAINED_ATTENTION}; got {self.trained_attention!r}"
            )

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] = os.environ) -> GeneratorWeights:
        """The fallback: ``RECONLOOP_<NAME>_WEIGHTS``, ``RECONLOOP_<NAME>_LORA``, ``RECONLOOP_ALLOW_DOWNLOAD=1``."""
        return cls(
            path=environ.get(WEIGHTS_ENV.format(NAME=name.upper())) or None,
            lora=environ.get(LORA_ENV.format(NAME=name.upper())) or None,
            allow_download=environ.get(ALLOW_DOWNLOAD_ENV) == "1",
        )


def weights_advice(name: str, weights: GeneratorWeights, err: BaseException) -> str:
    """The message for generator ``name`` whose ``weights`` failed to load with ``err``, on one line: where
    to give the weights (``run``: the variable; ``serve``: ``--weights``), then the loader's reason, last
    because a service job's message keeps only the first MAX_DETAIL_CHARS of a failure."""
    where = f" from {weights.path}" if weights.path else ""
    detail = " ".join(str(err).split()) or type(err).__name__
    return (
        f"generator {name!r}: cannot load its weights{where}; point {WEIGHTS_ENV.format(NAME=name.upper())} at "
        f"the weights folder (reconloop run), or give it to the service with reconloop serve --weights "
        f"{name}=FOLDER (docs/anyrecon.md). The loader said: {detail}"
    )


def make_generator(config: GeneratorConfig, components: Any = None, device: Any = None) -> Generator:
    """Build the generator ``config.name`` from its loaded ``components`` (None where it has none).

    A learned generator checks here that ``config`` suits its weights (e.g. ``block`` attention only
    for weights trained with it) and raises ``ValueError`` naming the field otherwise.
    """
    cls = GENERATORS.get(config.name)
    if not hasattr(cls, "load_components"):  # weight-free: built from the config alone
        return cls.from_config(config) if hasattr(cls, "from_config") else cls()
    if components is None:
        raise ValueError(f"generator {config.name!r} needs its loaded components (GeneratorCache.get loads them)")
    return cls.from_config(config, components, device)


def build_generator(name: str, weights: GeneratorWeights, config: GeneratorConfig, device: Any) -> Generator:
    """Load a learned generator's models and build it: what every rank of a sequence-parallel group runs."""
    cls = GENERATORS.get(name)
    return cls.from_config(config, cls.load_components(weights, config, device), device)


class GeneratorCache:
    """The loaded models of learned generators, held by whoever serves (a service worker, the CLI).

    One learned model is kept at a time, keyed by what changes its weights in memory: the generator's
    name, its ``GeneratorWeights``, the memory mode, the device and the number of GPUs. A job's other
    options (attention, steps) only change how the same models run. A generator spanning several GPUs
    (``config.gpus``) is a sequence-parallel group of processes, one per GPU, kept for later jobs with
    the same config.

    Args:
        weights: per generator name, where its weights are; a name missing here falls back to
            ``GeneratorWeights.from_env``.

    Example:
        >>> cache = GeneratorCache({"anyrecon": GeneratorWeights("/models/wan-i2v", "/models/full_attention.ckpt")})
        >>> gen = cache.get(GeneratorConfig("anyrecon", memory="group_offload"), "cuda")
    """

    def __init__(self, weights: Mapping[str, GeneratorWeights] | None = None) -> None:
        self.weights = dict(weights or {})
        self._key: tuple | None = None
        self._components: Any = None
        self._group: Any = None  # a SequenceParallelGroup when the loaded generator spans several GPUs

    def weights_for(self, name: str) -> GeneratorWeights:
        return self.weights.get(name) or GeneratorWeights.from_env(name)

    def __enter__(self) -> GeneratorCache:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Let go of what was loaded (a multi-GPU group closed); while an error leaves the block, an error in
        letting go is logged, not raised in its place."""
        if exc_type is None:
            self.clear()
            return
        try:
            self.clear()
        except Exception:  # noqa: BLE001
            logger.exception("letting go of the generator after an error")

    @property
    def loaded(self) -> tuple | None:
        """The key of the models in memory, or None."""
        return self._key

    def get(self, config: GeneratorConfig, device: Any) -> Generator:
        """A generator for ``config`` on ``device``, loading its models unless they are in memory.

        Raises:
            GeneratorWeightsError: the models could not be loaded (a missing folder, a bad checkpoint,
                weights that do not suit ``config``); the message says where to give the weights.
        """
        cls = GENERATORS.get(config.name)
        if not hasattr(cls, "load_components"):
            return make_generator(config)
        from .sequence_parallel import resolve_gpus

        weights = self.weights_for(config.name)
        world = resolve_gpus(config.gpus, device)
        # a group's followers were built for one config: any change starts a new group
        key = (config.name, weights, config.memory, str(device), world) + ((config,) if world > 1 else ())
        if key != self._key:
            self.clear()
            try:
                if world > 1:
                    from .sequence_parallel import SequenceParallelGroup

                    build = functools.partial(build_generator, config.name, weights, config)
                    self._group = SequenceParallelGroup(build, [f"cuda:{r}" for r in range(world)])
                else:
                    self._components = cls.load_components(weights, config, device)
            except ImportError as err:  # a package the models need (the weights are not at fault)
                raise ValueError(f"generator {config.name!r}: {err}") from err
            except (OSError, ValueError, RuntimeError) as err:
                if is_out_of_memory(err):
                    raise  # the card is too small, the weights not at fault: the job says "out of memory"
                raise GeneratorWeightsError(weights_advice(config.name, weights, err)) from err
            self._key = key
        if self._group is not None:
            self._group.check_alive()
            return self._group.generator
        return make_generator(config, self._components, device)

    def clear(self) -> None:
        """Drop the loaded models (and the GPU memory they held), stopping a sequence-parallel group."""
        if self._group is not None:
            self._group.close()
        self._components, self._group, self._key = None, None, None
        gc.collect()
        import torch  # loaded with the first generator, not with the service's options

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
