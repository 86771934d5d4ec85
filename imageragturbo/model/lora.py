"""LoRA on the UNet decoder only (paper Sec. 3.4: "we also finetune the decoder of the student
denoiser using ... low-rank adaption"), through peft.

Only the up blocks get adapters (``targets="attention"``: their attention projections;
``"decoder"``, the fine-tuning default: their resnet convolutions too), so the UNet encoder, and
with it the retrieved items' cached H-space features, stays exactly as it was.
"""

from __future__ import annotations

DECODER_TARGETS = (r".*up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\."
                   r"attn\d\.(to_q|to_k|to_v|to_out\.0)")
# ``targets="decoder"``: the up blocks' resnet convolutions too (still nothing of the encoder)
DECODER_WIDE_TARGETS = (r".*up_blocks\.\d+\.(attentions\.\d+\.transformer_blocks\.\d+\."
                        r"attn\d\.(to_q|to_k|to_v|to_out\.0)|resnets\.\d+\.(conv1|conv2))")


def add_decoder_lora(unet, rank: int = 8, alpha: int | None = None,
                     adapter_name: str = "decoder_lora", targets: str = "attention"):
    """Attach LoRA adapters (peft) to the decoder's attention projections (``targets=
    "attention"``) or also its resnet convolutions (``"decoder"``); returns the names of the
    adapted modules. The base weights are frozen; only LoRA parameters train."""
    from peft import LoraConfig

    if targets not in ("attention", "decoder"):
        raise ValueError(f"targets must be 'attention' or 'decoder', got {targets!r}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                     target_modules=DECODER_TARGETS if targets == "attention"
                     else DECODER_WIDE_TARGETS)
    unet.requires_grad_(False)
    unet.add_adapter(cfg, adapter_name=adapter_name)
    names = [n for n, _ in unet.named_modules() if n.endswith("lora_A")]
    if not names:
        raise ValueError("no decoder attention projection matched: this UNet has no "
                         "cross-attention up blocks")
    return names


def lora_parameters(unet):
    return [p for n, p in unet.named_parameters() if "lora_" in n]


# ----------------------------------------------------------------------------- persistence
# The decoder LoRA is stored on its own (``unet_lora/``: safetensors with each adapted
# projection's A and B, and a config with the scaling), beside the untouched student ``unet/``,
# and merged into the weights at load: W <- W + scaling * B @ A. The folder then keeps both the
# student as distilled (the baseline every comparison needs) and ImageRAGTurbo's decoder, for
# 0.1 MB instead of a second 7 MB UNet.



def save_decoder_lora(unet, path, adapter_name: str = "decoder_lora", dtype=None) -> int:
    """Write the LoRA factors of ``unet`` (peft, ``add_decoder_lora``) to ``path``; returns the
    number of adapted projections."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, scaling = {}, {}
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and adapter_name in getattr(module, "lora_A", {}):
            a = module.lora_A[adapter_name].weight.detach()
            b = module.lora_B[adapter_name].weight.detach()
            tensors[f"{name}.lora_A"] = (a.to(dtype) if dtype else a).contiguous().cpu()
            tensors[f"{name}.lora_B"] = (b.to(dtype) if dtype else b).contiguous().cpu()
            scaling[name] = float(module.scaling[adapter_name])
    if not tensors:
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    save_file(tensors, str(path / "lora.safetensors"))
    (path / "config.json").write_text(json.dumps({"scaling": scaling}, indent=2) + "\n")
    return len(scaling)


def merge_decoder_lora(unet, path) -> int:
    """Merge a saved decoder LoRA into ``unet``'s weights in place (W += scaling * B @ A, in
    fp32); returns the number of merged projections. Refuses a LoRA for other modules or
    shapes with the path named."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    path = Path(path)
    scaling = json.loads((path / "config.json").read_text())["scaling"]
    tensors = load_file(str(path / "lora.safetensors"))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, s in scaling.items():
            lin = modules.get(name)
            a, b = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
            # linear: A (r, in), B (out, r); conv: A (r, in, kh, kw), B (out, r, 1, 1)
            delta = torch.einsum("or,r...->o...", b.flatten(1), a)
            if lin is None or tuple(lin.weight.shape) != tuple(delta.shape):
                raise ValueError(f"{path}: LoRA for {name!r} does not fit this UNet")
            lin.weight.copy_((lin.weight.float() + s * delta).to(lin.weight.dtype))
    return len(scaling)
