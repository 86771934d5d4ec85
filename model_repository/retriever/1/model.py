"""retriever: hnswlib neighbours of each prompt and their cached H-space features.

Inputs: pooled FP32 [D] (the text encoder's pooled, L2-normalised embedding: the retrieval key
the index was built with), k INT32 [1], strength FP32 [1] (NaN: the default) and prompt BYTES
[1] (the checked PROMPT: with the parameter rerank > k, the dense top ``rerank`` are re-ordered
by its words, as ``imageragturbo.runtime.request.retrieve`` does in-process) and seed INT64 [1]
(the request's noise seed: with the parameter pool > 1, the k neighbours are drawn from the
top k * pool by it) from preprocess. Outputs: h_retr FP32 [k, C, h', w'] (cached at index
build time, so no UNet pass here), lam FP32 [1], slerp_w FP32 [1] and the neighbours' ids,
captions and cosine scores.

Two injection controls, each with one meaning (``runtime.request.retrieval_controls``): lam,
the H-adapter's lambda = strength x top-1 similarity (paper Eq. 5; 0 without an adapter), and
slerp_w, the slerp step's target weight w = 1 - strength (paper Eq. 3; 1, keep the target,
with an adapter). start, start_t: where the one step begins, z_T (sample) at t (timestep)
passed through, or for a model trained with a neighbour start (the parameter start_timestep)
and k > 0, the top-1 neighbour's latent noised with z_T to that timestep
(``runtime.request.neighbour_start``: one latent row read per request). The ensemble hands the adapter step the one its mode uses. k = 0: no
search, zero h_retr [1, ...], lam 0, slerp_w 1, no neighbours. The index is
loaded in initialize, so the model, and with it the server, is READY only once retrieval
works: its structure is checked against its manifest (file sizes, array shapes, counts,
dtypes) and its arrays are memory-mapped, not read, so the start does not grow with them; the
parameter verify = "true" adds the sha256 of every file (reads the whole index). A request
reads the k rows of h it injects and nothing else of the arrays (no neighbour latents, but
the top-1's for a neighbour-start model).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from imageragturbo.client import contract as C
from imageragturbo.runtime.request import load_index, neighbour_start, retrieval_controls, retrieve


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.has_adapter = p["has_adapter"] == "true"
        self.h_shape = tuple(int(x) for x in p["h_shape"].split(","))
        ef = int(p["ef"]) if p.get("ef") else None
        self.rerank = int(p.get("rerank") or 0)
        self.pool = int(p.get("pool") or 1)
        self.start = ({"timestep": int(p["start_timestep"]),
                       "alpha_bar": float(p["start_alpha_bar"])}
                      if p.get("start_timestep") else None)
        path = Path(args["model_repository"]) / args["model_version"] / "index"
        self.index = load_index(path, int(p["text_dim"]), self.h_shape, ef=ef,
                                verify=p.get("verify", "false") == "true")
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
                       for o in cfg["output"]}

    def _one(self, request):
        def get(name):
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

        pooled = get(C.POOLED)                                               # (B, D)
        k = int(get(C.K_WIRE).reshape(-1)[0])
        strength = get(C.STRENGTH_WIRE).reshape(-1)
        n = pooled.shape[0]
        start, start_t = get(C.SAMPLE), get(C.TIMESTEP)      # z_T, t: passed through by default
        lam = np.zeros(n)                 # no adapter injection
        slerp_w = np.ones(n)              # slerp keeps the target
        if k == 0:
            h_retr = np.zeros((n, 1, *self.h_shape))
            ids = caps = np.zeros((n, 0), np.object_)
            scores = np.zeros((n, 0))
        else:
            prompts = [bytes(b).decode("utf-8") for b in get(C.PROMPT_WIRE).reshape(-1)]
            seeds = get(C.SEED_WIRE).reshape(-1)
            h_retr, _, nb = retrieve(self.index, pooled, k, prompts, self.rerank,
                                     seeds.tolist(), self.pool)             # (B, k, C, h', w')
            for b in range(n):
                s = None if np.isnan(strength[b]) else float(strength[b])
                lam_b, w_b = retrieval_controls(nb.scores[b:b + 1], s, self.has_adapter)
                if lam_b is not None:
                    lam[b] = lam_b[0]
                if w_b is not None:
                    slerp_w[b] = w_b
            ids = np.array([[i.encode() for i in row] for row in nb.item_ids], np.object_)
            caps = np.array([[c.encode() for c in row] for row in nb.captions], np.object_)
            scores = nb.scores
            if self.start is not None:    # a neighbour-start model: from the top-1 neighbour
                start = neighbour_start(self.index, nb.ids[:, 0], start, self.start)
                start_t = np.full_like(start_t, self.start["timestep"])
        values = {C.H_RETR: h_retr, C.LAM: lam.reshape(n, 1), C.SLERP_W: slerp_w.reshape(n, 1),
                  C.START: start, C.START_T: start_t,
                  C.NEIGHBOUR_IDS.name: ids, C.NEIGHBOUR_CAPTIONS.name: caps,
                  C.NEIGHBOUR_SCORES.name: scores}
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.asarray(a, dtype=self.dtypes[name]))
            for name, a in values.items()])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the batch
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{C.RETRIEVER}: {e}")))
        return responses

    def finalize(self):
        self.index = None
