"""postprocess: the VAE decoder's image (B, 3, H, W) in [-1, 1] -> IMAGE uint8 (B, H, W, 3),
rounded exactly as the in-process pipeline (``imageragturbo.runtime.request.to_uint8``)."""

import triton_python_backend_utils as pb_utils

from imageragturbo.runtime.request import to_uint8


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("IMAGE", to_uint8(image))]))
        return responses
