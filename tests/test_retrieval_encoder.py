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
    enc, path, data = setup
    index = RetrievalIndex.load(path, model_id=enc.model_id)
    caps = [r["caption"] for r in sw.load_manifest(data, "retrieval")]
    ids = np.array([0, 5])
    lat = index.latents(ids)
    h = enc.h_features(lat.astype(np.float32), [caps[0], caps[5]])
    assert np.allclose(index.h(ids), h, atol=2e-2 * np.abs(h).max())  # fp16 storage


def test_index_from_another_model_is_refused(setup, tmp_path):
    enc, path, _ = setup
    with pytest.raises(ValueError, match="model"):
        RetrievalIndex.load(path, model_id="tiny-shapes:000000000000")
