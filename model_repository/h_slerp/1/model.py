"""h_adapter without an H-adapter graph: training-free injection (paper Eq. 3).

h = slerp(h_tgt, h_retr[:, 0], w) with target weight w = 1 - lam per item, computed by
``imageragturbo.runtime.request.slerp_inject`` (the in-process pipeline's function); lam = 0
(no retrieval, or STRENGTH 0) returns h_tgt unchanged.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from imageragturbo.runtime.request import slerp_inject


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            h = pb_utils.get_input_tensor_by_name(request, "h_tgt").as_numpy()          # (B, C, h, w)
            h_retr = pb_utils.get_input_tensor_by_name(request, "h_retr").as_numpy()    # (B, k, C, h, w)
            lam = pb_utils.get_input_tensor_by_name(request, "lam").as_numpy().reshape(-1)  # (B,)
            out = h.copy()
            on = lam != 0
            if on.any():
                out[on] = slerp_inject(h[on], h_retr[on, 0], 1.0 - lam[on])
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("h", out.astype(np.float32))]))
        return responses
