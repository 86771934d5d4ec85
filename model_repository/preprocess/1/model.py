"""preprocess: check each request, tokenize PROMPT, draw z_T from SEED.

Inputs (batch axis first): PROMPT BYTES [1] (UTF-8, non-empty), SEED INT64 [1] (optional,
>= 0; a random seed per item when absent, returned as SEED_USED), K INT32 [1] (optional,
neighbours to retrieve, 0 = no retrieval, the same for every item of a request) and STRENGTH
FP32 [1] (optional: the H-adapter's lambda scale, >= 0, or the slerp weight of the neighbour
in [0, 1] for a model without one; 0 = retrieve but do not inject; absent = the default, as
``imageragturbo.runtime.request.retrieval_controls``).

A bad request gets an INVALID_ARG error that says what is wrong; the other requests of the
same batch are served. One response per request, in order.
"""

import json
import secrets
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from imageragturbo.client import contract as C
from imageragturbo.runtime.request import initial_noise, retrieval_controls


class RequestError(ValueError):
    """A request the model rejects with INVALID_ARG."""


class TritonPythonModel:
    def initialize(self, args):
        from transformers import CLIPTokenizer

        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.max_length = int(p["max_length"])
        self.latent_shape = tuple(int(x) for x in p["latent_shape"].split(","))
        self.timestep = int(p["timestep"])
        self.default_k = int(p["default_k"])
        self.max_k = int(p["max_k"])
        self.has_adapter = p["has_adapter"] == "true"
        self.max_prompt_chars = int(p["max_prompt_chars"])
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
                       for o in cfg["output"]}
        folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        # The same tokenizer class and call as the in-process OnnxPipeline.
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)

    # ------------------------------------------------------------------ validation

    def _prompts(self, request):
        t = pb_utils.get_input_tensor_by_name(request, C.PROMPT.name)
        if t is None:
            raise RequestError(f"{C.PROMPT.name} is required")
        raw = t.as_numpy().reshape(-1)
        prompts = []
        for i, b in enumerate(raw):
            if isinstance(b, str):
                s = b
            else:
                try:
                    s = bytes(b).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RequestError(f"{C.PROMPT.name}[{i}] is not valid UTF-8 text "
                                       f"({e.reason} at byte {e.start})") from None
            if not s.strip():
                raise RequestError(f"{C.PROMPT.name}[{i}] is empty: give a text prompt")
            if len(s) > self.max_prompt_chars:
                raise RequestError(f"{C.PROMPT.name}[{i}] has {len(s)} characters; at most "
                                   f"{self.max_prompt_chars} are accepted")
            prompts.append(s)
        return prompts

    @staticmethod
    def _optional(request, name, n):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            return None
        a = t.as_numpy().reshape(-1)
        if a.shape[0] != n:
            raise RequestError(f"{name} has {a.shape[0]} values for {n} prompts")
        return a

    def _parse(self, request):
        prompts = self._prompts(request)
        n = len(prompts)
        seeds = self._optional(request, C.SEED.name, n)
        if seeds is None:
            seeds = np.array([secrets.randbits(63) for _ in range(n)], dtype=np.int64)
        elif (seeds < 0).any():
            raise RequestError(f"{C.SEED.name} must be >= 0, got {int(seeds.min())}")
        ks = self._optional(request, C.K.name, n)
        if ks is None:
            k = self.default_k
        else:
            if (ks != ks[0]).any():
                raise RequestError(f"{C.K.name} must be the same for every prompt of a "
                                   f"request, got {sorted(set(ks.tolist()))}")
            k = int(ks[0])
            if not 0 <= k <= self.max_k:
                raise RequestError(f"{C.K.name} must be in [0, {self.max_k}] (0 = no "
                                   f"retrieval), got {k}")
        strength = self._optional(request, C.STRENGTH.name, n)
        if strength is None:
            strength = np.full(n, np.nan, dtype=np.float32)  # NaN: the default strength
        else:
            if not np.isfinite(strength).all():
                raise RequestError(f"{C.STRENGTH.name} must be a finite number")
            for s in strength:
                try:
                    retrieval_controls(np.ones((1, 1), np.float32), float(s), self.has_adapter)
                except ValueError as e:
                    raise RequestError(f"{C.STRENGTH.name}: {e}") from None
        return prompts, seeds.astype(np.int64), k, strength.astype(np.float32)

    # ------------------------------------------------------------------ execute

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prompts, seeds, k, strength = self._parse(request)
            except RequestError as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
                continue
            n = len(prompts)
            ids = C.tokenize(self.tokenizer, prompts, self.max_length)      # (B, L)
            z = initial_noise(seeds.tolist(), self.latent_shape)            # (B, C, h, w)
            values = {
                C.INPUT_IDS: ids,
                C.SAMPLE: z,
                C.TIMESTEP: np.full((n, 1), self.timestep),
                C.K_WIRE: np.full((n, 1), k),
                C.STRENGTH_WIRE: strength.reshape(n, 1),
                C.SEED_WIRE: seeds.reshape(n, 1),
                # the checked text, for the retriever's lexical re-ranking
                C.PROMPT_WIRE: np.array([p.encode() for p in prompts], np.object_).reshape(n, 1),
            }
            out = [pb_utils.Tensor(name, np.asarray(a, dtype=self.dtypes[name]))
                   for name, a in values.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=out))
        return responses

    def finalize(self):
        self.tokenizer = None
