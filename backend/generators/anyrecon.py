"""The AnyRecon generator: Wan2.1 image-to-video 14B + AnyRecon's LoRA, on diffusers (DESIGN.md section 1 step 5).

One call of ``generate`` fills one segment. The condition video is [retrieved captures ;
carried-over frames ; point renders at the targets] (``ConditionVideo``), N = M + P + F frames.
Following AnyRecon's inference (``run_AnyRecon.py``, ``pipeline/anyrecon_pipeline.py``):

1. check the inputs; put the retrieved captures in capture order; resize every frame to the working
   size (``height`` x ``width``, default 512x896 as AnyRecon);
2. clean the prompt as DiffSynth does (HTML unescaped, whitespace collapsed, stripped: AnyRecon's
   ``" "`` becomes ``""``) and encode it with UMT5 (cached on disk: the 11 GB encoder need not stay);
3. encode frame 0 (the first capture in capture order) with CLIP: penultimate hidden states;
4. VAE-encode every frame on its own (frames in the batch dimension): one latent per frame, no
   temporal compression; downsample the mask (nearest) to latent size, force frame 0's to 1 (AnyRecon's
   ``mask_indices=[0]``) and repeat it to 4 channels; y = [mask 4 ; condition latents 16];
5. flow matching with shift 5 over the grid 1, 3/4, 1/2, 1/4 (4 steps), noise drawn in float32 on the
   CPU, then latents, timesteps (1000, 936, 832, 624 in bf16) and Euler steps in the compute dtype; no
   classifier-free guidance by default; the transformer's input is [noisy latents 16 ; y 20] = 36 channels;
6. decode the target frames one latent each, in overlapping latent tiles of 30x52 (stride 15x26)
   blended with linear ramps in the latents' dtype, and resize back to the cameras' size.

The confidence of an output pixel is 1 where the memory was rendered (the generator only refines
it) and ``unseen_confidence`` where the generator had to invent it.

Attention (``window_attention``): ``full`` (the released ``full_attention.ckpt``), ``block``
(AnyRecon's sparse pattern, for weights trained with it), ``window_ours`` (experimental, ours) or
``stock`` (diffusers' own processor, a reference). Memory modes: ``none`` (everything on the device),
``model_offload`` (each model moves to the device only while it runs), ``group_offload``
(transformer blocks stream from CPU one at a time) and ``fp8`` (transformer weights stored in
float8, computed in bf16).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fileio import write_atomic
from ..types import ConditionVideo, Frames
from . import GENERATORS, MEMORY_MODES, TRAINED_ATTENTION, GenerateProgress, GeneratorConfig, GeneratorWeights
from .window_attention import (
    ATTENTION_MODES,
    DEFAULT_WINDOW_FRAMES,
    FULL_KERNELS,
    SPARSE_KERNELS,
    WanWindowAttnProcessor,
    set_window_attention,
)

logger = logging.getLogger(__name__)

HUB_ID = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"  # the base model AnyRecon fine-tunes
ATTENTION_CHOICES = ("stock",) + ATTENTION_MODES
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_KEY_CHARS = 32  # hex characters of the sha256 naming a cached prompt embedding


@dataclass(frozen=True)
class AnyReconConfig:
    """Hyper-parameters of the AnyRecon generator (defaults from AnyRecon's code where it has one)."""

    height: int | None = 512  # working size (AnyRecon: 512x896); None: the cameras' size (ours)
    width: int | None = 896  # both multiples of 16 (VAE 8 x patch 2)
    attention: str = "full"  # one of ATTENTION_CHOICES: "full", "block", "window_ours", "stock"
    window_frames: int = DEFAULT_WINDOW_FRAMES  # window_ours only: +-frames
    full_kernel: str = "auto"  # "fa4", "sdpa" or "auto" (fa4 where FlashAttention-4 runs)
    sparse_kernel: str = "auto"  # block/window_ours: "paged", "split" or "auto" (paged where it runs)
    compile_blocks: bool = False  # torch.compile each transformer block (regional; fuses norms, rotary, gates)
    guidance_scale: float = 1.0  # 1: no classifier-free guidance (AnyRecon's cfg_scale=1.0)
    negative_prompt: str = ""  # used only when guidance_scale > 1
    default_prompt: str = " "  # AnyRecon prompts with a single space (cleaned to "")
    shift: float = 5.0  # flow-matching sigma shift (AnyRecon: sigma_shift=5)
    num_train_timesteps: int = 1000  # timestep = sigma * 1000
    max_sequence_length: int = 512  # UMT5 tokens; Wan's cross-attention expects 512 text tokens
    mask_channels: int = 4  # the mask repeated to 4 channels (Wan I2V layout)
    mask_threshold: float = 0.5  # renders.mask as float above this counts as visible
    unseen_confidence: float = 0.5  # confidence of pixels the memory did not cover (rendered: 1)
    dtype: str = "float32"  # transformer compute dtype; "bfloat16" for the 14B model on GPU
    memory_mode: str = "none"  # one of MEMORY_MODES
    decode_tile: tuple[int, int] | None = (30, 52)  # latent tile of the decoder (AnyRecon); None: whole frames
    decode_stride: tuple[int, int] = (15, 26)  # latent stride between decoder tiles (AnyRecon)
    text_cache_dir: str | None = None  # None: the user cache folder (platformdirs), "text_embeds"

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 16):
                raise ValueError(f"AnyReconConfig.{name} must be a positive multiple of 16 or None; got {v}")
        if (self.height is None) != (self.width is None):
            raise ValueError(
                f"AnyReconConfig.height and width must both be set or both None; got {self.height}, {self.width}"
            )
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"AnyReconConfig.attention must be one of {ATTENTION_CHOICES}; got {self.attention!r}")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"AnyReconConfig.memory_mode must be one of {MEMORY_MODES}; got {self.memory_mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"AnyReconConfig.dtype must be one of {tuple(DTYPES)}; got {self.dtype!r}")
        if self.window_frames < 0:
            raise ValueError(f"AnyReconConfig.window_frames must be >= 0; got {self.window_frames}")
        if self.full_kernel not in FULL_KERNELS:
            raise ValueError(f"AnyReconConfig.full_kernel must be one of {FULL_KERNELS}; got {self.full_kernel!r}")
        if self.sparse_kernel not in SPARSE_KERNELS:
            raise ValueError(
                f"AnyReconConfig.sparse_kernel must be one of {SPARSE_KERNELS}; got {self.sparse_kernel!r}"
            )
        if self.decode_tile is not None and not all(0 < s <= t for s, t in zip(self.decode_stride, self.decode_tile)):
            raise ValueError(
                f"AnyReconConfig.decode_stride must be positive and at most decode_tile={self.decode_tile}; "
                f"got {self.decode_stride}"
            )
        if not 0.0 <= self.unseen_confidence <= 1.0:
            raise ValueError(f"AnyReconConfig.unseen_confidence must be in [0, 1]; got {self.unseen_confidence}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"AnyReconConfig.guidance_scale must be >= 1; got {self.guidance_scale}")
        if self.shift <= 0:
            raise ValueError(f"AnyReconConfig.shift must be > 0; got {self.shift}")


@dataclass
class AnyReconComponents:
    """The learned parts, loaded by the caller (``AnyReconGenerator.from_pretrained`` or ``tiny``).

    Attributes:
        vae: ``AutoencoderKLWan``.
        transformer: ``WanTransformer3DModel`` with 36 input channels and an image embedder.
        image_encoder: ``CLIPVisionModelWithProjection``.
        image_processor: ``CLIPImageProcessor`` (its mean and std normalise the CLIP input).
        text_encoder, tokenizer: ``UMT5EncoderModel`` and its tokenizer; may be None when the prompt's
            embedding is cached or ``text_encoder_loader`` can load them on demand.
        text_encoder_loader: returns (text_encoder, tokenizer) when a prompt is not cached; the encoder
            is dropped again after use.
        name: identifies the text encoder's weights in the text cache key (hub id or folder); give
            different weights different names.
        memory_mode: the memory mode applied to these models (``AnyReconGenerator`` applies it once).
        trained_attention: the attention the weights were trained with (``full`` or ``block``).
    """

    vae: Any
    transformer: Any
    image_encoder: Any
    image_processor: Any
    text_encoder: Any | None = None
    tokenizer: Any | None = None
    text_encoder_loader: Callable[[], tuple[Any, Any]] | None = None
    name: str = ""
    memory_mode: str | None = None
    trained_attention: str = "full"


def check_attention(attention: str, trained_attention: str, lora_path: str | os.PathLike | None = None) -> None:
    """Check that ``attention`` suits weights trained with ``trained_attention`` (raise ``ValueError``).

    ``block`` needs weights trained with block attention; AnyRecon's released ``full_attention.ckpt``
    was trained with full attention, so it cannot be declared ``block``. ``window_ours`` and ``stock``
    (reference, experiment) pass with a warning when they differ from the training.
    """
    if trained_attention not in TRAINED_ATTENTION:
        raise ValueError(f"AnyRecon: trained_attention must be one of {TRAINED_ATTENTION}; got {trained_attention!r}")
    if lora_path is not None and Path(lora_path).name == "full_attention.ckpt" and trained_attention != "full":
        raise ValueError(
            f"AnyRecon: {lora_path} is AnyRecon's full-attention checkpoint; trained_attention must be 'full'; "
            f"got {trained_attention!r}"
        )
    if attention == "block" and trained_attention != "block":
        raise ValueError(
            f"AnyRecon: attention 'block' needs weights trained with block attention; these were trained with "
            f"{trained_attention!r} (declare block-trained weights with trained_attention='block')"
        )
    if attention == "full" and trained_attention == "block":
        logger.warning("AnyRecon: full attention on weights trained with block attention")
    if attention == "window_ours":
        logger.warning("AnyRecon: attention 'window_ours' is experimental; no released weights were trained with it")


def load_anyrecon_components(
    path_or_hub_id: str = HUB_ID,
    lora_path: str | os.PathLike | None = None,
    *,
    dtype: str = "bfloat16",
    memory_mode: str = "none",
    device: torch.device | str = "cuda",
    local_files_only: bool = False,
) -> AnyReconComponents:
    """Load the Wan2.1 I2V diffusers weights from a folder or hub id, merge AnyRecon's LoRA.

    The transformer and the VAE are in ``dtype`` (AnyRecon runs both in bf16), CLIP in float32 (as
    AnyRecon). The UMT5 text encoder is loaded only when a prompt is not in the text cache. Models
    are placed for ``memory_mode`` (CPU for the offloaded modes); fp8 is applied here, before the transformer
    moves to the device; the other modes' hooks are installed by ``AnyReconGenerator``.
    """
    try:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    except ImportError as err:
        raise ImportError(f"needs {err.name}, which is not installed here (pip install 'reconloop[gpu]')") from err

    if dtype not in DTYPES:
        raise ValueError(f"AnyRecon: dtype must be one of {tuple(DTYPES)}; got {dtype!r}")
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"AnyRecon: memory_mode must be one of {MEMORY_MODES}; got {memory_mode!r}")
    kw = {"local_files_only": local_files_only}
    dt = DTYPES[dtype]
    vae = AutoencoderKLWan.from_pretrained(path_or_hub_id, subfolder="vae", torch_dtype=dt, **kw)
    transformer = WanTransformer3DModel.from_pretrained(path_or_hub_id, subfolder="transformer", torch_dtype=dt, **kw)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        path_or_hub_id, subfolder="image_encoder", torch_dtype=torch.float32, **kw
    )
    image_processor = CLIPImageProcessor.from_pretrained(path_or_hub_id, subfolder="image_processor", **kw)
    if lora_path is not None:
        from .anyrecon_lora import convert_anyrecon_lora, fuse_lora_, load_lora_file

        n = fuse_lora_(transformer, convert_anyrecon_lora(load_lora_file(lora_path)))
        logger.info("AnyRecon LoRA %s: %d weights merged", lora_path, n)

    def load_text_encoder() -> tuple[Any, Any]:
        from transformers import AutoTokenizer, UMT5EncoderModel

        tok = AutoTokenizer.from_pretrained(path_or_hub_id, subfolder="tokenizer", **kw)
        enc = UMT5EncoderModel.from_pretrained(path_or_hub_id, subfolder="text_encoder", torch_dtype=dt, **kw)
        return enc, tok

    if memory_mode == "fp8":  # stored as fp8 here, on the CPU: a 14B transformer's bf16 weights (30.5 GiB) never
        # reach the card whole, which a 32-GB card's fp8 job (15.3 GiB of weights) needs
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dt)
    if memory_mode not in ("model_offload", "group_offload"):
        transformer.to(device)
    vae.to("cpu" if memory_mode == "model_offload" else device)
    image_encoder.to("cpu" if memory_mode == "model_offload" else device)
    return AnyReconComponents(
        vae,
        transformer,
        image_encoder,
        image_processor,
        text_encoder_loader=load_text_encoder,
        name=str(path_or_hub_id),
        memory_mode="fp8" if memory_mode == "fp8" else None,  # the others' hooks: AnyReconGenerator's
    )


def clean_prompt(text: str) -> str:
    """The prompt as DiffSynth's Wan prompter cleans it: HTML entities unescaped (twice), runs of
    whitespace made one space, ends stripped (``" "`` -> ``""``). (DiffSynth also runs ``ftfy.fix_text``,
    which repairs mis-decoded Unicode; prompts typed as text need none.)"""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def flow_sigmas(num_steps: int, shift: float) -> Tensor:
    """DiffSynth's flow-matching grid: sigma_i = 1 - i/S (i < S), shifted to shift*s / (1 + (shift-1)*s),
    followed by the final 0. float32 [S + 1]"""
    s = torch.linspace(1.0, 0.0, num_steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1)])


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start of each tile along one axis: every ``stride``, dropping a start whose predecessor's tile
    already reaches the end (DiffSynth's tiler)."""
    return [s for s in range(0, size, stride) if not (s - stride >= 0 and s - stride + tile >= size)]


def ramp(length: int, at_start: bool, at_end: bool, border: int) -> Tensor:
    """Blend weights along one axis of a tile: 1, rising as (i+1)/border over the first ``border``
    samples unless the tile starts at the image edge, falling likewise at the end. float32 [length]"""
    w = torch.ones(length)
    if border <= 0:  # tiles that do not overlap (stride == tile): nothing to blend
        return w
    steps = (torch.arange(border) + 1) / border
    if not at_start:
        w[:border] = steps[:length]
    if not at_end:
        w[-border:] = steps.flip(0)[-length:]
    return w


@GENERATORS.register("anyrecon")
class AnyReconGenerator:
    """Render-conditioned Wan2.1 I2V generator (AnyRecon). See the module docstring for the steps.

    Args:
        components: the models (``AnyReconComponents``).
        config: hyper-parameters.
        device: where the models run; None: the transformer's device.

    Example (tiny random models, CPU):
        >>> from backend.generators.tiny import tiny_anyrecon_components
        >>> gen = AnyReconGenerator(tiny_anyrecon_components(), AnyReconConfig(height=32, width=32))
        >>> frames = gen.generate(cond, num_steps=2, seed=0)   # cond: a ConditionVideo
    """

    def __init__(
        self,
        components: AnyReconComponents,
        config: AnyReconConfig = AnyReconConfig(),
        device: torch.device | str | None = None,
    ) -> None:
        self.components = components
        self.config = config
        tr = components.transformer
        in_ch = tr.config.in_channels
        out_ch = tr.config.out_channels
        z_dim = components.vae.config.z_dim
        if in_ch != out_ch + config.mask_channels + z_dim:
            raise ValueError(
                f"AnyRecon: transformer.in_channels must be out_channels + mask_channels + vae.z_dim = "
                f"{out_ch} + {config.mask_channels} + {z_dim}; got {in_ch}"
            )
        if tr.config.image_dim is None:
            raise ValueError("AnyRecon: transformer.config.image_dim must be set (image-to-video model); got None")
        if device is None:
            device = next(tr.parameters()).device
        self.device = torch.device(device)
        self.dtype = DTYPES[config.dtype]
        self.vae_scale = int(components.vae.config.scale_factor_spatial)  # 8 for Wan2.1's VAE
        if config.memory_mode != "fp8" and tr.dtype != self.dtype:
            raise ValueError(f"AnyRecon: transformer weights are {tr.dtype}; AnyReconConfig.dtype says {config.dtype}")
        self.patch = tuple(tr.config.patch_size)
        self.processor: WanWindowAttnProcessor | None = None
        if config.attention == "stock":
            from diffusers.models.transformers.transformer_wan import WanAttnProcessor

            for block in tr.blocks:
                block.attn1.set_processor(WanAttnProcessor())
        else:
            self.processor = set_window_attention(
                tr,
                config.attention,
                config.window_frames,
                full_kernel=config.full_kernel,
                sparse_kernel=config.sparse_kernel,
            )
        if config.compile_blocks:
            tr.compile_repeated_blocks(dynamic=False)
        self._apply_memory_mode()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_components(
        cls, weights: GeneratorWeights, config: GeneratorConfig, device: torch.device | str
    ) -> AnyReconComponents:
        """The models for ``GeneratorCache``: bf16, placed for ``config.memory``, trained attention recorded."""
        check_attention(weights.trained_attention, weights.trained_attention, weights.lora)  # the declaration
        components = load_anyrecon_components(
            weights.path or HUB_ID,
            weights.lora,
            dtype="bfloat16",
            memory_mode=config.memory,
            device=device,
            local_files_only=not weights.allow_download,
        )
        components.trained_attention = weights.trained_attention
        return components

    @classmethod
    def from_config(
        cls, config: GeneratorConfig, components: AnyReconComponents, device: torch.device | str | None = None
    ) -> AnyReconGenerator:
        """The generator a job asked for, on loaded components (``make_generator``).

        ``auto`` attention is the weights' trained attention; any other is checked against it
        (``check_attention``). Blocks are compiled on CUDA when the weights stay on it (memory ``none``).
        """
        attention = components.trained_attention if config.attention == "auto" else config.attention
        check_attention(attention, components.trained_attention)
        dtype = components.transformer.dtype  # float8 storage (fp8 mode) computes in bf16
        on_cuda = torch.device(device or next(iter(components.transformer.parameters())).device).type == "cuda"
        anyrecon = AnyReconConfig(
            attention=attention,
            window_frames=config.window_frames,
            memory_mode=config.memory,
            dtype="float32" if dtype == torch.float32 else "bfloat16",
            compile_blocks=on_cuda and config.memory == "none",  # hooks of the other modes stay uncompiled
        )
        return cls(components, anyrecon, device=device)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str = HUB_ID,
        lora_path: str | os.PathLike | None = None,
        *,
        trained_attention: str = "full",
        config: AnyReconConfig = AnyReconConfig(dtype="bfloat16", compile_blocks=True),
        device: torch.device | str = "cuda",
        local_files_only: bool = False,
    ) -> AnyReconGenerator:
        """Load the Wan2.1 I2V diffusers weights and AnyRecon's LoRA (``load_anyrecon_components``).

        Args:
            path_or_hub_id: a diffusers-format folder or ``Wan-AI/Wan2.1-I2V-14B-720P-Diffusers``.
            lora_path: AnyRecon's checkpoint (DiffSynth names; converted and merged).
            trained_attention: the attention the checkpoint was trained with: ``full`` (the released
                ``full_attention.ckpt``) or ``block``; ``config.attention`` is checked against it
                (``check_attention``).
            local_files_only: never reach the hub (folders, or a hub cache filled earlier).
        """
        check_attention(config.attention, trained_attention, lora_path)
        components = load_anyrecon_components(
            path_or_hub_id,
            lora_path,
            dtype=config.dtype,
            memory_mode=config.memory_mode,
            device=device,
            local_files_only=local_files_only,
        )
        return cls(components, config, device=device)

    def _apply_memory_mode(self) -> None:
        """Install the memory mode's hooks once per set of components (a cache may reuse them)."""
        c, mode = self.components, self.config.memory_mode
        if c.memory_mode is not None:
            if c.memory_mode != mode:
                raise ValueError(
                    f"AnyRecon: these components were set up for memory_mode {c.memory_mode!r}; "
                    f"AnyReconConfig.memory_mode says {mode!r} (load them again)"
                )
            return
        if mode == "group_offload":
            c.transformer.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=self.device.type == "cuda",
            )
        elif mode == "fp8":
            c.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=self.dtype)
        c.memory_mode = mode

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """In ``model_offload`` mode move ``module`` to the device for the block and back to CPU after."""
        if self.config.memory_mode != "model_offload":
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    # ------------------------------------------------------------------ steps
    def working_size(self, cond: ConditionVideo) -> tuple[int, int]:
        """(height, width) the model runs at: the config's, or the cameras' size."""
        if self.config.height is not None:
            return self.config.height, self.config.width
        return cond.targets.height, cond.targets.width

    def check_inputs(self, cond: ConditionVideo, num_steps: int) -> None:
        """Raise ``ValueError`` naming the field, the rule and the value received."""
        f = len(cond.targets)
        h, w = cond.targets.height, cond.targets.width
        if f < 1:
            raise ValueError(f"anyrecon: cond.targets must hold at least 1 camera; got {f}")
        if num_steps < 1:
            raise ValueError(f"anyrecon: num_steps must be >= 1; got {num_steps}")
        r = cond.renders
        if tuple(r.rgb.shape) != (f, h, w, 3):
            raise ValueError(
                f"anyrecon: cond.renders.rgb must be [F, H, W, 3] = {(f, h, w, 3)}; got {tuple(r.rgb.shape)}"
            )
        if tuple(r.mask.shape) != (f, h, w):
            raise ValueError(f"anyrecon: cond.renders.mask must be [F, H, W] = {(f, h, w)}; got {tuple(r.mask.shape)}")
        for name in ("memory", "carried"):
            views = getattr(cond, name)
            if len(views) and tuple(views.images.shape[1:]) != (h, w, 3):
                raise ValueError(
                    f"anyrecon: cond.{name}.images must be [N, {h}, {w}, 3] like the targets; got {tuple(views.images.shape)}"
                )
        if len(cond.memory) + len(cond.carried) + f > self.components.transformer.config.rope_max_seq_len:
            raise ValueError(
                f"anyrecon: at most rope_max_seq_len={self.components.transformer.config.rope_max_seq_len} frames; "
                f"got {len(cond.memory) + len(cond.carried) + f}"
            )
        wh, ww = self.working_size(cond)
        mult = self.vae_scale * self.patch[1]
        if wh % mult or ww % mult:
            raise ValueError(
                f"anyrecon: the working size must be a multiple of {mult}; got {wh}x{ww} "
                f"(set AnyReconConfig.height/width to resize)"
            )

    def condition_video(self, cond: ConditionVideo) -> tuple[Tensor, Tensor, int, int]:
        """Stack [memory in capture order ; carried ; renders] and their mask at the working size.

        Returns:
            video: frames in [-1, 1]. float32 [N, 3, H, W]
            mask: 1 visible/known, 0 to generate; ones for memory and carried frames and for frame 0
                (AnyRecon's ``mask_indices=[0]``). float32 [N, 1, H, W]
            num_memory: M, the retrieved captures at the start.
            num_prefix: M + P, frames before the targets.
        """
        dev = self.device
        order = sorted(range(len(cond.memory)), key=lambda i: cond.memory.ids[i])  # capture order (AnyRecon)
        memory = cond.memory.images[order] if len(cond.memory) else cond.memory.images
        images = [memory, cond.carried.images, cond.renders.rgb]
        rgb = torch.cat([x.to(dev, torch.float32) for x in images], dim=0).permute(0, 3, 1, 2)  # [N, 3, H, W]
        num_memory, num_prefix = len(cond.memory), len(cond.memory) + len(cond.carried)
        target_mask = cond.renders.mask.to(dev).float() > self.config.mask_threshold
        mask = torch.cat([torch.ones(num_prefix, *target_mask.shape[1:], device=dev), target_mask.float()], dim=0)
        mask[0] = 1.0  # AnyRecon marks frame 0 known, also when it is a render (no memory, no carried frame)
        mask = mask[:, None]  # [N, 1, H, W]
        h, w = self.working_size(cond)
        if rgb.shape[-2:] != (h, w):
            logger.info("anyrecon: resizing the condition video from %sx%s to %sx%s", *rgb.shape[-2:], h, w)
            rgb = F.interpolate(rgb, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            mask = F.interpolate(mask, size=(h, w), mode="nearest")
        return rgb.clamp(0, 1) * 2 - 1, mask, num_memory, num_prefix

    def _text_cache_path(self, prompt: str) -> Path:
        c = self.components
        root = self.config.text_cache_dir
        if root is None:
            import platformdirs

            root = os.path.join(platformdirs.user_cache_dir("reconloop"), "text_embeds")
        # the key names the weights (components.name: hub id or folder), not a loaded encoder, so that a
        # run without the text encoder finds what a run with it wrote
        ident = {
            "prompt": prompt,
            "max_len": self.config.max_sequence_length,
            "model": c.name,
            "dim": int(c.transformer.config.text_dim),
        }
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:CACHE_KEY_CHARS]
        return Path(root) / f"{key}.safetensors"

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> Tensor:
        """UMT5 embedding of ``prompt`` (cleaned by ``clean_prompt``), zero past its tokens, cached on disk.

        Returns:
            prompt embeddings. float32 [1, max_sequence_length, text_dim]
        """
        from safetensors.torch import load_file, save

        prompt = clean_prompt(prompt)
        path = self._text_cache_path(prompt)
        if path.is_file():
            return load_file(str(path))["prompt_embeds"].float()
        c = self.components
        enc, tok = c.text_encoder, c.tokenizer
        loaded = False
        if enc is None or tok is None:
            if c.text_encoder_loader is None:
                raise ValueError(
                    f"anyrecon: prompt {prompt!r} is not in the text cache ({path.parent}) and no text encoder is loaded"
                )
            enc, tok = c.text_encoder_loader()
            loaded = True
        max_len = self.config.max_sequence_length
        inputs = tok(
            [prompt],
            padding="max_length",
            max_length=max_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        enc_device = next(enc.parameters()).device if not loaded else self.device
        if loaded:
            enc.to(self.device)
        try:
            hidden = enc(inputs.input_ids.to(enc_device), inputs.attention_mask.to(enc_device)).last_hidden_state
        finally:
            if loaded:
                del enc
        n_tokens = int(inputs.attention_mask.sum())
        embeds = torch.zeros_like(hidden, dtype=torch.float32)
        embeds[:, :n_tokens] = hidden[:, :n_tokens].float()
        embeds = embeds.cpu()
        write_atomic(path, save({"prompt_embeds": embeds.contiguous()}))
        return embeds

    @torch.no_grad()
    def encode_image(self, frame: Tensor) -> Tensor:
        """CLIP feature of one frame: penultimate hidden states (AnyRecon's ``use_31_block``).

        Args:
            frame: the first condition frame, in [-1, 1]. [3, H, W]

        Returns:
            image embeddings. float32 [1, tokens, image_dim]
        """
        enc = self.components.image_encoder
        size = int(enc.config.image_size)
        proc = self.components.image_processor
        mean = torch.tensor(proc.image_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(proc.image_std, device=self.device).view(1, 3, 1, 1)
        x = F.interpolate(frame[None].float(), size=(size, size), mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - mean) / std
        with self._on_device(enc):
            dtype = next(enc.parameters()).dtype
            out = enc(pixel_values=x.to(dtype), output_hidden_states=True)
        return out.hidden_states[-2].float()

    def _latent_stats(self) -> tuple[Tensor, Tensor]:
        cfg = self.components.vae.config
        mean = torch.tensor(cfg.latents_mean, device=self.device).view(1, cfg.z_dim, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=self.device).view(1, cfg.z_dim, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_frames(self, video: Tensor) -> Tensor:
        """VAE-encode each frame on its own (frames in the batch dimension): one latent per frame.

        Args:
            video: frames in [-1, 1]. float32 [N, 3, H, W]

        Returns:
            normalised latents (the mode of the posterior). float32 [1, z_dim, N, H/8, W/8]
        """
        vae = self.components.vae
        mean, std = self._latent_stats()
        with self._on_device(vae):
            dtype = next(vae.parameters()).dtype
            lat = vae.encode(video[:, :, None].to(dtype)).latent_dist.mode()  # [N, z, 1, h, w]
        lat = lat.permute(2, 1, 0, 3, 4)  # [1, z, N, h, w], in the VAE's dtype (AnyRecon: bf16)
        return ((lat - mean.to(dtype)) * (1 / std).to(dtype)).float()

    def mask_latents(self, mask: Tensor) -> Tensor:
        """The mask at latent size (nearest), repeated to ``mask_channels``.

        Args:
            mask: float32 [N, 1, H, W]

        Returns:
            float32 [1, mask_channels, N, H/8, W/8]
        """
        h, w = mask.shape[-2] // self.vae_scale, mask.shape[-1] // self.vae_scale
        small = F.interpolate(mask, size=(h, w), mode="nearest")  # [N, 1, h, w]
        return small.permute(1, 0, 2, 3)[None].repeat(1, self.config.mask_channels, 1, 1, 1)

    def prepare_latents(self, shape: tuple[int, ...], seed: int) -> Tensor:
        """Initial noise drawn in float32 by a CPU generator (the same numbers on every device), then
        cast to the compute dtype (AnyRecon). ``shape`` in ``self.dtype``"""
        gen = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device, self.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Decode normalised latents one frame at a time, in overlapping latent tiles (``decode_tile``,
        ``decode_stride``) blended by linear ramps over the overlap, accumulated in the latents' dtype
        (AnyRecon's tiled decode; bf16 with bf16 latents).

        Args:
            latents: [1, z_dim, F, h, w] (any float dtype; the blend runs in it)

        Returns:
            frames in [0, 1]. float32 [F, 3, H, W]
        """
        vae = self.components.vae
        mean, std = self._latent_stats()
        dtype = latents.dtype
        lat = (latents / (1 / std).to(dtype) + mean.to(dtype)).permute(2, 1, 0, 3, 4)  # [F, z, 1, h, w]
        h, w = lat.shape[-2:]
        s = self.vae_scale
        tile, stride = self.config.decode_tile, self.config.decode_stride
        if tile is None:
            tile, stride = (h, w), (h, w)
        border = ((tile[0] - stride[0]) * s, (tile[1] - stride[1]) * s)
        with self._on_device(vae):
            vae_dtype = next(vae.parameters()).dtype
            values = torch.zeros(lat.shape[0], 3, h * s, w * s, dtype=dtype, device=self.device)
            weight = torch.zeros(1, 1, h * s, w * s, dtype=dtype, device=self.device)
            for y0 in tile_starts(h, tile[0], stride[0]):
                for x0 in tile_starts(w, tile[1], stride[1]):
                    y1, x1 = min(y0 + tile[0], h), min(x0 + tile[1], w)
                    part = vae.decode(lat[..., y0:y1, x0:x1].to(vae_dtype), return_dict=False)[0][:, :, 0]
                    ry = ramp((y1 - y0) * s, y0 == 0, y1 >= h, border[0])
                    rx = ramp((x1 - x0) * s, x0 == 0, x1 >= w, border[1])
                    mask = torch.minimum(ry[:, None], rx[None, :]).to(self.device, dtype)
                    values[:, :, y0 * s : y1 * s, x0 * s : x1 * s] += part.to(dtype) * mask
                    weight[:, :, y0 * s : y1 * s, x0 * s : x1 * s] += mask
        video = (values / weight).clamp(-1, 1)
        return ((video.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def generate(
        self, cond: ConditionVideo, *, num_steps: int, seed: int, progress: GenerateProgress | None = None
    ) -> Frames:
        """Generate the target frames of one segment.

        Args:
            cond: [memory ; carried ; renders] and the target cameras (``ConditionVideo``).
            num_steps: denoising steps (AnyRecon: 4).
            seed: noise seed.
            progress: called after each denoising step (it may raise to cancel the segment).

        Returns:
            images at the targets in [0, 1], float32 [F, H, W, 3]; confidence 1 where rendered, else
            ``unseen_confidence``, float32 [F, H, W] (H, W: the cameras' size).
        """
        cfg = self.config
        # 1. Check inputs, build the condition video at the working size.
        self.check_inputs(cond, num_steps)
        video, mask, num_memory, num_prefix = self.condition_video(cond)

        # 2. Prompt (cached) and, with guidance, the negative prompt.
        prompt_embeds = self.encode_prompt(cond.prompt or cfg.default_prompt).to(self.device, self.dtype)
        do_cfg = cfg.guidance_scale > 1.0
        negative_embeds = self.encode_prompt(cfg.negative_prompt).to(self.device, self.dtype) if do_cfg else None

        # 3. CLIP feature of frame 0.
        image_embeds = self.encode_image(video[0]).to(self.device, self.dtype)

        # 4. One latent per frame; y = [mask 4 ; latents 16].
        y = torch.cat([self.mask_latents(mask), self.encode_frames(video)], dim=1)  # [1, 20, N, h, w]

        # 5-6. Timesteps, noise, denoising loop.
        latents = self.denoise(
            y,
            prompt_embeds,
            image_embeds,
            negative_embeds,
            num_steps=num_steps,
            seed=seed,
            num_memory=num_memory,
            progress=progress,
        )

        # 7. Decode the targets, back to the cameras' size; confidence from the render mask.
        images = self.decode(latents[:, :, num_prefix:])  # [F, 3, H, W]
        h, w = cond.targets.height, cond.targets.width
        if images.shape[-2:] != (h, w):
            images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        seen = cond.renders.mask.to(self.device).float() > cfg.mask_threshold
        confidence = torch.where(
            seen, torch.ones((), device=self.device), torch.full((), cfg.unseen_confidence, device=self.device)
        )
        return Frames(images=images.clamp(0, 1).permute(0, 2, 3, 1).contiguous(), confidence=confidence.float())

    @torch.no_grad()
    def denoise(
        self,
        y: Tensor,
        prompt_embeds: Tensor,
        image_embeds: Tensor,
        negative_embeds: Tensor | None = None,
        *,
        num_steps: int,
        seed: int,
        num_memory: int,
        progress: GenerateProgress | None = None,
    ) -> Tensor:
        """The flow-matching loop: noise -> clean latents of all N frames, in the compute dtype.

        Each step: timestep t_i = sigma_i * 1000 cast to the compute dtype (bf16: 1000, 936, 832, 624
        for 4 steps), the transformer's velocity v, then x <- x + v * (sigma_{i+1} - sigma_i) in the
        latents' dtype (``flow_sigmas``; DiffSynth's scheduler).

        Args:
            y: [mask ; condition latents]. [1, mask_channels + z_dim, N, h, w]
            prompt_embeds, negative_embeds: text embeddings. [1, 512, text_dim]
            image_embeds: CLIP feature of frame 0. [1, tokens, image_dim]
            num_memory: leading memory frames (for ``window_ours``).
            progress: ``progress(fraction, message)`` after each step; it may raise to stop.

        Returns:
            latents. ``self.dtype`` [1, z_dim, N, h, w]
        """
        c, cfg = self.components, self.config
        sigmas = flow_sigmas(num_steps, cfg.shift)
        n_frames = y.shape[2]
        latents = self.prepare_latents((1, c.vae.config.z_dim, n_frames, *y.shape[-2:]), seed)
        if self.processor is not None:
            tokens_per_frame = (y.shape[-2] // self.patch[1]) * (y.shape[-1] // self.patch[2])
            self.processor.set_layout(n_frames, tokens_per_frame, num_memory, self.device)
        y = y.to(self.dtype)
        tr = c.transformer
        with self._on_device(tr):
            for i in range(num_steps):
                model_input = torch.cat([latents, y], dim=1)  # [1, 36, N, h, w]
                timestep = (sigmas[i] * cfg.num_train_timesteps).to(self.dtype).expand(1).to(self.device)
                pred = tr(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=prompt_embeds,
                    encoder_hidden_states_image=image_embeds,
                    return_dict=False,
                )[0]
                if negative_embeds is not None:
                    uncond = tr(
                        hidden_states=model_input,
                        timestep=timestep,
                        encoder_hidden_states=negative_embeds,
                        encoder_hidden_states_image=image_embeds,
                        return_dict=False,
                    )[0]
                    pred = uncond + cfg.guidance_scale * (pred - uncond)
                latents = latents + pred.to(self.dtype) * (sigmas[i + 1] - sigmas[i])
                if progress is not None:
                    progress((i + 1) / num_steps, f"denoising step {i + 1}/{num_steps}")
        return latents
