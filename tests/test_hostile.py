"""Hostile shards (issue #11, Security): member names that would escape an extraction folder,
compression bombs (gzip, compressed npz, .tar.gz) and .npy headers that claim terabytes.

Bombs are built small (tests/hostile_gen.py: ~1/1000 of their expansion) and are never expanded:
each reader refuses them from a size it knows before inflating, so tracemalloc's peak stays at
megabytes. Peak RSS against a clean corpus is measured by bench/hostile.py."""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import jpeg_bytes, photo, tiny_recipe
from hostile_gen import (MiB, copies_after, gzip_bomb, gzip_of, npy_header, npz_bomb, npz_claiming, rewrite_shard,
                         tar_members, write_raw_tar, write_tar_gz, zip_of)
from test_mobileclip_format import AUG, DIMS, N as DR_N, uid, write_run as write_dr_run
from test_readers import BASE, DECIMAL_KEYS, N, TOPK, make_run

from reinforge.cli.main import cli
from reinforge.runtime.executor import TaskExecutor
from reinforge.runtime.pipeline import build_pipeline
from reinforge.ops.rundir import validate_run
from reinforge.runtime.runner import run_recipe
from reinforge.formats.sources import ImageFolderSource
from reinforge.readers import ReinforcedImageNet
from reinforge.readers.mobileclip import MobileCLIPDRDataset
from reinforge.formats.arrays import load_npz, npz_bytes
from reinforge.formats.augment import Augmenter
from reinforge.formats.recipe import semantic_dict
from reinforge.products.registry import parse_recipe
from reinforge.formats.datacomp_dr import DRSample, StorageSpec, decode_dr_sample, encode_dr_sample
from reinforge.formats.dr_trainer_config import dr_trainer_config
from reinforge.formats.image import decode_rgb
from reinforge.formats.imagenet_plus import ReinforcedSample, decode_sample, encode_sample, sha256_hex
from reinforge.formats.limits import Limits, MemberTooLarge, SchemaError, declared_limits, gunzip
from reinforge.io.manifest import RunLayout
from reinforge.formats.subset import make_subset, write_subset
from reinforge.formats.wds import ShardReadError, ShardWriter, iter_samples, split_member_name, unsafe_name
from reinforge.stages.base import Batch
from reinforge.stages.decode import DecodeImage

BAD_KEYS = ["../../x", "/abs/x", "a/../../b"]
LEGAL_KEY = "sub/dir/name"  # a legal WebDataset key: kept
BOMB = 3 << 30  # a schema-level bomb: 3 GiB of zeros in ~3 MB
SMALL_BOMB = 1 << 30  # ~1 MB: under the test runs' tar bounds, so the member's own header is what refuses it
TIB4 = (1 << 40,)  # float32 elements: a 4 TiB array


@contextmanager
def peak_allocated():
    """Peak bytes allocated through Python and numpy inside the block (PIL and torch buffers aside)."""
    box = {}
    tracemalloc.start()
    try:
        yield box
    finally:
        box["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def safe_names(path) -> list[str]:
    """Every member name of a tar, asserting none is absolute or has a '..' part."""
    with tarfile.open(path) as tar:
        names = tar.getnames()
    for name in names:
        assert not name.startswith("/") and ".." not in name.split("/"), name
    return names


def samples_of(path) -> list[dict]:
    with open(path, "rb") as f:
        return list(iter_samples(f))


def errors_of(run, task: str) -> list[tuple[str, str, str]]:
    """(key, stage, reason) of every skipped sample in RUN/errors/<task>.jsonl."""
    with open(RunLayout(str(run)).errors(task)) as f:
        return sorted((e["key"], e["stage"], e["reason"]) for e in map(json.loads, f))


# ---------------------------------------------------------------------------------------------------
# Names

def test_unsafe_names_and_the_writer_refuses_them():
    for name in [*BAD_KEYS, "..", "..\\..\\x", "\\abs", "a\0b"]:
        assert unsafe_name(name), name
    for name in [LEGAL_KEY, "img00001", "a..b/c..d", "./x", ".hidden/k"]:
        assert unsafe_name(name) is None, name
    buf = io.BytesIO()
    writer = ShardWriter(buf)
    for key in BAD_KEYS:
        with pytest.raises(ValueError, match="refusing"):
            writer.write(key, {"jpg": b"1"})
    with pytest.raises(ValueError, match="refusing"):  # an extension cannot climb either
        writer.write("k", {"jpg": b"1", "x/../../../y": b"2"})
    writer.write(LEGAL_KEY, {"jpg": b"1"})
    writer.close()
    assert writer.samples == 1
    assert tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames() == [f"{LEGAL_KEY}.jpg"]


def test_reading_marks_escaping_keys_and_keeps_legal_ones(tmp_path):
    keys = ["ok", *BAD_KEYS, LEGAL_KEY]
    write_raw_tar(tmp_path / "x.tar", [(f"{k}.{ext}", data) for k in keys for ext, data in
                                       (("jpg", b"1"), ("cls", b"0"))])
    samples = samples_of(tmp_path / "x.tar")
    assert [s["__key__"] for s in samples] == keys
    for s in samples[1:4]:
        assert s["__error__"][0] == "bad_key" and "jpg" not in s  # its members are not even read
    assert samples[4] == {"__key__": LEGAL_KEY, "jpg": b"1", "cls": b"0"}


# ---------------------------------------------------------------------------------------------------
# Bounded reading: tar members, .tar.gz streams, gzip, npz, pth.gz

def test_bounds_follow_what_the_run_declares():
    teachers = [{"model": "t", "dim": 768}, {"model": "u", "dim": 768}]
    dr_config = {**dr_trainer_config(AUG, 30, teachers), "captioners": [{"num_captions": 5}]}
    assert declared_limits(dr_config) == Limits.for_datacomp_dr(30, 1536, 5)
    imagenet_plus = {"reinforce": {"num_samples": 400, "topk": 10}}
    assert declared_limits(imagenet_plus, 1000) == Limits.for_imagenet_plus(400, 10, 1000)
    apple = declared_limits({"reinforce": {"num_samples": 30}})  # Apple's DataCompDR config: N only
    assert Limits.for_datacomp_dr(30, 1536, 5).arrays < apple.arrays < Limits.default().arrays
    for nothing in (None, {}, {"reinforce": {"num_samples": True, "topk": "10"}}, []):
        assert declared_limits(nothing) == Limits.default()
    limits = Limits.for_imagenet_plus(400, 10)  # ImageNet+ at its release size
    assert limits.bound("jpg") == 8 * 64_000_000 + MiB and limits.bound("cls") == limits.bound("txt") == MiB
    assert limits.bound("prob.npz") == 400 * 10 * 16 + 2 * MiB and limits.bound("paug.json.gz") == 400 * 1024 + 2 * MiB



def test_tar_gz_members_and_samples_are_bounded(tmp_path):
    limits = Limits.for_images(1_000_000)  # images up to ~9 MiB, text members 1 MiB, a sample ~13 MiB
    image = jpeg_bytes(photo(0, 48))
    write_tar_gz(tmp_path / "x.tar.gz", [
        ("a.jpg", image), ("a.cls", b"1"),
        ("bomb.jpg", 64 * MiB), ("bomb.cls", b"2"),  # an image 1000x its compressed size, over the image bound
        ("big.jpg", image), ("big.txt", 4 * MiB),  # a caption of megabytes
        *[(f"many.x{i}", 4 * MiB) for i in range(5)],  # each under the member bound, together over the sample's
        ("z.jpg", image), ("z.cls", b"3")])
    assert os.path.getsize(tmp_path / "x.tar.gz") < MiB
    with peak_allocated() as memory:
        samples = samples_of_limited(tmp_path / "x.tar.gz", limits)
    assert [(s["__key__"], s.get("__error__", ("ok",))[0]) for s in samples] == [
        ("a", "ok"), ("bomb", "member_too_large"), ("big", "member_too_large"), ("many", "member_too_large"),
        ("z", "ok")]
    assert samples[4]["jpg"] == image
    assert memory["peak"] < 24 * MiB, memory  # "many" holds 3 x 4 MiB before it passes its bound


def samples_of_limited(path, limits: Limits) -> list[dict]:
    with open(path, "rb") as f:
        return list(iter_samples(f, limits))


def test_an_oversized_extended_header_fails_the_shard_with_a_clear_error(tmp_path):
    image = jpeg_bytes(photo(0, 48))
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 64 * MiB  # tarfile would read it into memory whole
    before = tar_members([("a.jpg", image), ("a2.jpg", image)])[:-1]  # a2 is in progress when the header fails
    parts = before + [pax.tobuf(format=tarfile.USTAR_FORMAT), 64 * MiB]
    (tmp_path / "x.tar.gz").write_bytes(gzip_of(parts + tar_members([("b.jpg", image)])))
    seen = []
    with peak_allocated() as memory, pytest.raises(ShardReadError, match="extended header of 67108864 bytes"):
        with open(tmp_path / "x.tar.gz", "rb") as f:
            seen.extend(s["__key__"] for s in iter_samples(f))
    assert seen == ["a"] and memory["peak"] < 8 * MiB


def test_gzip_and_npz_bombs_are_refused_before_they_inflate():
    gz, npz, claim = gzip_bomb(BOMB), npz_bomb("values", BOMB), npz_claiming("values", TIB4)
    assert len(gz) < 4 * MiB and len(npz) < 4 * MiB and len(claim) < 1024
    with peak_allocated() as memory:
        with pytest.raises(MemberTooLarge, match="inflates past its bound of 1048576"):
            gunzip(gz, MiB, "paug.json.gz")
        with pytest.raises(MemberTooLarge, match=r"values.npy \(805306368,\) float32: 3221225472 bytes"):
            load_npz(npz)  # the default bound (160 MB) is far below 3 GiB
        with pytest.raises(MemberTooLarge, match="4398046511104 bytes"):
            load_npz(claim, 10**12)  # even a terabyte bound; np.load raises MemoryError here
    assert memory["peak"] < 8 * MiB, memory
    assert MemberTooLarge("x").reason == "member_too_large" and issubclass(MemberTooLarge, SchemaError)


def test_bounded_npz_reads_what_numpy_reads():
    arrays = {"values": np.arange(6, dtype=np.float16).reshape(2, 3), "ids": np.arange(6, dtype=">i4").reshape(2, 3),
              "f": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)), "empty": np.zeros((0, 4))}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    for data in (buf.getvalue(), npz_bytes(arrays)):
        loaded = load_npz(data)
        assert set(loaded) == set(arrays)
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array)
        loaded["values"][0, 0] = 7  # writable, as np.load's
    with pytest.raises(MemberTooLarge):
        load_npz(npz_bytes(arrays), 40)
    objects = zip_of({"o.npy": [npy_header((1,), "|O") + bytes(8)]})
    for bad in (b"not an npz", objects, zip_of({"v.npy": [npy_header((4,)) + bytes(3)]})):
        with pytest.raises(SchemaError) as info:
            load_npz(bad)
        assert info.value.reason == "schema"


def imagenet_plus_members(key: str = "k") -> dict:
    sample = ReinforcedSample(key=key, image_ext="jpg", image=jpeg_bytes(photo(0, 40)), label=1,
                              entries=[[[0, 0, 8, 8]], [[1, 1, 8, 8]]], values=np.full((2, 3), 0.1, np.float32),
                              ids=np.arange(6).reshape(2, 3))
    return {"__key__": key, **encode_sample(sample, 10)}


def dr_members(key_uid: str, storage: StorageSpec = StorageSpec()) -> dict:
    rng = np.random.default_rng(0)
    rows = lambda n: rng.standard_normal((n, 48)).astype(np.float32)  # noqa: E731
    image = jpeg_bytes(photo(0, 40))
    sample = DRSample(uid=key_uid, image_ext="jpg", image=image, caption="c", url=None, syn={"syn_text": ["a", "b"]},
                      entries=[[[0, 0, 8, 8]], [[1, 1, 8, 8]]], image_emb=rows(2), text_emb=rows(1),
                      syn_emb={"syn_text": rows(2)})
    return {"__key__": key_uid, **encode_dr_sample(sample, storage)}


def test_decoders_refuse_bombs_in_their_members():
    inet_limits, dr_limits = Limits.for_imagenet_plus(2, 3), Limits.for_datacomp_dr(2, 48, 2)
    gz, npz = gzip_bomb(BOMB), npz_bomb("values", BOMB)
    torch_zip = gzip_of([zip_of({"archive/data/0": [SMALL_BOMB]})])  # a torch record that inflates to 1 GiB
    base = imagenet_plus_members()
    assert decode_sample(base, inet_limits).values.shape == (2, 3)
    cases = [
        (decode_sample, {**base, "paug.json.gz": gz}, inet_limits),
        (decode_sample, {**base, "prob.npz": npz}, inet_limits),
        (decode_sample, {**base, "prob.npz": npz_claiming("values", TIB4)}, inet_limits),
        (decode_dr_sample, {**dr_members(uid(1)), "npz": npz_bomb("image_emb", BOMB)}, dr_limits),
        (decode_dr_sample, {**dr_members(uid(1)), "npz": npz_claiming("image_emb", TIB4)}, dr_limits),
        (decode_dr_sample, {**dr_members(uid(1), StorageSpec("pth.gz")), "pth.gz": gz}, dr_limits),
        (decode_dr_sample, {**dr_members(uid(1), StorageSpec("pth.gz")), "pth.gz": torch_zip}, dr_limits),
    ]
    assert decode_dr_sample(dr_members(uid(1), StorageSpec("pth.gz")), dr_limits).image_emb.shape == (2, 48)
    with peak_allocated() as memory:
        for decode, members, limits in cases:
            with pytest.raises(MemberTooLarge, match=r"sample (k|0+1):"):
                decode(members, limits)
    assert memory["peak"] < 16 * MiB, memory
    deep = b"[" * 100_000  # json.loads raises RecursionError, which no reader expects
    with pytest.raises(SchemaError, match="sample k"):
        decode_sample({**base, "paug.json.gz": gzip_of([deep])}, inet_limits)
    with pytest.raises(SchemaError, match=uid(1)):
        decode_dr_sample({**dr_members(uid(1)), "paug.json": deep}, dr_limits)


# ---------------------------------------------------------------------------------------------------
# Readers, validate, inspect on a finished run holding bombs and escaping keys

IMAGENET_RECIPE = {"product": "imagenet_plus", "output": "unused", "input": {"format": "webdataset", "path": "unused"},
                   "augmentation": {"num_samples": N, "image_augmentation": BASE},
                   "teachers": [{"model": "resnet10t", "num_classes": 10}], "top_k": TOPK}


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    """One ImageNet+ shard of 10 samples: 00000000, ../../x, 00000001 (paug.json.gz: 3 GiB bomb, over the
    tar bound), 00000002, /abs/x, 00000003 (prob.npz: 1 GiB bomb, under it), 00000004, a/../../b,
    00000005 (prob.npz header claiming 4 TiB), sub/dir/name (legal)."""
    root = tmp_path_factory.mktemp("imagenet_hostile")
    bombs = {DECIMAL_KEYS[1]: ("paug.json.gz", gzip_bomb(BOMB)),
             DECIMAL_KEYS[3]: ("prob.npz", npz_bomb("values", SMALL_BOMB)),
             DECIMAL_KEYS[5]: ("prob.npz", npz_claiming("values", TIB4))}

    def tamper(key, members):
        if key in bombs:
            member, data = bombs[key]
            if member == "paug.json.gz":
                del members["paug.json"]
            members[member] = data
    make_run(root, BASE, DECIMAL_KEYS[:6], per_shard=6, tamper=tamper)
    run = root / "run"
    after = {DECIMAL_KEYS[0]: [BAD_KEYS[0]], DECIMAL_KEYS[2]: [BAD_KEYS[1]], DECIMAL_KEYS[4]: [BAD_KEYS[2]],
             DECIMAL_KEYS[5]: [LEGAL_KEY]}
    rewrite_shard(run, "part-000000", lambda members: copies_after(members, DECIMAL_KEYS[0], after))
    record = {"config_digest": "test", "product": "imagenet_plus",
              "recipe": semantic_dict(parse_recipe(IMAGENET_RECIPE))}
    (run / "run.json").write_text(json.dumps(record))
    return run


def test_imagenet_plus_reader_skips_counts_and_goes_on(imagenet_run):
    ds = ReinforcedImageNet(str(imagenet_run))
    assert len(ds) == 10
    with peak_allocated() as memory:
        items = list(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False))
    assert len(items) == 10 and all(view.shape == (3, 32, 32) for view, _ in items)
    assert ds.skipped == {"bad_key": 3, "member_too_large": 3}
    assert memory["peak"] < 64 * MiB, memory
    with pytest.raises(SchemaError) as info:
        ds.sample(ds.index_of(DECIMAL_KEYS[5]))  # the direct accessor raises, with the reason
    assert info.value.reason == "member_too_large"


def test_validate_and_inspect_refuse_bombs_and_escaping_keys(imagenet_run):
    with peak_allocated() as memory:
        checked, problems = validate_run(str(imagenet_run))
    assert checked == 10 and memory["peak"] < 64 * MiB, memory
    found = sorted(p.split(": ")[1:3] for p in problems)
    assert found == sorted([[f"sample {k!r}", "bad_key"] for k in BAD_KEYS]
                           + [[f"sample {DECIMAL_KEYS[i]!r}", "member_too_large"] for i in (1, 3, 5)]), problems
    shard = str(RunLayout(str(imagenet_run)).shard("part-000000"))
    for key, reason in ((DECIMAL_KEYS[1], "member_too_large"), (DECIMAL_KEYS[5], "member_too_large"),
                        (BAD_KEYS[0], "bad_key")):
        result = CliRunner().invoke(cli, ["inspect", shard, "--key", key])
        assert result.exit_code == 1 and f"refused: {reason}" in result.output, result.output
    result = CliRunner().invoke(cli, ["inspect", shard, "--key", LEGAL_KEY])
    assert result.exit_code == 0 and "stored augmentations: 4" in result.output, result.output


@pytest.fixture(scope="module")
def dr_run(tmp_path_factory):
    """DataCompDR shards of 8 samples + one keyed ../../x: uid 1 npz 1 GiB bomb, uid 2 npz claiming 4 TiB,
    uid 3 pth.gz 1 GiB bomb, uid 4 pth.gz whose torch zip declares a 1 GiB record, uid 5 paug.json nested
    100,000 deep."""
    root = tmp_path_factory.mktemp("dr_hostile")
    augmenter, rng, gen = Augmenter(AUG), random.Random(0), np.random.default_rng(0)
    samples = []
    for i in range(8):
        image = jpeg_bytes(photo(i, 48))
        entries = [augmenter.sample(rng, tuple(decode_rgb(image).shape[-2:])) for _ in range(DR_N)]
        rows = lambda n: gen.standard_normal((n, sum(DIMS))).astype(np.float32)  # noqa: E731
        samples.append(DRSample(uid=uid(i), image_ext="jpg", image=image, caption=f"photo {i}", url=None,
                                syn={"syn_text": ["a photo", "a picture"]}, entries=entries, image_emb=rows(DR_N),
                                text_emb=rows(1), syn_emb={"syn_text": rows(2)}))
    torch_zip = gzip_of([zip_of({"archive/data/0": [SMALL_BOMB]})])
    changes = {uid(1): {"npz": npz_bomb("image_emb", SMALL_BOMB)}, uid(2): {"npz": npz_claiming("image_emb", TIB4)},
               uid(3): {"pth.gz": gzip_bomb(SMALL_BOMB)}, uid(4): {"pth.gz": torch_zip},
               uid(5): {"paug.json": b"[" * 100_000}}

    def tamper(key, members):
        if "pth.gz" in changes.get(key, {}):
            del members["npz"]
        members.update(changes.get(key, {}))
    run = write_dr_run(root, samples, StorageSpec("npz", "float16"), tamper=tamper)
    rewrite_shard(run, "part-000000", lambda members: copies_after(members, uid(0), {uid(0): [BAD_KEYS[0]]}))
    return run


def test_mobileclip_reader_skips_counts_and_goes_on(dr_run):
    import open_clip
    ds = MobileCLIPDRDataset(dr_run, open_clip.get_tokenizer("ViT-B-32"))
    with peak_allocated() as memory:
        got = [item["uid"] for item in ds]
    assert got == [uid(0), uid(6), uid(7)]
    assert ds.skipped == {"bad_key": 1, "member_too_large": 4, "schema": 1}
    assert memory["peak"] < 64 * MiB, memory
    shard = os.path.join(dr_run, "shards", "part-000001.tar")
    result = CliRunner().invoke(cli, ["inspect", shard, "--key", uid(4)])
    assert result.exit_code == 1 and "refused: member_too_large" in result.output, result.output


# ---------------------------------------------------------------------------------------------------
# Products: where samples enter, escaping keys are counted skips (bad_key) and inputs are bounded

@pytest.fixture(scope="module")
def hostile_inputs(tmp_path_factory):
    """a.tar: 5 photos, the three escaping keys and sub/dir/name; b.tar.gz: 3 photos and a jpg member
    inflating 64 MiB from 64 KB (over the image bound of the run's max_image_pixels: 1M)."""
    root = tmp_path_factory.mktemp("hostile_inputs")
    keys = [f"img{i}" for i in range(5)] + BAD_KEYS + [LEGAL_KEY]
    write_raw_tar(root / "a.tar", [(f"{k}.{ext}", data) for i, k in enumerate(keys) for ext, data in
                                   (("jpg", jpeg_bytes(photo(i, 72))), ("cls", str(i % 10).encode()))])
    gz = [(f"gz{i}.{ext}", data) for i in range(3) for ext, data in
          (("jpg", jpeg_bytes(photo(10 + i, 72))), ("cls", b"1"))]
    write_tar_gz(root / "b.tar.gz", gz[:2] + [("bomb.jpg", 64 * MiB), ("bomb.cls", b"2")] + gz[2:])
    return root


@pytest.mark.ray
def test_imagenet_plus_run_skips_escaping_keys_and_bounds_a_tar_gz_input(hostile_inputs, tmp_path, local_ray):
    out = tmp_path / "run"
    recipe = tiny_recipe(str(hostile_inputs / "*.tar*"), out, input__max_image_pixels=1_000_000)
    summary = run_recipe(parse_recipe(recipe), progress=False)
    assert summary.ok and summary.done == 2 and summary.samples == 9 and summary.errors == 4, summary
    assert errors_of(out, "a") == sorted((k, "decode", "bad_key") for k in BAD_KEYS)
    assert errors_of(out, "b") == [("bomb", "decode", "member_too_large")]
    names = safe_names(out / "shards" / "a.tar") + safe_names(out / "shards" / "b.tar")
    assert f"{LEGAL_KEY}.jpg" in names and len({split_member_name(n)[0] for n in names}) == 9
    checked, problems = validate_run(str(out))
    assert checked == 9 and problems == []


def image_product_recipe(product: str, shard, out) -> dict:
    common = {"product": product, "output": str(out), "input": {"format": "webdataset", "path": str(shard)}}
    if product == "mobileclip_dr":
        return {**common, "mode": "captions", "captioners": [{"model": "coca_ViT-B-32"}],
                "augmentation": {"num_samples": 2, "image_augmentation": {"random_resized_crop": {"size": 32}}}}
    return {**common, "encoder": {"model": "ViT-B-32"}}


@pytest.mark.parametrize("product", ["mobileclip_dr", "embed_pool"])
def test_image_products_skip_escaping_keys_where_samples_enter(product, tmp_path):
    keys = ["ok", *BAD_KEYS, LEGAL_KEY]
    write_raw_tar(tmp_path / "00000000.tar", [
        (f"{k}.{ext}", data) for i, k in enumerate(keys) for ext, data in
        (("jpg", jpeg_bytes(photo(i, 40))), ("txt", b"a photo"), ("json", json.dumps({"uid": uid(i)}).encode()))])
    pipeline = build_pipeline(parse_recipe(image_product_recipe(product, tmp_path / "00000000.tar", tmp_path / "out")))
    [task] = pipeline.tasks()
    batch = DecodeImage()(Batch(list(pipeline.read(task))))  # the first stage of both products
    assert sorted((e.key, e.reason) for e in batch.errors) == sorted((k, "bad_key") for k in BAD_KEYS)
    assert [s["__key__"] for s in batch.samples] == ["ok", LEGAL_KEY]


def test_join_skips_escaping_reinforcement_keys(tmp_path):
    """No Ray: the task executor a worker runs, on reinforcement-only shards + their image pool."""
    images = [jpeg_bytes(photo(i, 48)) for i in range(3)]
    write_raw_tar(tmp_path / "pool.tar", [(f"p{i}.{ext}", data) for i, image in enumerate(images) for ext, data in
                                          (("jpg", image), ("txt", b"a photo"),
                                           ("json", json.dumps({"uid": uid(i)}).encode()))])
    augmenter, rng, gen = Augmenter(AUG), random.Random(0), np.random.default_rng(0)
    reinforcement = []
    for i, image in enumerate(images):
        rows = lambda n: gen.standard_normal((n, sum(DIMS))).astype(np.float32)  # noqa: E731
        sample = DRSample(uid=uid(i), image_ext=None, image=None, caption=None, url=None, syn={"syn_text": ["a"]},
                          entries=[augmenter.sample(rng, tuple(decode_rgb(image).shape[-2:])) for _ in range(DR_N)],
                          image_emb=rows(DR_N), text_emb=rows(1), syn_emb={"syn_text": rows(1)})
        key = uid(i) if i < 2 else BAD_KEYS[0]  # its json still names a uid in the pool
        reinforcement += [(f"{key}.{ext}", data) for ext, data in
                          encode_dr_sample(sample, StorageSpec(), sha256=sha256_hex(image)).items()]
    (tmp_path / "dr").mkdir()
    write_raw_tar(tmp_path / "dr" / "00000000.tar", reinforcement)
    teachers = [{"model": f"t{i}", "dim": d} for i, d in enumerate(DIMS)]
    (tmp_path / "dr_config.json").write_text(json.dumps(dr_trainer_config(AUG, DR_N, teachers)))
    recipe = parse_recipe({"product": "join", "output": str(tmp_path / "run"),
                           "images": {"path": str(tmp_path / "pool.tar")},
                           "input": {"path": str(tmp_path / "dr" / "*.tar"),
                                     "dr_config": str(tmp_path / "dr_config.json")}})
    result = run_tasks(recipe)
    assert result == [{"task": "00000000", "status": "done", "samples_in": 3, "samples_out": 2, "errors": 1}]
    assert errors_of(tmp_path / "run", "00000000") == [(BAD_KEYS[0], "join", "bad_key")]
    assert safe_names(tmp_path / "run" / "shards" / "00000000.tar")


def test_reshard_skips_escaping_pool_keys(tmp_path):
    (tmp_path / "pool").mkdir()
    keys = ["k0", BAD_KEYS[0], "k2"]
    write_raw_tar(tmp_path / "pool" / "00000000.tar", [
        (f"{k}.{ext}", data) for i, k in enumerate(keys) for ext, data in
        (("jpg", jpeg_bytes(photo(i, 40))), ("json", json.dumps({"uid": uid(i)}).encode()))])
    write_subset(str(tmp_path / "subset.npy"), make_subset(np.zeros(3, np.uint64), np.arange(3, dtype=np.uint64)))
    recipe = parse_recipe({"product": "reshard", "output": str(tmp_path / "run"),
                           "subset": str(tmp_path / "subset.npy"), "input": {"path": str(tmp_path / "pool" / "*.tar")},
                           "max_error_fraction": 0.5})
    assert run_tasks(recipe)[0]["errors"] == 1
    assert errors_of(tmp_path / "run", "00000000") == [(uid(1), "reshard", "bad_key")]
    assert [s["__key__"] for s in samples_of(tmp_path / "run" / "shards" / "00000000.tar")] == [uid(0), uid(2)]


def run_tasks(recipe) -> list[dict]:
    """Every task of a recipe through TaskExecutor in this process, as a Ray worker runs it."""
    from reinforge.runtime.runner import write_run_record
    pipeline = build_pipeline(recipe)
    layout = RunLayout(recipe.output)
    digest = write_run_record(layout, recipe, force=False)
    pipeline.prepare(layout)
    tasks = pipeline.tasks()
    executor = TaskExecutor(pipeline, layout, digest, recipe.max_error_fraction)
    return [executor.run(task) for task in tasks]


def test_imagefolder_files_are_read_within_the_bound(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(jpeg_bytes(photo(0, 40)))
    (tmp_path / "cat" / "b.jpg").write_bytes(bytes(4 * MiB))  # a real file: read no further than the bound
    source = ImageFolderSource(str(tmp_path), 10, max_file_bytes=MiB)
    [task] = source.tasks()
    a, b = source.read(task)
    assert "jpg" in a and b["__error__"][0] == "member_too_large" and "jpg" not in b
