"""An exported ONNX stage (``1/model.onnx``) on ONNX Runtime, for the cpu profile: the CPU
Triton server has no onnxruntime backend, so this small runner stands in for it with the same
graph, tensor names and dynamic batching.

The requests of one dynamic batch with equal per-item shapes are concatenated on the batch
axis and run as one call; the outputs are split back, one response per request, in order.
An input declared ``dims: [1]`` for a graph input of shape (B,) (timestep, lam) is flattened.
Tensor names and dtypes come from the model config (rendered from the export's manifest).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from imageragturbo.runtime.device import session_options


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        so = session_options(int(p.get("intra_op_threads", "0") or 0))  # 0: ORT's default
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.rank = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.out_dims = {o["name"]: [int(d) for d in o["dims"]] for o in cfg["output"]}
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
                           for o in cfg["output"]}

    def _feeds(self, request):
        feeds = {}
        for name in self.inputs:
            a = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            if self.rank[name] == 1:
                a = a.reshape(-1)                                            # (B, 1) -> (B,)
            feeds[name] = a
        return feeds

    def execute(self, requests):
        feeds = [self._feeds(r) for r in requests]
        groups = {}
        for i, f in enumerate(feeds):
            key = tuple(a.shape[1:] for a in f.values())
            groups.setdefault(key, []).append(i)
        responses = [None] * len(requests)
        for idx in groups.values():
            try:
                batch = {n: np.concatenate([feeds[i][n] for i in idx]) for n in self.inputs}
                outs = self.session.run(self.outputs, batch)
            except Exception as e:  # noqa: BLE001 - answer every request of the group
                for i in idx:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"onnxruntime: {e}"))
                continue
            start = 0
            for i in idx:
                n = len(next(iter(feeds[i].values())))
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(
                    o[start:start + n].reshape(n, *self.out_dims[name]),
                    dtype=self.out_dtypes[name]))
                    for name, o in zip(self.outputs, outs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += n
        return responses

    def finalize(self):
        self.session = None  # ONNX Runtime frees the graph and its arena with the session
