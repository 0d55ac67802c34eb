"""Tiny random AnyRecon components: the same diffusers/transformers classes from configs written here.

Sizes follow diffusers' own Wan image-to-video tests (2-layer, 2-head transformer with 36 input
channels; VAE of base dimension 3; CLIP vision model of hidden size 4) with a tiny UMT5 encoder and a
word-level tokenizer built in code, so nothing is downloaded. For tests and CPU demos only.
"""

from __future__ import annotations

import torch

from .anyrecon import AnyReconComponents, AnyReconConfig, AnyReconGenerator

TINY_WORDS = ("a", "scene", "photo", "of", "the", "temple", "room", "outdoor")  # tokenizer vocabulary
TINY_TEXT_DIM = 32  # UMT5 d_model == transformer text_dim
TINY_IMAGE_DIM = 4  # CLIP hidden size == transformer image_dim
TINY_CLIP_SIZE = 16  # CLIP input is resized to 16x16
TINY_CLIP_PATCH = 4  # -> 16 patches + 1 class token
TINY_HEADS, TINY_HEAD_DIM = 2, 12  # transformer attention heads


def tiny_tokenizer():
    """A word-level T5-style tokenizer (pad 0, eos 1, unk 2) built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in TINY_WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_anyrecon_components(seed: int = 0, num_heads: int = TINY_HEADS) -> AnyReconComponents:
    """Random tiny components (float32, CPU), each built after ``torch.manual_seed(seed)``.

    ``num_heads``: the transformer's attention heads (sequence-parallel tests need as many as ranks).

    Example:
        >>> c = tiny_anyrecon_components(0)
        >>> c.transformer.config.in_channels
        36
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    try:  # transformers 5 without torchvision: the PIL processor (only its mean and std are used)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=TINY_HEAD_DIM,
        in_channels=36,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=TINY_IMAGE_DIM,
        added_kv_proj_dim=num_heads * TINY_HEAD_DIM,  # as Wan2.1 I2V: image tokens get their own k, v
    )
    torch.manual_seed(seed)
    clip_cfg = CLIPVisionConfig(
        hidden_size=TINY_IMAGE_DIM,
        projection_dim=TINY_IMAGE_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_CLIP_SIZE,
        intermediate_size=16,
        patch_size=TINY_CLIP_PATCH,
    )
    image_encoder = CLIPVisionModelWithProjection(clip_cfg)
    image_processor = CLIPImageProcessor(crop_size=TINY_CLIP_SIZE, size=TINY_CLIP_SIZE)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_cfg = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )
    text_encoder = UMT5EncoderModel(text_cfg)
    for m in (vae, transformer, image_encoder, text_encoder):
        m.eval()
    return AnyReconComponents(
        vae=vae,
        transformer=transformer,
        image_encoder=image_encoder,
        image_processor=image_processor,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        name=f"tiny-{seed}",
    )


def save_diffusers_folder(components: AnyReconComponents, root) -> None:
    """Write ``components`` as a diffusers-layout folder (``vae/``, ``transformer/``, ...), the layout
    ``load_anyrecon_components`` reads; the transformer is saved with diffusers' own processors."""
    from pathlib import Path

    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    root = Path(root)
    for block in components.transformer.blocks:
        block.attn1.set_processor(WanAttnProcessor())
    for sub in ("vae", "transformer", "image_encoder", "image_processor", "text_encoder", "tokenizer"):
        getattr(components, sub).save_pretrained(root / sub)


def tiny_anyrecon_generator(
    config: AnyReconConfig = AnyReconConfig(), *, device: torch.device | str = "cpu", seed: int = 0, num_heads: int = 4
) -> AnyReconGenerator:
    """A tiny AnyRecon generator without a text encoder, built the same way in every process that calls it
    (``sequence_parallel.SequenceParallelGroup`` builds one per rank from this function).

    Example:
        >>> gen = tiny_anyrecon_generator(AnyReconConfig(attention="window_ours"))
    """
    components = tiny_anyrecon_components(seed, num_heads)
    components.text_encoder = components.tokenizer = None
    components.transformer.to(device)
    return AnyReconGenerator(components, config, device=device)
