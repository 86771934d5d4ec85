"""postprocess: the VAE decoder's image (B, 3, H, W) in [-1, 1] -> IMAGE uint8 (B, H, W, 3),
rounded exactly as the in-process pipeline (``imageragturbo.runtime.request.to_uint8``)."""

import json

import triton_python_backend_utils as pb_utils

from imageragturbo.client import contract as C
from imageragturbo.runtime.request import to_uint8


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(cfg, C.IMAGE_OUT.name)["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, C.IMAGE).as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(C.IMAGE_OUT.name, to_uint8(image).astype(self.dtype,
                                                                          copy=False))]))
        return responses

    def finalize(self):
        pass
