"""Training: the tiny default model family and the H-adapter + decoder LoRA fine-tuning with
latent adversarial distillation (installed as ``imageragturbo.training``)."""
