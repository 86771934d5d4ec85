"""LoRA on the UNet decoder only (paper Sec. 3.4: "we also finetune the decoder of the student
denoiser using ... low-rank adaption"), through peft.

Only the up blocks' attention projections get adapters, so the UNet encoder, and with it the
retrieved items' cached H-space features, stays exactly as it was.
"""

from __future__ import annotations

DECODER_TARGETS = (r".*up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\."
                   r"attn\d\.(to_q|to_k|to_v|to_out\.0)")


def add_decoder_lora(unet, rank: int = 8, alpha: int | None = None,
                     adapter_name: str = "decoder_lora"):
    """Attach LoRA adapters (peft) to the decoder's attention projections; returns the names
    of the adapted modules. The base weights are frozen; only LoRA parameters train."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                     target_modules=DECODER_TARGETS)
    unet.requires_grad_(False)
    unet.add_adapter(cfg, adapter_name=adapter_name)
    names = [n for n, _ in unet.named_modules() if n.endswith("lora_A")]
    if not names:
        raise ValueError("no decoder attention projection matched: this UNet has no "
                         "cross-attention up blocks")
    return names


def lora_parameters(unet):
    return [p for n, p in unet.named_parameters() if "lora_" in n]
