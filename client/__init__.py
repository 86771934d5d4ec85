"""gRPC client SDK for the served ImageRAGTurbo ensemble (installed as ``imageragturbo.client``).

Depends on tritonclient[grpc], numpy and pillow only, never on torch.
"""
