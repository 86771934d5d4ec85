"""The five-stage contract, written once: the names every part of ImageRAGTurbo agrees on.

Standard library only, and importable without running the SDK (``client/__init__`` loads the
SDK lazily), so export and training code, which install without tritonclient, import it too.
It lives in ``client/`` because the slim distribution ``imageragturbo-client`` is built from
that folder alone; installed as ``imageragturbo.client.contract`` (main distribution) and
``imageragturbo_client.contract`` (slim).

What it fixes:

- the five ONNX stages, in request order (``STAGES``), each stage's input and output tensor
  names in the graph's positional order (``stage_inputs`` / ``stage_outputs``), the skip
  connections' names (``skip_name``), the dynamic axes (``dynamic_axes``);
- the one chain of the stages (``one_step``): every in-process runner (ONNX Runtime with numpy
  or with IO binding, PyTorch eager, the training forward) calls it, so the stages are chained
  in one place; the served ensemble's wiring (``ensemble_steps``) is the same chain as data;
- the served ensemble: its name (``ENSEMBLE_NAME``), its public inputs and outputs (the
  service contract, docs/service-contract.md) and the composing models;
- the tokenizer call (``tokenize``) and the retrieval index's h-shape check
  (``check_h_shape``).

Users: ``imageragturbo.export`` (names, dynamic axes), ``imageragturbo.model.stages`` and
``export.gpu_bench`` (the chain over torch modules), ``imageragturbo.runtime`` (the chain over
ONNX Runtime, the tokenizer call, the h-shape check), the Triton backends in
``model_repository/*/1/model.py``, the repository renderer (``serving.repository``) and the
SDK (``sdk.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

# ----------------------------------------------------------------------------- the stages

TEXT_ENCODER = "text_encoder"
UNET_ENCODER = "unet_encoder"
H_ADAPTER = "h_adapter"
UNET_DECODER = "unet_decoder"
VAE_DECODER = "vae_decoder"
STAGES = (TEXT_ENCODER, UNET_ENCODER, H_ADAPTER, UNET_DECODER, VAE_DECODER)
# Training-free injection (paper Eq. 3) in place of the H-adapter: no graph; in process a NumPy
# function, served as a Python model (model_repository/h_slerp) under the adapter's step.
H_SLERP = "h_slerp"

# Tensor names of the ONNX stages (the graphs' input and output names).
INPUT_IDS = "input_ids"                      # text_encoder in: token ids (B, L) int64
LAST_HIDDEN_STATE = "last_hidden_state"      # text_encoder out: text states (B, L, D)
POOLED = "pooled"                            # text_encoder out: retrieval key (B, D)
SAMPLE = "sample"                            # z_T (B, 4, h, w)
TIMESTEP = "timestep"                        # t (B,) int64
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
H = "h"                                      # the UNet encoder's mid-block feature
TEMB = "temb"
H_TGT = "h_tgt"                              # the adapter's h in
H_RETR = "h_retr"                            # the neighbours' cached h (B, k, C, h', w')
LAM = "lam"                                  # the adapter's lambda (B,) (paper Eq. 5)
SLERP_W = "slerp_w"                          # slerp's target weight w (B,) (paper Eq. 3)
Z0 = "z0"
LATENTS = "latents"
IMAGE = "image"                              # the VAE decoder's float image (B, 3, H, W)

SKIP_PREFIX = "skip_"

# The dynamic axes' names (ONNX Runtime's free-dimension overrides use them).
BATCH_AXIS = "batch"
K_AXIS = "k"


def skip_name(i: int) -> str:
    """The UNet encoder's i-th skip connection, as the encoder outputs and the decoder takes it."""
    return f"{SKIP_PREFIX}{int(i)}"


def skip_names(num_skips: int) -> list[str]:
    return [skip_name(i) for i in range(int(num_skips))]


def stage_inputs(stage: str, num_skips: int = 0) -> list[str]:
    """A stage's input names in its graph's (and its torch module's) positional order."""
    table = {
        TEXT_ENCODER: [INPUT_IDS],
        UNET_ENCODER: [SAMPLE, TIMESTEP, ENCODER_HIDDEN_STATES],
        H_ADAPTER: [H_TGT, H_RETR, LAM],
        H_SLERP: [H_TGT, H_RETR, SLERP_W],
        UNET_DECODER: [H, TEMB, *skip_names(num_skips), ENCODER_HIDDEN_STATES, SAMPLE, TIMESTEP],
        VAE_DECODER: [LATENTS],
    }
    return table[stage]


def stage_outputs(stage: str, num_skips: int = 0) -> list[str]:
    """A stage's output names in order."""
    table = {
        TEXT_ENCODER: [LAST_HIDDEN_STATE, POOLED],
        UNET_ENCODER: [H, TEMB, *skip_names(num_skips)],
        H_ADAPTER: [H],
        H_SLERP: [H],
        UNET_DECODER: [Z0],
        VAE_DECODER: [IMAGE],
    }
    return table[stage]


def dynamic_axes(stage: str, num_skips: int = 0) -> dict[str, dict[int, str]]:
    """The export's dynamic axes of a stage: the batch axis of every tensor, and the neighbour
    axis of h_retr."""
    names = stage_inputs(stage, num_skips) + stage_outputs(stage, num_skips)
    return {n: ({0: BATCH_AXIS, 1: K_AXIS} if n == H_RETR else {0: BATCH_AXIS}) for n in names}


def num_skips_of(encoder_outputs: Sequence[str]) -> int:
    """How many skips a UNet encoder's output names carry (h and temb first)."""
    return sum(1 for n in encoder_outputs if n.startswith(SKIP_PREFIX))


# ----------------------------------------------------------------------------- the chain

Run = Callable[..., Sequence[Any]]


def one_step(run: Run, sample, timestep, *, ids=None, ehs=None, h_retr=None, lam=None,
             slerp_w=None, edit: Callable[[Any], Any] | None = None, decoder_ehs=None,
             decode: bool = True):
    """The one-step model as a chain of the stages (docs/design.md, "The request path"): the
    only place the stages are chained, whatever runs them.

    ``run(stage, *inputs)`` runs one stage on its inputs in ``stage_inputs`` order and returns
    its outputs in ``stage_outputs`` order (a sequence, also for one output). The values are
    whatever the runner uses (numpy arrays, OrtValues, torch tensors); this function only
    routes them.

    Text: ``ids`` (the text encoder runs) or ``ehs`` (given). Injection into h, at most one:
    ``h_retr`` with ``lam`` (the H-adapter stage, paper Eq. 5), ``h_retr`` with ``slerp_w``
    (the ``H_SLERP`` step, paper Eq. 3: the runner computes it), or ``edit(h)`` (any function,
    for training). ``decoder_ehs``: what the UNet decoder cross-attends to instead of ``ehs``.
    Returns (image, z0), image None when not ``decode``.
    """
    if (ids is None) == (ehs is None):
        raise ValueError("give exactly one of ids (token ids) and ehs (text states)")
    if ehs is None:
        ehs, _pooled = run(TEXT_ENCODER, ids)
    h, temb, *skips = run(UNET_ENCODER, sample, timestep, ehs)
    if edit is not None:
        h = edit(h)
    elif h_retr is not None and slerp_w is not None:
        (h,) = run(H_SLERP, h, h_retr, slerp_w)
    elif h_retr is not None:
        if lam is None:
            raise ValueError("the H-adapter needs lam (B,): the retrieval similarity")
        (h,) = run(H_ADAPTER, h, h_retr, lam)
    (z0,) = run(UNET_DECODER, h, temb, *skips, ehs if decoder_ehs is None else decoder_ehs,
                sample, timestep)
    if not decode:
        return None, z0
    (image,) = run(VAE_DECODER, z0)
    return image, z0


def named(stage: str, args: Sequence, num_skips: int) -> dict[str, Any]:
    """A ``run`` call's positional inputs as {input name: value} (an ONNX Runtime feed)."""
    names = stage_inputs(stage, num_skips)
    if len(names) != len(args):
        raise ValueError(f"{stage} takes {len(names)} inputs ({', '.join(names)}), "
                         f"got {len(args)}")
    return dict(zip(names, args))


# ----------------------------------------------------------------------------- tokenizer


def tokenize(tokenizer, prompts: Sequence[str], max_length: int | None = None,
             return_tensors: str = "np"):
    """The token ids of ``prompts`` (B, L): padded to and truncated at the context length L
    (``max_length``, default the tokenizer's ``model_max_length``), as every stage was exported
    and trained with. ``return_tensors``: "np" or "pt"."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    n = int(tokenizer.model_max_length if max_length is None else max_length)
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=n,
                     return_tensors=return_tensors).input_ids


# ----------------------------------------------------------------------------- the index


def check_h_shape(cached: Sequence[int], expected: Sequence[int], where: object,
                  error: type[Exception] = ValueError) -> None:
    """A retrieval index caches the UNet encoder's h per item, (C, h', w'): it must be this
    model's, or the injected features would not fit (rebuild the index)."""
    cached, expected = tuple(int(x) for x in cached), tuple(int(x) for x in expected)
    if cached != expected:
        raise error(f"index {where} caches H-space features of shape {cached}; this model's "
                    f"UNet encoder gives {expected}: rebuild the index for it")


# ----------------------------------------------------------------------------- the ensemble

ENSEMBLE_NAME = "imageragturbo"   # the served ensemble's model name (not a model variant)
PREPROCESS = "preprocess"
RETRIEVER = "retriever"
POSTPROCESS = "postprocess"
PYTHON_MODELS = (PREPROCESS, RETRIEVER, POSTPROCESS)


class Tensor(NamedTuple):
    """A public tensor of the ensemble: name, Triton dtype (as tritonclient spells it)."""

    name: str
    dtype: str


# Public inputs and outputs (docs/service-contract.md). Every input is [B, 1] and optional in
# the ensemble's config (PROMPT is required by preprocess, which says so).
PROMPT = Tensor("PROMPT", "BYTES")
SEED = Tensor("SEED", "INT64")
K = Tensor("K", "INT32")
STRENGTH = Tensor("STRENGTH", "FP32")
ENSEMBLE_INPUTS = (PROMPT, SEED, K, STRENGTH)
IMAGE_OUT = Tensor("IMAGE", "UINT8")                      # [B, H, W, 3]
NEIGHBOUR_IDS = Tensor("NEIGHBOUR_IDS", "BYTES")          # [B, K]
NEIGHBOUR_CAPTIONS = Tensor("NEIGHBOUR_CAPTIONS", "BYTES")  # [B, K]
NEIGHBOUR_SCORES = Tensor("NEIGHBOUR_SCORES", "FP32")     # [B, K]
SEED_USED = Tensor("SEED_USED", "INT64")                  # [B, 1]
ENSEMBLE_OUTPUTS = (IMAGE_OUT, NEIGHBOUR_IDS, NEIGHBOUR_CAPTIONS, NEIGHBOUR_SCORES, SEED_USED)

# Internal tensors between the Python models and the stages (not part of the service contract).
K_WIRE = "k"                  # preprocess -> retriever: neighbours to retrieve (int32)
STRENGTH_WIRE = "strength"    # preprocess -> retriever: STRENGTH, NaN for the default
SEED_WIRE = "seed"            # preprocess out: the seed used
PROMPT_WIRE = "prompt"        # preprocess -> retriever: the checked text, for re-ranking
Z_T = "z_T"                   # the ensemble's name for z_T (the stages call it sample)
# retriever -> the UNet stages: where the one step starts. z_T at t (passed through), or, for a
# model trained with a neighbour start (``neighbour_init``, beyond the paper), the top-1
# neighbour's latent noised with z_T to that model's start timestep (when k > 0).
START = "start"
START_T = "start_t"
EHS = "ehs"                   # the ensemble's name for the text states

PYTHON_MODEL_IO = {
    PREPROCESS: ([t.name for t in ENSEMBLE_INPUTS],
                 [INPUT_IDS, SAMPLE, TIMESTEP, K_WIRE, STRENGTH_WIRE, SEED_WIRE, PROMPT_WIRE]),
    RETRIEVER: ([POOLED, K_WIRE, STRENGTH_WIRE, PROMPT_WIRE, SEED_WIRE, SAMPLE, TIMESTEP],
                [H_RETR, LAM, SLERP_W, START, START_T, NEIGHBOUR_IDS.name,
                 NEIGHBOUR_CAPTIONS.name, NEIGHBOUR_SCORES.name]),
    POSTPROCESS: ([IMAGE], [IMAGE_OUT.name]),
}


class Step(NamedTuple):
    """One ensemble step: the composing model, {its input: ensemble tensor}, {its output:
    ensemble tensor}."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


# Ensemble tensors named other than the stage output that writes them.
_WIRE = {(TEXT_ENCODER, LAST_HIDDEN_STATE): EHS, (UNET_ENCODER, H): H_TGT}


def ensemble_steps(num_skips: int, adapter: bool = True) -> list[Step]:
    """The served ensemble's steps, in order: ``one_step``'s chain, traced with tensor names
    for values, between the Python models. ``adapter``: the H-adapter graph takes lam;
    otherwise the slerp model takes slerp_w, served under the adapter's step name
    (``H_ADAPTER``), so the steps keep their names in both modes."""
    same = lambda *names: {n: n for n in names}  # noqa: E731
    stages: list[Step] = []

    def trace(stage: str, *args: str) -> list[str]:
        outs = {o: _WIRE.get((stage, o), o) for o in stage_outputs(stage, num_skips)}
        stages.append(Step(H_ADAPTER if stage == H_SLERP else stage,
                           named(stage, args, num_skips), outs))
        return list(outs.values())

    inject = {LAM: LAM} if adapter else {SLERP_W: SLERP_W}
    one_step(trace, START, START_T, ids=INPUT_IDS, h_retr=H_RETR, **inject)
    retriever_in = {POOLED: POOLED, K_WIRE: K_WIRE, STRENGTH_WIRE: STRENGTH_WIRE,
                    PROMPT_WIRE: PROMPT_WIRE, SEED_WIRE: SEED_USED.name, SAMPLE: Z_T,
                    TIMESTEP: TIMESTEP}
    neighbours = same(NEIGHBOUR_IDS.name, NEIGHBOUR_CAPTIONS.name, NEIGHBOUR_SCORES.name)
    return [
        Step(PREPROCESS, same(*(t.name for t in ENSEMBLE_INPUTS)),
             {INPUT_IDS: INPUT_IDS, SAMPLE: Z_T, TIMESTEP: TIMESTEP, K_WIRE: K_WIRE,
              STRENGTH_WIRE: STRENGTH_WIRE, SEED_WIRE: SEED_USED.name,
              PROMPT_WIRE: PROMPT_WIRE}),
        stages[0],                                                     # text_encoder
        Step(RETRIEVER, retriever_in, {H_RETR: H_RETR, **inject, START: START,
                                       START_T: START_T, **neighbours}),
        *stages[1:],                                                   # unet_encoder .. vae
        Step(POSTPROCESS, same(IMAGE), {IMAGE_OUT.name: IMAGE_OUT.name}),
    ]
