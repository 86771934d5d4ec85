"""A stand-in for Triton's ``triton_python_backend_utils``, so a backend's ``model.py`` can be
driven without a server: requests are dicts of arrays, responses record tensors or an error."""

from __future__ import annotations

import types

import numpy as np


class _In:
    """A request input tensor as the Python backend sees it."""

    def __init__(self, a):
        self._a = np.asarray(a)

    def as_numpy(self):
        return self._a


def pb_utils_stub() -> types.ModuleType:
    """A stand-in for Triton's ``triton_python_backend_utils``: requests are dicts of
    arrays; responses record their tensors or error."""
    pb = types.ModuleType("triton_python_backend_utils")

    class TritonError:
        INVALID_ARG = "INVALID_ARG"

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {t.name: t.array for t in output_tensors}
            self.error = error

    pb.TritonError, pb.Tensor, pb.InferenceResponse = TritonError, Tensor, InferenceResponse
    numpy_of = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64,
                "TYPE_INT32": np.int32, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_,
                "TYPE_STRING": np.object_}
    pb.triton_string_to_numpy = numpy_of.__getitem__
    pb.get_output_config_by_name = lambda config, name: next(
        (o for o in config.get("output", []) if o["name"] == name), None)
    pb.get_input_tensor_by_name = lambda request, name: (
        _In(request[name]) if name in request else None)
    return pb
