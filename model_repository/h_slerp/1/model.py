"""h_adapter without an H-adapter graph: training-free injection (paper Eq. 3).

h = slerp(h_tgt, h_retr[:, 0], w) with target weight w = slerp_w per item (the retriever's
1 - STRENGTH), computed by ``imageragturbo.runtime.request.slerp_inject`` (the in-process
pipeline's function); w = 1 (no retrieval, or STRENGTH 0) returns h_tgt unchanged.
"""

import json

import triton_python_backend_utils as pb_utils

from imageragturbo.client import contract as C
from imageragturbo.runtime.request import slerp_inject


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(cfg, C.H)["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            def get(name, request=request):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

            h = get(C.H_TGT)                                            # (B, C, h, w)
            h_retr = get(C.H_RETR)                                      # (B, k, C, h, w)
            w = get(C.SLERP_W).reshape(-1)                              # (B,)
            out = h.astype(self.dtype, copy=True)
            on = w != 1
            if on.any():
                out[on] = slerp_inject(h[on], h_retr[on, 0], w[on])
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(C.H, out)]))
        return responses

    def finalize(self):
        pass
