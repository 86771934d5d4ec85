"""ONNX export of the five served stages: text encoder, UNet encoder, H-adapter, UNet decoder,
VAE decoder (installed as ``imageragturbo.export``)."""
