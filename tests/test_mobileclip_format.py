"""DataCompDR / DFNDR wire format (FORMATS §2), its trainer-side reader and the MobileCLIP distillation
loss, on hand-built shards: real photos, embeddings from tiny random-init open_clip teachers. No Ray."""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import logging
import math
import os
import pickle
import random
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, jpeg_bytes, photo
from PIL import Image

from reinforge.readers.losses import mobileclip_distill_loss, teacher_targets
from reinforge.readers.mobileclip import MobileCLIPDRDataset
from reinforge.schemas.augment import Augmenter
from reinforge.schemas.datacomp_dr import (DRSample, ReplayError, StorageSpec, check_replayable, decode_dr_sample,
                                           dr_trainer_config, encode_dr_sample)
from reinforge.schemas.image import decode_rgb
from reinforge.schemas.imagenet_plus import SchemaError, sha256_hex
from reinforge.schemas.manifest import OutputFile, RunLayout, TaskManifest
from reinforge.schemas.wds import ShardWriter

AUG = {"random_resized_crop": {"size": 32, "interpolation": "bicubic"}, "rand_augment": {"p": 1.0}}
N, NUM_SAMPLES, DIMS, SCALES = 3, 8, [32, 16], [100.0, 50.0]
CAPTIONS = ["a cat sitting on a sofa", "a cup of coffee", "an astronaut in a suit", "a rocket on a launch pad",
            "cells under a microscope", "galaxies in deep space"]
STORAGES = [StorageSpec("npz", "float32", "legacy"), StorageSpec("npz", "float16", "legacy"),
            StorageSpec("npz", "float32", "dfndr"), StorageSpec("npz", "float16", "dfndr"),
            StorageSpec("pth.gz", "bfloat16", "legacy"), StorageSpec("pth.gz", "bfloat16", "dfndr")]
TOLERANCE = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3}
MEMBERS = ["url.txt", "jpg", "txt", "syn.json", "paug.json"]


def uid(i: int) -> str:
    return uuid.UUID(int=i).hex


def tiny_clip(embed_dim: int, seed: int):
    import open_clip
    torch.manual_seed(seed)
    cfg = json.loads(json.dumps(TINY_CLIP))
    cfg["embed_dim"] = embed_dim
    return open_clip.CLIP(**cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip
    return open_clip.get_tokenizer("ViT-B-32")  # the bundled BPE vocabulary: no download


@pytest.fixture(scope="module")
def samples(tokenizer) -> list[DRSample]:
    """NUM_SAMPLES DRSamples: N replayable augmentations of a real photo each, two synthetic captions,
    embeddings of two random-init open_clip teachers (dims 32 + 16, each slice L2-normalised)."""
    teachers = [tiny_clip(d, seed) for d, seed in zip(DIMS, (1, 2))]
    augmenter = Augmenter(AUG)
    normalize = dr_trainer_config(AUG, N, [{"model": "t", "dim": 1}])["reinforce"]["image_augmentation"]["normalize"]
    rng = random.Random(0)
    out = []
    for i in range(NUM_SAMPLES):
        image = jpeg_bytes(photo(i, 48))
        pixels = decode_rgb(image)
        entries = [augmenter.sample(rng, tuple(pixels.shape[-2:])) for _ in range(N)]
        views = torch.stack([augmenter.apply(e, pixels) for e in entries])
        views = (views - torch.tensor(normalize["mean"])[:, None, None]) / torch.tensor(normalize["std"])[:, None, None]
        syn = [CAPTIONS[(i + 1) % 6], CAPTIONS[(i + 2) % 6] + " at night"]
        with torch.no_grad():
            image_emb = torch.cat([t.encode_image(views, normalize=True) for t in teachers], 1)
            text = torch.cat([t.encode_text(tokenizer([CAPTIONS[i % 6]] + syn), normalize=True) for t in teachers], 1)
        out.append(DRSample(uid=uid(i), image_ext="jpg", image=image, caption=CAPTIONS[i % 6],
                            url=f"https://example.com/{i}.jpg", syn={"syn_text": syn}, entries=entries,
                            image_emb=image_emb.numpy(), text_emb=text[:1].numpy(),
                            syn_emb={"syn_text": text[1:].numpy()}, meta={"source": "test"}))
    return out


def with_second_captioner(sample: DRSample) -> DRSample:
    rows = np.roll(sample.syn_emb["syn_text"][:1], 1, axis=1)  # any unit rows of the right width
    return dataclasses.replace(sample, syn={**sample.syn, "syn_text_b": ["another caption"]},
                               syn_emb={**sample.syn_emb, "syn_text_b": rows})


def write_run(root, samples: list[DRSample], storage: StorageSpec, per_shard: int = 4, tamper=None) -> str:
    """A finished run directory as the pipeline leaves it: shards, manifests, dr_config.json."""
    run = os.path.join(str(root), "run")
    layout = RunLayout(run)
    for d in layout.directories:
        os.makedirs(d, exist_ok=True)
    for s in range(0, len(samples), per_shard):
        task = f"part-{s // per_shard:06d}"
        with open(layout.shard(task), "wb") as f, ShardWriter(f) as writer:
            for sample in samples[s:s + per_shard]:
                members = encode_dr_sample(sample, storage)
                if tamper:
                    tamper(sample.uid, members)
                writer.write(sample.uid, members)
        data = open(layout.shard(task), "rb").read()
        manifest = TaskManifest(task_id=task, inputs=[], samples_in=writer.samples, samples_out=writer.samples,
                                outputs=[OutputFile(f"shards/{task}.tar", len(data), sha256_hex(data), writer.samples)],
                                config_digest="test", versions={}, stages={}, started_at=0.0, seconds=0.0)
        with open(layout.manifest(task), "w") as f:
            f.write(manifest.to_json())
    teachers = [{"model": f"tiny-{i}", "dim": d, "logit_scale": s} for i, (d, s) in enumerate(zip(DIMS, SCALES))]
    with open(layout.dr_config, "w") as f:
        json.dump(dr_trainer_config(AUG, N, teachers), f)
    return run


def raw_arrays(members: dict) -> dict:
    if "npz" in members:
        with np.load(io.BytesIO(members["npz"]), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    return torch.load(io.BytesIO(gzip.decompress(members["pth.gz"])), weights_only=True)


# ---------------------------------------------------------------------------------------------
# Wire format

@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: f"{s.format}-{s.dtype}-{s.layout}")
def test_members_shapes_dtypes_and_round_trip(samples, storage):
    sample = samples[0] if storage.layout == "legacy" else with_second_captioner(samples[0])
    members = encode_dr_sample(sample, storage)
    assert list(members) == MEMBERS + [storage.format, "json"]
    assert members["txt"] == sample.caption.encode() and members["url.txt"] == sample.url.encode()
    assert json.loads(members["json"]) == {"uid": sample.uid, "sha256": sha256_hex(sample.image), "source": "test"}
    params = json.loads(members["paug.json"])
    assert list(params) == ["param_aug"] and isinstance(params["param_aug"], list)
    assert params["param_aug"] == sample.entries and b" " not in members["paug.json"]  # compact
    assert json.loads(members["syn.json"]) == sample.syn

    arrays, D, S = raw_arrays(members), sum(DIMS), len(sample.syn["syn_text"])
    expected = {"image_emb": (N, D)}
    if storage.layout == "legacy":
        expected["text_emb"] = (1 + S, D)  # ground truth first, then the synthetic captions
    else:
        expected.update(text_emb=(1, D), syn_text_emb=(S, D), syn_text_b_emb=(1, D))
    assert list(arrays) == list(expected)
    for name, shape in expected.items():
        assert tuple(arrays[name].shape) == shape, name
        want = getattr(np, storage.dtype) if storage.format == "npz" else torch.bfloat16
        assert arrays[name].dtype == want, name
    if storage.layout == "legacy":
        text = np.asarray(torch.as_tensor(arrays["text_emb"]).float())
        np.testing.assert_allclose(text[1:], sample.syn_emb["syn_text"], atol=TOLERANCE[storage.dtype])

    back = decode_dr_sample({"__key__": sample.uid, **members})
    assert (back.uid, back.caption, back.url, back.image, back.syn, back.entries) == \
           (sample.uid, sample.caption, sample.url, sample.image, sample.syn, sample.entries)
    assert back.meta == {"source": "test", "sha256": sha256_hex(sample.image)}
    for got, want in [(back.image_emb, sample.image_emb), (back.text_emb, sample.text_emb)] + \
                     [(back.syn_emb[k], sample.syn_emb[k]) for k in sample.syn]:
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=TOLERANCE[storage.dtype])
    # re-encoding what was read gives the same bytes
    assert encode_dr_sample(back, storage) == members


def test_storage_defaults_and_refusals(samples):
    assert StorageSpec().dtype == "float32" and StorageSpec("pth.gz").dtype == "bfloat16"
    with pytest.raises(ValueError, match="npz cannot hold bfloat16"):
        StorageSpec("npz", "bfloat16")
    with pytest.raises(ValueError, match="format"):
        StorageSpec("npy")
    with pytest.raises(ValueError, match="legacy layout holds one synthetic-caption key"):
        encode_dr_sample(with_second_captioner(samples[0]), StorageSpec(layout="legacy"))
    with pytest.raises(ValueError, match="32 lowercase hex"):
        encode_dr_sample(dataclasses.replace(samples[0], uid="A" * 32), StorageSpec())
    numpy_scalars = [[[np.int64(v) for v in e[0]], e[1]] for e in samples[0].entries]
    with pytest.raises(ValueError, match="plain JSON"):
        encode_dr_sample(dataclasses.replace(samples[0], entries=numpy_scalars), StorageSpec())
    with pytest.raises(ValueError, match="3 rows, expected 2"):
        encode_dr_sample(dataclasses.replace(samples[0], entries=samples[0].entries[:2]), StorageSpec())


def test_reinforcement_only_sample_needs_known_sha256(samples):
    """Apple's release layout: no image, no caption; json still names the image's sha256."""
    sample = dataclasses.replace(samples[1], image=None, image_ext=None, caption=None, url=None)
    with pytest.raises(ValueError, match="pass sha256="):
        encode_dr_sample(sample, StorageSpec())
    members = encode_dr_sample(sample, StorageSpec(), sha256=sha256_hex(samples[1].image))
    assert list(members) == ["syn.json", "paug.json", "npz", "json"]
    back = decode_dr_sample({"__key__": sample.uid, **members})
    assert back.image is None and back.caption is None and back.meta["sha256"] == sha256_hex(samples[1].image)
    assert encode_dr_sample(back, StorageSpec()) == members  # the hash travels in meta
    with pytest.raises(ValueError, match="hash to"):
        encode_dr_sample(samples[1], StorageSpec(), sha256="0" * 64)


_ENCODE_ONE = """
import hashlib, sys, numpy as np
from reinforge.schemas.datacomp_dr import DRSample, StorageSpec, encode_dr_sample
rng = np.random.default_rng(5)
unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
s = DRSample(uid="0" * 31 + "1", image_ext="jpg", image=b"x", caption="c", url=None, syn={"syn_text": ["a", "b"]},
             entries=[[[0, 0, 1, 1], None]] * 2, image_emb=unit(rng.normal(size=(2, 8))),
             text_emb=unit(rng.normal(size=(1, 8))), syn_emb={"syn_text": unit(rng.normal(size=(2, 8)))})
for spec in (StorageSpec("npz", "float16"), StorageSpec("pth.gz", layout="dfndr")):
    print(hashlib.sha256(b"".join(encode_dr_sample(s, spec).values())).hexdigest())
"""


def test_bytes_are_deterministic_across_processes(samples):
    """npz via npz_bytes (numpy.savez stamps the time) and torch.save (its serialization_id is a content
    hash in torch 2.x): equal samples give equal bytes, in this process and in a fresh one."""
    for storage in STORAGES:
        sample = samples[2] if storage.layout == "legacy" else with_second_captioner(samples[2])
        copy = dataclasses.replace(sample, image_emb=sample.image_emb.copy(), text_emb=sample.text_emb.copy(),
                                   syn_emb={k: v.copy() for k, v in sample.syn_emb.items()})
        assert encode_dr_sample(sample, storage) == encode_dr_sample(copy, storage)
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(_ENCODE_ONE, {})
    there = subprocess.run([sys.executable, "-c", _ENCODE_ONE], check=True, capture_output=True, text=True).stdout
    assert here.getvalue() == there and len(there.split()) == 2


def test_param_aug_as_json_string_is_accepted(samples):
    members = encode_dr_sample(samples[0], StorageSpec())
    members["paug.json"] = json.dumps({"param_aug": json.dumps(samples[0].entries)}).encode()
    assert decode_dr_sample({"__key__": samples[0].uid, **members}).entries == samples[0].entries


_EXECUTED = []


def _side_effect():
    _EXECUTED.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


def test_pth_gz_is_loaded_with_weights_only(samples):
    members = encode_dr_sample(samples[0], StorageSpec("pth.gz"))
    buf = io.BytesIO()
    torch.save({"image_emb": torch.zeros(N, 48), "payload": _Evil()}, buf)
    members["pth.gz"] = gzip.compress(buf.getvalue(), mtime=0)
    with pytest.raises(SchemaError, match=rf"sample {samples[0].uid}: pth.gz: unreadable"):
        decode_dr_sample({"__key__": samples[0].uid, **members})
    assert not _EXECUTED  # the pickled callable never ran


def _broken(sample: DRSample, storage=StorageSpec(layout="dfndr"), **arrays) -> dict:
    members = encode_dr_sample(sample, storage)
    if arrays:
        from reinforge.schemas.arrays import npz_bytes
        members["npz"] = npz_bytes({**raw_arrays(members), **arrays})
    return {"__key__": sample.uid, **members}


def test_malformed_samples_name_uid_and_member(samples):
    s = samples[3]
    D = sum(DIMS)
    cases = [
        (_broken(s, image_emb=np.zeros((N + 1, D), np.float32)), "image_emb has 4 rows, expected 3"),
        (_broken(s, syn_text_emb=np.zeros((3, D), np.float32)), "syn_text_emb has 3 rows, expected 2"),
        (_broken(s, text_emb=np.zeros((1, D - 1), np.float32)), "text_emb has D=47, but image_emb has D=48"),
        (_broken(s, text_emb=np.full((1, D), np.nan, np.float32)), "text_emb must hold finite floats"),
        (_broken(s, StorageSpec(), text_emb=np.zeros((2, D), np.float32)), "too few for 1\\+ ground-truth and 2"),
        ({**_broken(s), "json": b'{"uid": "%s"}' % uid(99).encode()}, "differs from the sample key"),
        ({**_broken(s), "paug.json": b'{"param_aug": 3}'}, "paug.json must hold a list"),
        ({**_broken(s), "syn.json": b'{"captions": []}'}, "'captions' is not 'syn_text'"),
        ({**_broken(s), "npz": b"garbage"}, "npz: unreadable"),
        ({k: v for k, v in _broken(s).items() if k != "npz"}, "neither 'npz' nor 'pth.gz'"),
    ]
    for members, message in cases:
        with pytest.raises(SchemaError, match=message) as info:
            decode_dr_sample(members)
        assert str(info.value).startswith(f"sample {s.uid}: "), str(info.value)


def test_check_replayable_catches_sha256_and_out_of_bounds_boxes(samples):
    s = decode_dr_sample({"__key__": samples[4].uid, **encode_dr_sample(samples[4], StorageSpec())})
    check_replayable(s, s.image, AUG)  # as written: fine
    with pytest.raises(ReplayError, match="sha256") as info:
        check_replayable(s, jpeg_bytes(photo(4, 48), quality=70), AUG)
    assert info.value.reason == "sha256_mismatch"
    # the public generator's defect: boxes drawn on the full-resolution image, a smaller image stored
    full = jpeg_bytes(photo(4, 200))
    rng = random.Random(1)
    entries = [Augmenter(AUG).sample(rng, (200, 216)) for _ in range(20)]
    entries.append([[150, 150, 50, 60], [[0, 0.0], [0, 0.0]]])  # surely outside a 48-px image
    small = jpeg_bytes(Image.open(io.BytesIO(full)).resize((52, 48)))
    shrunk = dataclasses.replace(s, entries=entries, meta={"sha256": sha256_hex(small)})
    with pytest.raises(ReplayError, match="falls outside the 48x52 image") as info:
        check_replayable(shrunk, small, Augmenter(AUG))
    assert info.value.reason == "crop_out_of_bounds" and s.uid in str(info.value)
    with pytest.raises(ReplayError) as info:
        check_replayable(dataclasses.replace(s, meta={}), s.image, AUG)
    assert info.value.reason == "missing_sha256"


def test_trainer_config_is_what_the_reference_trainer_parses():
    config = dr_trainer_config(AUG, 30, [{"model": "ViT-L-14", "pretrained": "openai", "dim": 768},
                                        {"model": "ViT-L-14", "pretrained": "datacomp_xl_s13b_b90k", "dim": 768}])
    assert config["model_name"] == "ViT-L-14,ViT-L-14"
    assert config["pretrained"] == "openai,datacomp_xl_s13b_b90k"
    assert config["num_samples"] == config["reinforce"]["num_samples"] == 30
    assert config["teacher_dims"] == [768, 768] and config["teacher_logit_scales"] == [100.0, 100.0]
    augmentation = config["reinforce"]["image_augmentation"]
    assert "normalize" in augmentation  # the reference trainer deletes it unconditionally
    assert "interpolation" not in augmentation["rand_augment"]  # a string there is a TypeError in torchvision
    assert augmentation["random_resized_crop"]["interpolation"] == "bicubic"
    assert Augmenter(augmentation).layout() == ["random_resized_crop", "rand_augment"]
    assert json.loads(json.dumps(config)) == config
    with pytest.raises(ValueError, match="teachers\\[0\\].dim"):
        dr_trainer_config(AUG, 30, [{"model": "ViT-L-14"}])


# ---------------------------------------------------------------------------------------------
# Reader

@pytest.fixture(scope="module")
def dfndr_run(samples, tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("dfndr"), [with_second_captioner(s) for s in samples],
                     StorageSpec("pth.gz", layout="dfndr"))


@pytest.mark.parametrize("mode", ["random", "epoch"])
def test_reader_replays_the_chosen_augmentation_bit_identically(samples, dfndr_run, tokenizer, mode):
    ds = MobileCLIPDRDataset(dfndr_run, tokenizer, mode=mode, seed=3)
    assert ds.num_samples == NUM_SAMPLES and ds.teacher_dims == DIMS and ds.teacher_logit_scales == SCALES
    augmenter = Augmenter(json.load(open(RunLayout(dfndr_run).dr_config))["reinforce"]["image_augmentation"])
    by_uid = {s.uid: s for s in samples}
    chosen = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        items = list(ds)
        assert [it["uid"] for it in items] == [s.uid for s in samples]
        for item in items:
            s = by_uid[item["uid"]]
            j, c = item["aug_index"], item["syn_index"]
            assert (j, c) == ds.choose(s.uid, N, 2, epoch)
            if mode == "epoch":
                assert (j, c) == (epoch % N, epoch % 2)
            assert torch.equal(item["image"], augmenter.apply(s.entries[j], decode_rgb(s.image)))
            assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
            assert torch.equal(item["text"], tokenizer(s.caption)[0])
            assert torch.equal(item["syn_text"], tokenizer(s.syn["syn_text"][c])[0])
            for name, want in (("image_emb", s.image_emb[j]), ("text_emb", s.text_emb[0]),
                               ("syn_emb", s.syn_emb["syn_text"][c])):
                assert item[name].dtype == torch.float32 and item[name].shape == (sum(DIMS),)
                np.testing.assert_allclose(item[name].numpy(), want, atol=TOLERANCE["bfloat16"])
            chosen.append(j)
    assert ds.skipped == {}
    if mode == "random":
        assert len(set(chosen)) > 1  # not stuck on one augmentation


def test_reader_collates_and_splits_shards_over_workers(dfndr_run, tokenizer):
    ds = MobileCLIPDRDataset(dfndr_run, tokenizer)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    uids = sorted(u for b in batches for u in b["uid"])
    assert uids == sorted(uid(i) for i in range(NUM_SAMPLES))  # each sample exactly once
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["text"].shape == (4, 77) and b["syn_text"].dtype == torch.int64
    assert b["image_emb"].shape == b["text_emb"].shape == b["syn_emb"].shape == (4, sum(DIMS))


def test_reader_skips_counts_and_logs_bad_samples(samples, tmp_path, tokenizer, caplog):
    def tamper(key, members):
        if key == uid(1):  # other image bytes than the crop boxes refer to
            members["jpg"] = jpeg_bytes(photo(1, 48), quality=60)
        elif key == uid(2):  # boxes drawn on a larger image (the public generator's defect)
            params = json.loads(members["paug.json"])
            params["param_aug"][0][0] = [40, 40, 30, 30]
            members["paug.json"] = json.dumps(params).encode()
        elif key == uid(5):
            members["npz"] = b"not an npz"
        elif key == uid(6):
            del members["txt"]

    run = write_run(tmp_path, samples, StorageSpec("npz", "float16"), tamper=tamper)
    with open(os.path.join(run, "shards", "part-000001.tar"), "ab") as f:
        f.write(b"\0" * 100 + b"garbage after the end")  # tolerated by tar readers
    ds = MobileCLIPDRDataset(run, tokenizer)
    with caplog.at_level(logging.WARNING, logger="reinforge.readers.mobileclip"):
        got = [item["uid"] for item in ds]
    assert got == [uid(i) for i in (0, 3, 4, 7)]
    assert ds.skipped == {"sha256_mismatch": 1, "crop_out_of_bounds": 1, "schema": 1, "missing_caption": 1}
    for i in (1, 2, 5, 6):
        assert uid(i) in caplog.text


def test_reader_survives_a_truncated_shard(samples, tmp_path, tokenizer):
    run = write_run(tmp_path, samples, StorageSpec())
    path = os.path.join(run, "shards", "part-000000.tar")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) * 3 // 5])
    ds = MobileCLIPDRDataset(run, tokenizer)
    got = [item["uid"] for item in ds]
    assert got[-4:] == [uid(i) for i in range(4, 8)] and len(got) < NUM_SAMPLES  # the second shard is whole
    assert ds.skipped["unreadable_shard"] == 1


def test_reader_urls_overrides_and_refusals(dfndr_run, tokenizer):
    shards = os.path.join(dfndr_run, "shards", "part-{000000..000001}.tar")
    normalize = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    ds = MobileCLIPDRDataset(shards, tokenizer, image_augmentation={**AUG, "to_rgb": {"enable": True}},
                             overrides={"random_resized_crop": {"size": 24}, "normalize": normalize})
    item = next(iter(ds))
    assert item["image"].shape == (3, 24, 24) and float(item["image"].min()) >= -1.0  # the student's own size/stats
    assert MobileCLIPDRDataset(dfndr_run, tokenizer, syn_key="syn_text_b").syn_key == "syn_text_b"
    with pytest.raises(ValueError, match="no augmentation config"):
        MobileCLIPDRDataset(shards, tokenizer)
    with pytest.raises(ValueError, match="mixup/cutmix"):
        MobileCLIPDRDataset(shards, tokenizer, image_augmentation={**AUG, "mixup": {"alpha": 1.0}})
    ds.set_epoch(4)
    copy = pickle.loads(pickle.dumps(ds))  # outside a worker start the copy keeps its own epoch and counts
    assert copy.epoch == 4 and copy.skipped == {} and next(iter(copy))["uid"] == item["uid"]


# ---------------------------------------------------------------------------------------------
# Loss

def _hand_ce(logits, target):
    total = 0.0
    for row, t in zip(logits, target):
        log_z = math.log(sum(math.exp(v) for v in row))
        total += -sum(p * (v - log_z) for p, v in zip(t, row))
    return total / len(logits)


def _hand_softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def test_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    B, dims, scales, lam, s = 3, [2, 1], [10.0, 4.0], 0.3, 5.0
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    img, txt, syn = (unit(torch.randn(B, 4)) for _ in range(3))

    def teacher(x):
        return torch.cat([unit(x[:, :2]), unit(x[:, 2:])], 1)  # each slice unit-norm on its own
    t_img, t_txt, t_syn = (teacher(torch.randn(B, 3)) for _ in range(3))
    out = mobileclip_distill_loss(img, txt, syn, torch.tensor(s), t_img, t_txt, t_syn, dims, scales, lam)

    def hand(student_text, teacher_text):
        L = [[s * float(img[i] @ student_text[j]) for j in range(B)] for i in range(B)]
        LT = [list(col) for col in zip(*L)]
        onehot = [[float(i == j) for j in range(B)] for i in range(B)]
        clip = (_hand_ce(L, onehot) + _hand_ce(LT, onehot)) / 2
        slices = [(0, 2), (2, 3)]
        target_i = [[0.0] * B for _ in range(B)]
        target_t = [[0.0] * B for _ in range(B)]
        for (a, b), sigma in zip(slices, scales):
            sim = [[sigma * float(t_img[i, a:b] @ teacher_text[j, a:b]) for j in range(B)] for i in range(B)]
            for i in range(B):
                for j, p in enumerate(_hand_softmax(sim[i])):
                    target_i[i][j] += p / 2
                for j, p in enumerate(_hand_softmax([sim[k][i] for k in range(B)])):
                    target_t[i][j] += p / 2
        distill = (_hand_ce(L, target_i) + _hand_ce(LT, target_t)) / 2
        return (1 - lam) * clip + lam * distill, clip, distill

    gt, syn_parts = hand(txt, t_txt), hand(syn, t_syn)
    assert out["loss_gt"].item() == pytest.approx(gt[0], rel=1e-5)
    assert out["loss_syn"].item() == pytest.approx(syn_parts[0], rel=1e-5)
    assert out["loss"].item() == pytest.approx((gt[0] + syn_parts[0]) / 2, rel=1e-5)
    assert out["clip_loss"].item() == pytest.approx((gt[1] + syn_parts[1]) / 2, rel=1e-5)
    assert out["distill_loss"].item() == pytest.approx((gt[2] + syn_parts[2]) / 2, rel=1e-5)
    rows_i, rows_t = teacher_targets(t_img, t_txt, dims, scales)
    assert torch.allclose(rows_i.sum(1), torch.ones(B)) and torch.allclose(rows_t.sum(1), torch.ones(B))
    only_gt = mobileclip_distill_loss(img, txt, None, s, t_img, t_txt, None, dims, scales, lam)
    assert only_gt["loss"].item() == pytest.approx(gt[0], rel=1e-5)
    with pytest.raises(ValueError, match="D=3, teacher_dims sum to 4"):
        mobileclip_distill_loss(img, txt, syn, s, t_img, t_txt, t_syn, [2, 2], scales, lam)


def test_student_distillation_loss_decreases(dfndr_run, tokenizer):
    """~20 steps of a tiny random-init open_clip student on the reader's batches."""
    ds = MobileCLIPDRDataset(dfndr_run, tokenizer, mode="random", seed=0)
    torch.manual_seed(0)
    student = tiny_clip(16, seed=7).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(20):
        ds.set_epoch(step)  # a new stored augmentation and synthetic caption per step
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=NUM_SAMPLES)))
        image = student.encode_image(batch["image"], normalize=True)
        text = student.encode_text(torch.cat([batch["text"], batch["syn_text"]]), normalize=True)
        out = mobileclip_distill_loss(image, text[:NUM_SAMPLES], text[NUM_SAMPLES:], student.logit_scale.exp(),
                                      batch["image_emb"], batch["text_emb"], batch["syn_emb"],
                                      ds.teacher_dims, ds.teacher_logit_scales, lam=0.7)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
