"""The pipeline's own encoders drive the real retriever: index build, query and cached
H-features, on an SD 2.1-layout model loaded from a diffusers folder."""

from __future__ import annotations

import numpy as np
import pytest

from imageragturbo import shapesworld as sw
from imageragturbo.model import family, load_retrieval_encoder
from imageragturbo.retriever import RetrievalIndex, build_index, shapesworld_pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retr")
    model = family.save_sd_folder(family.sd21_layout_tiny(), root / "model")
    data = sw.build_dataset(root / "data", {"retrieval": 24}, workers=1, progress=False)
    enc = load_retrieval_encoder(str(model))
    idx_path = build_index(shapesworld_pairs(data), enc, root / "index", progress=False)
    return enc, idx_path, data


def test_index_built_with_the_pipeline_encoder_returns_each_caption_as_its_own_top1(setup):
    enc, path, data = setup
    index = RetrievalIndex.load(path, model_id=enc.model_id, text_dim=enc.text_dim)
    recs = sw.load_manifest(data, "retrieval")
    caps = [r["caption"] for r in recs]
    q = enc.encode_text(caps)
    assert q.shape == (24, enc.text_dim)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    ids, scores = index.search(q, 1)
    # a caption's own item scores 1.0; a duplicate caption may tie
    assert np.allclose(scores[:, 0], 1.0, atol=2e-3)
    assert all(caps[i] == c for i, c in zip(ids[:, 0], caps))


def test_cached_h_equals_the_unet_encoder_at_t0_on_the_cached_latent(setup):
    """h_retr = f_enc(tau(p_retr), t=0, z_0_retr) (paper Sec. 3.2), with the reference taken
    from the diffusers UNet itself (its mid-block output in a full forward pass, caught by a
    hook), not from the encoder that built the index; and the tolerance is tight enough that
    another timestep or another item's caption would fail."""
    import torch

    from imageragturbo.model.pipeline import encode_prompt

    enc, path, data = setup
    index = RetrievalIndex.load(path, model_id=enc.model_id)
    caps = [r["caption"] for r in sw.load_manifest(data, "retrieval")]
    ids = np.array([0, 5])
    unet = enc.c.unet
    z = torch.from_numpy(index.latents(ids))                    # the cached z_0, fp16 -> fp32

    def mid_block_output(t, captions):
        got = []
        hook = unet.mid_block.register_forward_hook(lambda m, i, o: got.append(o))
        try:
            with torch.no_grad():
                unet(z, torch.full((len(z),), t), encoder_hidden_states=encode_prompt(
                    enc.c, captions)[0])
        finally:
            hook.remove()
        return got[0].float().numpy()

    ref = mid_block_output(0, [caps[0], caps[5]])
    tol = 2e-2 * np.abs(ref).max()                               # fp16 storage
    cached = index.h(ids)
    assert cached.shape == ref.shape
    assert np.abs(cached - ref).max() <= tol
    assert np.abs(mid_block_output(999, [caps[0], caps[5]]) - ref).max() > tol
    assert np.abs(mid_block_output(0, [caps[5], caps[0]]) - ref).max() > tol


def test_index_from_another_model_is_refused(setup, tmp_path):
    enc, path, _ = setup
    with pytest.raises(ValueError, match="model"):
        RetrievalIndex.load(path, model_id="tiny-shapes:000000000000")
