"""Unit tests of the data contracts: shards, npz, images, sparse probabilities, recipes, manifests."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, photo, png_bytes, png_header_claiming, write_shard
from PIL import Image

from reinforge.formats.arrays import load_npz, npz_bytes
from reinforge.formats.recipe import ConfigError, config_digest
from reinforge.products.registry import load_recipe, parse_recipe
from reinforge.formats.image import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from reinforge.formats.imagenet_plus import (ReinforcedSample, SchemaError, decode_probs, decode_sample, densify, encode_probs, encode_sample, sparsify)
from reinforge.io.manifest import OutputFile, StageStats, TaskManifest
from reinforge.formats.wds import ShardReadError, ShardWriter, iter_samples, split_member_name


def test_shard_writer_is_byte_deterministic_and_groups_by_key(tmp_path):
    samples = [("a", {"jpg": b"1", "cls": b"0"}), ("dir/b", {"jpg": b"22", "paug.json": b"[]"})]
    write_shard(tmp_path / "x.tar", samples)
    write_shard(tmp_path / "y.tar", samples)
    assert (tmp_path / "x.tar").read_bytes() == (tmp_path / "y.tar").read_bytes()
    with open(tmp_path / "x.tar", "rb") as f:
        read = list(iter_samples(f))
    assert read == [{"__key__": "a", "jpg": b"1", "cls": b"0"}, {"__key__": "dir/b", "jpg": b"22", "paug.json": b"[]"}]
    assert split_member_name("d/k.paug.json") == ("d/k", "paug.json")
    with pytest.raises(ValueError, match="dot"):
        ShardWriter(io.BytesIO()).write("a.b", {"jpg": b""})


def test_truncated_tar_and_links_are_reported(tmp_path):
    write_shard(tmp_path / "x.tar", [(f"k{i}", {"jpg": bytes(3000)}) for i in range(4)])
    data = (tmp_path / "x.tar").read_bytes()
    with pytest.raises(ShardReadError, match="unreadable tar"):
        list(iter_samples(io.BytesIO(data[:5000])))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("s.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    buf.seek(0)
    [sample] = list(iter_samples(buf))
    assert sample["__error__"][0] == "unreadable_member"


def test_npz_is_deterministic_and_loads_with_numpy():
    arrays = {"values": np.arange(6, dtype=np.float16).reshape(2, 3), "ids": np.arange(6, dtype=np.int16).reshape(2, 3)}
    a, b = npz_bytes(arrays), npz_bytes(arrays)
    assert a == b
    loaded = np.load(io.BytesIO(a))
    assert loaded["values"].dtype == np.float16 and np.array_equal(loaded["ids"], arrays["ids"])
    assert set(load_npz(a)) == {"values", "ids"}


def test_decode_handles_modes_and_rejects_bad_images():
    rgb = decode_rgb(jpeg_bytes(photo(0)))
    assert rgb.dtype == torch.uint8 and rgb.shape[0] == 3
    assert decode_rgb(jpeg_bytes(Image.new("CMYK", (8, 8)))).shape == (3, 8, 8)
    assert decode_rgb(png_bytes(photo(1).convert("L"))).shape[0] == 3
    transparent = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert decode_rgb(png_bytes(transparent))[:, 0, 0].tolist() == [200, 100, 50]  # alpha dropped, as default_loader
    deep = Image.fromarray(np.array([[0, 100, 255, 256, 65535]], dtype=np.uint16))  # I;16: clipped, as default_loader
    assert decode_rgb(png_bytes(deep))[0, 0].tolist() == [0, 100, 255, 255, 255]
    for data, reason in [(b"", "empty_image"), (b"garbage", "corrupt_image"),
                         (jpeg_bytes(photo(0))[:300], "corrupt_image"),
                         (png_header_claiming(20000, 20000), "image_too_large")]:
        with pytest.raises(ImageDecodeError) as info:
            decode_rgb(data)
        assert info.value.reason == reason


def test_max_image_pixels_is_the_limit_above_and_below_pils_own():
    """The recipe's limit, not PIL's MAX_IMAGE_PIXELS (89.5 MP; an error above 2x that), decides, from the
    header. A header claiming 10000x9500 (95 MP) with its pixel data missing: past the limit check it fails
    to decode (corrupt_image), before it is image_too_large. (A real 95 MP decode needs ~1.7 GB and ~5 s
    here; the real-pixel case below moves PIL's limit under a small photo instead.)"""
    def reason(data: bytes, limit: int) -> str:
        with pytest.raises(ImageDecodeError) as info:
            decode_rgb(data, limit)
        return info.value.reason

    assert Image.MAX_IMAGE_PIXELS < 95_000_000 < 2 * Image.MAX_IMAGE_PIXELS < 200_000_000
    claims_95mp, claims_190mp = png_header_claiming(10000, 9500), png_header_claiming(19000, 10000)
    assert reason(claims_95mp, 200_000_000) == "corrupt_image"  # PIL's 89.5 MP no longer caps it
    assert reason(claims_190mp, 200_000_000) == "corrupt_image"  # nor its 179 MP hard error
    assert reason(claims_95mp, 94_999_999) == "image_too_large"
    assert reason(claims_95mp, DEFAULT_MAX_PIXELS) == "image_too_large"
    small = jpeg_bytes(photo(0, 40))
    assert reason(small, 40 * 40 - 1) == "image_too_large"  # below PIL's default too
    assert decode_rgb(small, 40 * 40).shape == (3, 40, 40)
    with pytest.raises(Image.DecompressionBombError):  # outside decode_rgb PIL's own check is untouched
        Image.open(io.BytesIO(claims_190mp))


def test_max_image_pixels_above_pils_limit_decodes_real_pixels(monkeypatch):
    """A real photo over PIL's limit (lowered here to 1000 pixels, so that 9216 is over twice it) decodes
    to default_loader's pixels when the recipe allows it."""
    data = png_bytes(photo(2, 96))
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert torch.equal(decode_rgb(data, 96 * 96 + 96 * 16), expected)


def test_max_image_pixels_is_per_thread(monkeypatch):
    """Concurrent decodes with different limits each see their own (the limit is thread-local). PIL's limit
    is lowered to 1000 pixels so that a 100x100 header is over it and allocations stay tiny."""
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    claims_10k = png_header_claiming(100, 100)

    def reason(limit: int) -> str:
        try:
            decode_rgb(claims_10k, limit)
        except ImageDecodeError as exc:
            return exc.reason
        return "decoded"

    limits = [20_000, 5_000] * 500
    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(reason, limits))
    assert reasons == ["corrupt_image", "image_too_large"] * 500


def test_sparse_probabilities_roundtrip_and_densify():
    probs = torch.softmax(torch.randn(5, 100), -1)
    values, ids = sparsify(probs, 10)
    v, i = decode_probs(encode_probs(values, ids, 100))
    assert v.shape == (5, 10) and np.array_equal(i, ids)
    np.testing.assert_allclose(v, values, rtol=1e-3)
    dense = densify(v[0], i[0], 100)
    assert dense.shape == (100,) and abs(float(dense.sum()) - 1) < 1e-5
    rest = 1 - v[0].sum()
    others = [c for c in range(100) if c not in set(i[0].tolist())]
    np.testing.assert_allclose(dense[others].numpy(), rest / 90, rtol=1e-4)
    assert encode_probs(values, ids, 40000)  # int32 ids beyond int16's range
    assert load_npz(encode_probs(values, ids, 40000))["ids"].dtype == np.int32


def test_sample_layout_roundtrip_and_errors():
    values, ids = sparsify(torch.softmax(torch.randn(2, 10), -1), 3)
    sample = ReinforcedSample("k1", "jpg", b"\xff\xd8jpeg", 3, [[[0, 0, 5, 5]], [[1, 1, 4, 4]]], values, ids, {"height": 5})
    members = encode_sample(sample, 10)
    assert list(members) == ["jpg", "cls", "json", "paug.json.gz", "prob.npz"]
    back = decode_sample({"__key__": "k1", **members})
    assert back.label == 3 and back.entries == sample.entries and back.meta["sha256"]
    plain = encode_sample(sample, 10, compress_params=False)
    assert "paug.json" in plain and decode_sample({"__key__": "k1", **plain}).entries == sample.entries
    assert encode_sample(sample, 10) == members  # deterministic bytes (gzip without a timestamp)
    del members["prob.npz"]
    with pytest.raises(SchemaError, match="prob.npz"):
        decode_sample({"__key__": "k1", **members})


RECIPE = """
product: imagenet_plus
output: /tmp/x
input: {format: webdataset, path: "/data/shard-{0..3}.tar"}
augmentation:
  num_samples: 4
  image_augmentation: {random_resized_crop: {size: 32}, random_horizontal_flip: {p: 0.5}}
teachers: [{model: resnet10t, num_classes: 10}]
"""


def test_recipe_validation_names_the_field():
    recipe = load_recipe(RECIPE, ("teachers.0.batch_size=8", "top_k=5"))
    assert recipe.teachers[0].batch_size == 8 and recipe.top_k == 5
    for overrides, expected in [
        (("teachers.0.batch_size=-1",), "config error: teachers.0.batch_size: Input should be greater than or equal to 1"),
        (("teachers.3.batch_size=1",), "no list index '3'"),
        (("tpo_k=3",), "config error: tpo_k: Extra inputs are not permitted"),
        (("input.format=csv",), "config error: input.format"),
        (("augmentation.image_augmentation.random_blur={p: 1}",), "random_blur"),
    ]:
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_recipe(RECIPE, overrides)
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe("a: [1,")
    with pytest.raises(ConfigError, match="product"):
        parse_recipe({"product": "nope"})


def test_digest_ignores_output_and_resources_only():
    base = load_recipe(RECIPE)
    assert config_digest(base) == config_digest(load_recipe(RECIPE, ("output=/elsewhere", "resources.num_actors=8")))
    assert config_digest(base) != config_digest(load_recipe(RECIPE, ("seed=1",)))


def test_manifest_roundtrip():
    m = TaskManifest("t", ["in.tar"], [OutputFile("shards/t.tar", 10, "ab", 2)], 3, 2, "d", {"torch": "x"},
                     {"decode": StageStats(1.0, 3, 2, {"corrupt_image": 1})}, 0.0, 1.0)
    back = TaskManifest.from_json(m.to_json())
    assert back == m and back.errors == 1
