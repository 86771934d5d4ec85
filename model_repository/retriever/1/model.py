"""retriever: hnswlib neighbours of each prompt and their cached H-space features.

Inputs: pooled FP32 [D] (the text encoder's pooled, L2-normalised embedding: the retrieval key
the index was built with), k INT32 [1], strength FP32 [1] (NaN: the default) and prompt BYTES
[1] (the checked PROMPT: with the parameter rerank > k, the dense top ``rerank`` are re-ordered
by its words, as ``imageragturbo.runtime.request.retrieve`` does in-process) and seed INT64 [1]
(the request's noise seed: with the parameter pool > 1, the k neighbours are drawn from the
top k * pool by it) from preprocess. Outputs: h_retr FP32 [k, C, h', w'] (cached at index build time, so no UNet pass
here), lam FP32 [1] and the neighbours' ids, captions and cosine scores.

lam is what the h_adapter step takes: with an H-adapter, lambda = strength x top-1 similarity
(paper Eq. 5); without one (the slerp step), the neighbour's slerp weight 1 - w = strength
(paper Eq. 3). k = 0: no search, zero h_retr [1, ...], lam 0, no neighbours. The index is
loaded in initialize, so the model, and with it the server, is READY only once retrieval
works: its structure is checked against its manifest (file sizes, array shapes, counts,
dtypes) and its arrays are memory-mapped, not read, so the start does not grow with them; the
parameter verify = "true" adds the sha256 of every file (reads the whole index). A request
reads the k rows of h it injects and nothing else of the arrays (no neighbour latents: no
output carries them).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from imageragturbo.runtime.request import retrieval_controls, retrieve


class TritonPythonModel:
    def initialize(self, args):
        from imageragturbo.retriever import RetrievalIndex

        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.has_adapter = p["has_adapter"] == "true"
        self.h_shape = tuple(int(x) for x in p["h_shape"].split(","))
        ef = int(p["ef"]) if p.get("ef") else None
        self.rerank = int(p.get("rerank") or 0)
        self.pool = int(p.get("pool") or 1)
        path = Path(args["model_repository"]) / args["model_version"] / "index"
        self.index = RetrievalIndex.load(path, text_dim=int(p["text_dim"]), ef=ef,
                                         verify=p.get("verify", "false") == "true")
        cached = tuple(self.index.manifest["shapes"]["h"][1:])
        if cached != self.h_shape:
            raise ValueError(f"index {path} caches H-space features of shape {cached}; the "
                             f"UNet encoder gives {self.h_shape}: rebuild the index for it")

    def _one(self, request):
        pooled = pb_utils.get_input_tensor_by_name(request, "pooled").as_numpy()   # (B, D)
        k = int(pb_utils.get_input_tensor_by_name(request, "k").as_numpy().reshape(-1)[0])
        strength = pb_utils.get_input_tensor_by_name(request, "strength").as_numpy().reshape(-1)
        n = pooled.shape[0]
        if k == 0:
            h_retr = np.zeros((n, 1, *self.h_shape), np.float32)
            lam = np.zeros(n, np.float32)
            ids = np.zeros((n, 0), np.object_)
            caps = np.zeros((n, 0), np.object_)
            scores = np.zeros((n, 0), np.float32)
        else:
            prompts = [bytes(b).decode("utf-8") for b in pb_utils.get_input_tensor_by_name(
                request, "prompt").as_numpy().reshape(-1)]
            seeds = pb_utils.get_input_tensor_by_name(request, "seed").as_numpy().reshape(-1)
            h_retr, _, nb = retrieve(self.index, pooled, k, prompts, self.rerank,
                                     seeds.tolist(), self.pool)             # (B, k, C, h', w')
            lam = np.empty(n, np.float32)
            for b in range(n):
                s = None if np.isnan(strength[b]) else float(strength[b])
                lam_b, slerp_w = retrieval_controls(nb.scores[b:b + 1], s, self.has_adapter)
                lam[b] = lam_b[0] if lam_b is not None else 1.0 - slerp_w
            ids = np.array([[i.encode() for i in row] for row in nb.item_ids], np.object_)
            caps = np.array([[c.encode() for c in row] for row in nb.captions], np.object_)
            scores = nb.scores.astype(np.float32)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("h_retr", h_retr),
            pb_utils.Tensor("lam", lam.reshape(n, 1)),
            pb_utils.Tensor("NEIGHBOUR_IDS", ids),
            pb_utils.Tensor("NEIGHBOUR_CAPTIONS", caps),
            pb_utils.Tensor("NEIGHBOUR_SCORES", scores),
        ])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the batch
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"retriever: {e}")))
        return responses
