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
        folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        # The same tokenizer class and call as the in-process OnnxPipeline.
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)

    # ------------------------------------------------------------------ validation

    def _prompts(self, request):
        t = pb_utils.get_input_tensor_by_name(request, "PROMPT")
        if t is None:
            raise RequestError("PROMPT is required")
        raw = t.as_numpy().reshape(-1)
        prompts = []
        for i, b in enumerate(raw):
            if isinstance(b, str):
                s = b
            else:
                try:
                    s = bytes(b).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RequestError(f"PROMPT[{i}] is not valid UTF-8 text ({e.reason} at byte "
                                       f"{e.start})") from None
            if not s.strip():
                raise RequestError(f"PROMPT[{i}] is empty: give a text prompt")
            if len(s) > self.max_prompt_chars:
                raise RequestError(f"PROMPT[{i}] has {len(s)} characters; at most "
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
        seeds = self._optional(request, "SEED", n)
        if seeds is None:
            seeds = np.array([secrets.randbits(63) for _ in range(n)], dtype=np.int64)
        elif (seeds < 0).any():
            raise RequestError(f"SEED must be >= 0, got {int(seeds.min())}")
        ks = self._optional(request, "K", n)
        if ks is None:
            k = self.default_k
        else:
            if (ks != ks[0]).any():
                raise RequestError(f"K must be the same for every prompt of a request, got "
                                   f"{sorted(set(ks.tolist()))}")
            k = int(ks[0])
            if not 0 <= k <= self.max_k:
                raise RequestError(f"K must be in [0, {self.max_k}] (0 = no retrieval), got {k}")
        strength = self._optional(request, "STRENGTH", n)
        if strength is None:
            strength = np.full(n, np.nan, dtype=np.float32)  # NaN: the default strength
        else:
            if not np.isfinite(strength).all():
                raise RequestError("STRENGTH must be a finite number")
            for s in strength:
                try:
                    retrieval_controls(np.ones((1, 1), np.float32), float(s), self.has_adapter)
                except ValueError as e:
                    raise RequestError(f"STRENGTH: {e}") from None
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
            ids = self.tokenizer(prompts, padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="np").input_ids
            z = initial_noise(seeds.tolist(), self.latent_shape)            # (B, C, h, w)
            out = [
                pb_utils.Tensor("input_ids", ids.astype(np.int64)),         # (B, 77)
                pb_utils.Tensor("sample", z.astype(np.float32)),
                pb_utils.Tensor("timestep", np.full((n, 1), self.timestep, np.int64)),
                pb_utils.Tensor("k", np.full((n, 1), k, np.int32)),
                pb_utils.Tensor("strength", strength.reshape(n, 1)),
                pb_utils.Tensor("seed", seeds.reshape(n, 1)),
                # the checked text, for the retriever's lexical re-ranking
                pb_utils.Tensor("prompt", np.array([p.encode() for p in prompts],
                                                   np.object_).reshape(n, 1)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=out))
        return responses
