"""A user's images as the model reads them (``imageragturbo.images``) and the readers of a user's
pairs and prompts (``training/sources.py``): EXIF orientation, greyscale, palette and alpha
to RGB, the centre crop, too-small and corrupt images as typed reasons; WebDataset shards
grouped by key, captions from .txt or .json, samples without image or caption reported."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from imageragturbo import images
from imageragturbo.training import sources


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied_before_the_crop():
    """A 40x20 JPEG, left half red and right half blue, tagged orientation 6 (the camera
    was turned: view it rotated 90 degrees clockwise): read as 20x40 with red on top."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", exif=exif, quality=95)
    im = images.decode(buf.getvalue())
    assert im.size == (40, 20)                          # as stored
    rgb = images.to_rgb(im)
    assert rgb.size == (20, 40)                         # as seen
    out = images.normalise(im, 16)                      # shorter side 20 -> 16, crop 16x16
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:6, :, 0].mean() > 200 and out[:6, :, 2].mean() < 60     # top: red
    assert out[-6:, :, 2].mean() > 200 and out[-6:, :, 0].mean() < 60   # bottom: blue


def test_greyscale_palette_and_16_bit_become_rgb():
    grey = Image.fromarray(np.full((30, 30), 90, np.uint8), "L")
    out = images.normalise(images.decode(_png(grey)), 30)
    assert out.shape == (30, 30, 3) and (out == 90).all()
    pal = Image.fromarray(np.full((30, 30, 3), (10, 200, 30), np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE)
    out = images.normalise(images.decode(_png(pal)), 30)
    assert np.abs(out.astype(int) - (10, 200, 30)).max() <= 2
    deep = Image.fromarray(np.full((30, 30), 65535, np.uint16))   # 16-bit white
    out = images.normalise(images.decode(_png(deep)), 30)
    assert (out == 255).all()


def test_transparency_is_composited_on_white():
    a = np.zeros((32, 32, 4), np.uint8)
    a[..., 0] = 255                                    # red everywhere ...
    a[8:24, 8:24, 3] = 255                             # ... opaque only in the middle
    out = images.normalise(images.decode(_png(Image.fromarray(a, "RGBA"))), 32)
    assert (out[0, 0] == 255).all()                    # transparent: white, not red or black
    assert tuple(out[16, 16]) == (255, 0, 0)
    # a palette image with a transparent index, and greyscale with alpha, alike
    p = Image.new("P", (32, 32), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (8, 8, 24, 24))
    out = images.normalise(images.decode(_png(p, transparency=0)), 32)
    assert (out[0, 0] == 255).all() and tuple(out[16, 16]) == (0, 255, 0)
    la = Image.fromarray(np.stack([np.zeros((32, 32), np.uint8),
                                   np.zeros((32, 32), np.uint8)], -1), "LA")
    assert (images.normalise(images.decode(_png(la)), 32) == 255).all()


def test_the_shorter_side_is_resized_and_the_centre_cropped():
    """200x100: left, middle and right thirds in three colours; at 50x50 the crop keeps the
    middle 100x100 of the original, so the outer colours are gone."""
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :50] = (255, 0, 0)
    a[:, 50:150] = (0, 255, 0)
    a[:, 150:] = (0, 0, 255)
    out = images.normalise(Image.fromarray(a), 50)
    assert out.shape == (50, 50, 3)
    assert (np.abs(out[:, 2:-2].astype(int) - (0, 255, 0)) <= 2).all()
    # a square image at the model's size is taken as it is (the ShapesWorld renders)
    sq = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(images.normalise(Image.fromarray(sq), 64), sq)
    # and a square one at another size is resized as the index build always did
    want = np.asarray(Image.fromarray(sq).resize((32, 32)))
    assert np.array_equal(images.normalise(Image.fromarray(sq), 32), want)


def test_too_small_corrupt_and_missing_images_raise_their_reason(tmp_path):
    small = Image.new("RGB", (90, 40))
    with pytest.raises(images.BadImage, match="too small: 90x40") as e:
        images.normalise(small, 64, min_side=48)
    assert e.value.reason == images.TOO_SMALL
    assert images.normalise(small, 64, min_side=40).shape == (64, 64, 3)  # upscaled
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    with pytest.raises(images.BadImage) as e:
        images.decode(buf.getvalue()[: len(buf.getvalue()) // 2], "half.jpg")
    assert e.value.reason == images.CORRUPT and "half.jpg" in str(e.value)
    with pytest.raises(images.BadImage) as e:
        images.decode(b"not an image at all")
    assert e.value.reason == images.CORRUPT
    with pytest.raises(images.BadImage) as e:
        images.read_bytes(tmp_path / "gone.jpg")
    assert e.value.reason == images.MISSING


def _shard(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_group_by_key_and_report_incomplete_samples(tmp_path):
    png = _png(Image.new("RGB", (8, 8), (9, 9, 9)))
    _shard(tmp_path / "s-000.tar", [
        ("a/0001.jpg", png), ("a/0001.txt", b"a grey square\n"),
        ("a/0002.png", png), ("a/0002.json", json.dumps({"caption": "from json"}).encode()),
        ("a/0003.txt", b"no image here"),
        ("a/0004.png", png), ("a/0004.json", b'{"url": "x"}'),
        ("a/0005.seg.png", png), ("a/0005.png", png), ("a/0005.txt", b"several dots"),
    ])
    _shard(tmp_path / "s-001.tar", [("0006.webp", png), ("0006.txt", b"second shard")])
    files = sources.expand(str(tmp_path / "s-{000..001}.tar"))
    assert files == [str(tmp_path / "s-000.tar"), str(tmp_path / "s-001.tar")]
    items, bad = sources.list_pairs(files)
    assert [(it.id, it.caption, it.image) for it in items] == [
        ("a/0001", "a grey square", "a/0001.jpg"), ("a/0002", "from json", "a/0002.png"),
        ("a/0005", "several dots", "a/0005.png"), ("0006", "second shard", "0006.webp")]
    assert [(b["id"], b["reason"]) for b in bad] == [("a/0003", "missing"),
                                                     ("a/0004", "no caption")]
    assert bad[0]["image"] == f"{tmp_path / 's-000.tar'}:a/0003.*"
    got = list(sources.load_images(items, 4, 0))
    assert [it.id for it, _, _ in got] == [it.id for it in items]
    assert all(a.shape == (4, 4, 3) and d == images.content_hash(png) for _, a, d in got)


def test_jsonl_pairs_get_file_row_ids_and_prompts_read_from_text_or_jsonl(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"caption": "one", "image": "x.png"}) + "\n"
        + json.dumps({"caption": " ", "image": "y.png", "id": "b"}) + "\n"
        + json.dumps({"caption": "three", "image": "z.png", "id": "c"}) + "\n")
    items, bad = sources.list_pairs([str(tmp_path / "p.jsonl")])
    assert [it.id for it in items] == ["p.jsonl:0", "c"]
    assert items[0].image == str(tmp_path / "x.png")
    assert [(b["id"], b["reason"]) for b in bad] == [("b", "no caption")]
    (tmp_path / "dup.jsonl").write_text(json.dumps({"caption": "c", "image": "q.png",
                                                    "id": "c"}) + "\n")
    with pytest.raises(ValueError, match="'c' appears twice"):
        sources.list_pairs([str(tmp_path / "p.jsonl"), str(tmp_path / "dup.jsonl")])
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue star  \n")
    assert sources.read_prompts(tmp_path / "p.txt") == ["a red circle", "a blue star"]
    (tmp_path / "q.jsonl").write_text('{"prompt": "x"}\n{"caption": "y"}\n')
    assert sources.read_prompts(tmp_path / "q.jsonl") == ["x", "y"]
    (tmp_path / "r.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="r.jsonl:1"):
        sources.read_prompts(tmp_path / "r.jsonl")
