"""DataCompDR / DFNDR wire format (FORMATS §2), its trainer-side reader and the MobileCLIP distillation
loss, on hand-built shards: real photos, embeddings from tiny random-init open_clip teachers. No Ray."""
from __future__ import annotations

import argparse
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
from conftest import TINY_CLIP, jpeg_bytes, photo, tiny_open_clip, write_shard
from PIL import Image

from reinforge.readers.losses import mobileclip_distill_loss, teacher_targets
from reinforge.readers.mobileclip import MobileCLIPDRDataset
from reinforge.formats.augment import Augmenter
from reinforge.formats.datacomp_dr import (DRSample, StorageSpec, decode_dr_sample, encode_dr_sample)
from reinforge.formats.datacomp_dr_replay import ReplayError, check_replayable
from reinforge.formats.dr_trainer_config import dr_trainer_config
from reinforge.formats.image import decode_rgb
from reinforge.formats.imagenet_plus import SchemaError, sha256_hex
from reinforge.io.manifest import OutputFile, RunLayout, TaskManifest
from reinforge.formats.wds import ShardWriter

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
    with open(layout.run_file, "w") as f:  # the run's recipe digest: its manifests say "test"
        json.dump({"config_digest": "test", "product": "mobileclip_dr"}, f)
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
from reinforge.formats.datacomp_dr import DRSample, StorageSpec, encode_dr_sample
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
        from reinforge.formats.arrays import npz_bytes
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
    with pytest.raises(ValueError, match="teachers\\[0\\].pretrained must be a string without ','"):
        dr_trainer_config(AUG, 30, [{"model": "ViT-L-14", "pretrained": "/a,b.pt", "dim": 768}])
    with pytest.raises(ValueError, match="distill_loss_weights"):
        dr_trainer_config(AUG, 30, [{"model": "ViT-L-14", "dim": 768}], distill_loss_weights=(0.0, 0.0))


def _trainer_args(dims, scales, weights=(0.0, 1.0)):
    """The flags of DataCompDR's run scripts, one logit scale per teacher (the v2 trainer indexes them)."""
    return ["--dataset-reinforcement", "--dataset-reinforcement-config", "dr_config.json",
            "--distill-logit-scale", *map(repr, scales), "--distill-loss-weights", *map(repr, weights),
            "--distill-teacher-dimension", *map(str, dims), "--distill-average-after-softmax"]


def test_trainer_args_carry_the_loss_weights_of_datacompdr_scripts():
    teachers = [{"model": "ViT-L-14", "pretrained": "openai", "dim": 768, "logit_scale": 70.0},
                {"model": "ViT-L-14", "pretrained": "datacomp_xl_s13b_b90k", "dim": 768, "logit_scale": 60.0}]
    config = dr_trainer_config(AUG, 30, teachers)
    assert config["distill_loss_weights"] == [0.0, 1.0] and config["distill_average_after_softmax"] is True
    assert config["trainer_args"] == _trainer_args([768, 768], [70.0, 60.0])
    one_b = dr_trainer_config(AUG, 10, teachers, distill_loss_weights=(0.25, 0.75))  # DataCompDR-1B's ViT-B/16
    assert one_b["trainer_args"] == _trainer_args([768, 768], [70.0, 60.0], (0.25, 0.75))
    scale = 1 / 0.07  # an exact float reaches the trainer, as the reader uses it
    args = dr_trainer_config(AUG, 10, [{"model": "t", "dim": 4, "logit_scale": scale}])["trainer_args"]
    assert float(args[args.index("--distill-logit-scale") + 1]) == scale


@pytest.fixture(scope="module")
def teacher_kinds(tmp_path_factory):
    """One teacher of each kind that needs no download: a local-dir: folder, a registered open_clip config
    with a checkpoint file, the same config with random weights, and two ViT-L-14 tags (read from
    open_clip's tables only)."""
    import open_clip
    folder = tmp_path_factory.mktemp("oc_configs")
    (folder / "rf-fmt-clip.json").write_text(json.dumps({**TINY_CLIP, "embed_dim": 24}))
    open_clip.add_model_config(folder)
    checkpoint = tmp_path_factory.mktemp("oc_ckpt") / "tiny.pt"
    torch.manual_seed(11)
    torch.save(open_clip.create_model("rf-fmt-clip").state_dict(), checkpoint)
    return [{"model": tiny_open_clip("clip", 32, seed=4)}, {"model": "rf-fmt-clip", "pretrained": str(checkpoint)},
            {"model": "rf-fmt-clip"}, {"model": "ViT-L-14", "pretrained": "openai"},
            {"model": "ViT-L-14", "pretrained": "datacomp_xl_s13b_b90k"}]


def test_dr_config_rebuilds_every_teacher_kind_in_open_clip(teacher_kinds, tmp_path):
    """model_name / pretrained are what the trainer's --distill-model / --distill-pretrained pass, comma-split,
    to open_clip.create_model: with them open_clip builds the very teachers whose embeddings are stored."""
    import open_clip

    from reinforge.products.mobileclip_dr.pipeline import MobileCLIPPipeline
    from reinforge.products.registry import parse_recipe
    from reinforge.models.open_clip import load_open_clip
    augmentation = {"num_samples": 2, "image_augmentation": {"random_resized_crop": {"size": 224}}}
    recipe = parse_recipe({"product": "mobileclip_dr", "output": str(tmp_path / "run"), "mode": "embeddings",
                           "input": {"format": "webdataset", "path": str(tmp_path / "in" / "*.tar")},
                           "augmentation": augmentation, "teachers": teacher_kinds})
    layout = RunLayout(str(tmp_path / "run"))
    MobileCLIPPipeline(recipe).prepare(layout)
    config = json.load(open(layout.dr_config))
    local_dir, checkpoint = teacher_kinds[0]["model"], teacher_kinds[1]["pretrained"]
    assert config["model_name"].split(",") == [local_dir, "rf-fmt-clip", "rf-fmt-clip", "ViT-L-14-quickgelu",
                                               "ViT-L-14"]
    assert config["pretrained"].split(",") == ["", checkpoint, "", "openai", "datacomp_xl_s13b_b90k"]
    assert [t["model"] for t in config["teachers"]] == [t["model"] for t in teacher_kinds]  # the recipe's own
    assert config["trainer_args"] == _trainer_args([32, 24, 24, 768, 768], [100.0] * 5)
    pairs = list(zip(config["model_name"].split(","), config["pretrained"].split(",")))
    image = torch.rand(2, 3, 32, 32)
    for (name, pretrained), teacher in zip(pairs[:2], teacher_kinds[:2]):  # same weights, same embeddings
        rebuilt = open_clip.create_model(name, pretrained).eval()
        ours = load_open_clip(teacher["model"], teacher.get("pretrained"))[0]
        with torch.no_grad():
            assert torch.equal(rebuilt.encode_image(image), ours.encode_image(image))
    assert open_clip.create_model(*pairs[2]).text_projection.shape[1] == 24  # random init: the architecture
    for name, tag in pairs[3:]:  # tags: known to open_clip, with the activation the weights were trained with
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        assert tag_cfg and open_clip.get_model_config(name).get("quick_gelu", False) == tag_cfg.get("quick_gelu", False)


@pytest.mark.parametrize("model, pretrained", [("hf-hub:apple/DFN2B-CLIP-ViT-L-14", None),
                                               ("ViT-L-14", "hf-hub:apple/DFN2B-CLIP-ViT-L-14")])
def test_dr_config_names_hf_hub_teachers_by_their_repo(model, pretrained):
    """An hf-hub: repo carries config and weights: it is the model name and pretrained stays empty (the
    open_clip of Apple's patch raises on any other pretrained value for an hf-hub: name)."""
    from reinforge.models.open_clip import resolve_source, trainer_open_clip_args
    args = trainer_open_clip_args(resolve_source(model, pretrained))
    assert args == {"model_name": "hf-hub:apple/DFN2B-CLIP-ViT-L-14", "pretrained": ""}
    teachers = [{"model": model, "pretrained": pretrained, "dim": 768, "open_clip": args}] * 2
    config = dr_trainer_config(AUG, 30, teachers)
    assert config["model_name"] == "hf-hub:apple/DFN2B-CLIP-ViT-L-14,hf-hub:apple/DFN2B-CLIP-ViT-L-14"
    assert config["pretrained"] == ","


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
# open_clip's own trainer pipeline (open_clip_train.data.get_wds_dataset, shipped in open_clip_torch)

def _wds_args(pattern: str, num_samples: int, batch_size: int) -> argparse.Namespace:
    """The fields of open_clip_train's parsed arguments that get_wds_dataset reads."""
    return argparse.Namespace(train_data=pattern, val_data=pattern, dataset_resampled=False,
                              train_num_samples=num_samples, val_num_samples=num_samples,
                              train_data_upsampling_factors=None, seed=0, workers=0, world_size=1,
                              batch_size=batch_size)


def _plain_shards(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    samples = [(uid(100 + i), {"jpg": jpeg_bytes(photo(i, 48)), "txt": CAPTIONS[i % 6].encode()}) for i in range(6)]
    write_shard(os.path.join(folder, "00000000.tar"), samples)
    return os.path.join(str(folder), "00000000.tar")


@pytest.fixture(scope="module")
def trainer_shards(samples, dfndr_run, tmp_path_factory) -> dict[str, tuple[str, int]]:
    """(shard pattern, samples) of a plain image-text shard and of reinforge DataCompDR / DFNDR runs."""
    legacy = write_run(tmp_path_factory.mktemp("legacy"), samples, StorageSpec("npz", "float16", "legacy"))
    return {"plain": (_plain_shards(tmp_path_factory.mktemp("plain")), 6),
            "datacompdr_npz": (os.path.join(legacy, "shards", "part-{000000..000001}.tar"), NUM_SAMPLES),
            "dfndr_pth_gz": (os.path.join(dfndr_run, "shards", "part-{000000..000001}.tar"), NUM_SAMPLES)}


@pytest.mark.parametrize("kind", ["plain", "datacompdr_npz", "dfndr_pth_gz"])
def test_open_clip_train_get_wds_dataset_reads_the_shards(trainer_shards, kind):
    """open_clip's training pipeline yields every sample's image and caption (webdataset >= 0.2.96 breaks
    its shard reader with KeyError 'fname'); its eval pipeline yields the very image its preprocess makes."""
    import open_clip
    from open_clip_train.data import get_wds_dataset
    pattern, count = trainer_shards[kind]
    model = tiny_open_clip("clip", 32, seed=3)
    _, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model)
    tokenizer = open_clip.get_tokenizer(model)
    caption_of = {tuple(tokenizer(c)[0].tolist()): c for c in CAPTIONS}
    train = get_wds_dataset(_wds_args(pattern, count, 2), preprocess_train, is_train=True, tokenizer=tokenizer)
    batches = list(train.dataloader)
    assert len(batches) == train.dataloader.num_batches == count // 2
    for images, texts in batches:
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
        assert all(tuple(t.tolist()) in caption_of for t in texts)
    val = get_wds_dataset(_wds_args(pattern, count, 4), preprocess_val, is_train=False, tokenizer=tokenizer)
    seen = 0
    for images, texts in val.dataloader:
        for image, text in zip(images, texts):
            jpgs = _jpgs_with_caption(pattern, caption_of[tuple(text.tolist())])
            assert any(torch.equal(image, preprocess_val(Image.open(io.BytesIO(j)).convert("RGB"))) for j in jpgs)
            seen += 1
    assert seen == count


def _jpgs_with_caption(pattern: str, caption: str) -> list[bytes]:
    from webdataset.shardlists import expand_urls

    from reinforge.formats.wds import iter_samples
    out = []
    for url in expand_urls(pattern):
        with open(url, "rb") as f:
            out += [m["jpg"] for m in iter_samples(f) if m["txt"].decode() == caption]
    return out


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


def _dot(a, b, lo=0, hi=None):
    return sum(float(x) * float(y) for x, y in list(zip(a, b))[lo:hi])


def _apple_dr_clip_loss(img, txt, syn, s, t_img, t_txt, t_syn, dims, scales, weights, after_softmax=True):
    """Apple's DRClipLoss output dict {contrastive_loss, distill_loss}, from its published behaviour, in
    plain Python: per caption kind, w_c x the mean of open_clip's two CLIP cross-entropies and w_d x the
    mean of the two soft cross-entropies (image->text rows, text->image rows) to the teachers' target;
    the target is the mean over teachers of softmax(sigma_t * slice-t similarities) with
    --distill-average-after-softmax, else softmax(sigma * full-D similarities) with the one sigma.
    The ground-truth and synthetic caption kinds are summed."""
    B = len(img)
    bounds = [(sum(dims[:t]), sum(dims[:t + 1])) for t in range(len(dims))]

    def target(rows, cols):  # rows[i] against every cols[j]
        if not after_softmax:
            return [_hand_softmax([scales[0] * _dot(rows[i], cols[j]) for j in range(B)]) for i in range(B)]
        out = [[0.0] * B for _ in range(B)]
        for (lo, hi), sigma in zip(bounds, scales):
            for i in range(B):
                for j, p in enumerate(_hand_softmax([sigma * _dot(rows[i], cols[k], lo, hi) for k in range(B)])):
                    out[i][j] += p / len(dims)
        return out

    def kind(student_text, teacher_text):
        L = [[s * _dot(img[i], student_text[j]) for j in range(B)] for i in range(B)]
        LT = [list(col) for col in zip(*L)]
        onehot = [[float(i == j) for j in range(B)] for i in range(B)]
        contrastive = (_hand_ce(L, onehot) + _hand_ce(LT, onehot)) / 2
        distill = (_hand_ce(L, target(t_img, teacher_text)) + _hand_ce(LT, target(teacher_text, t_img))) / 2
        return weights[0] * contrastive, weights[1] * distill

    kinds = [kind(txt, t_txt)] + ([kind(syn, t_syn)] if syn is not None else [])
    return {"contrastive_loss": sum(c for c, _ in kinds), "distill_loss": sum(d for _, d in kinds),
            "per_kind": [c + d for c, d in kinds]}


def _loss_batch(dims, seed=0):
    """Random unit student features [B, 6] and teacher rows whose slices are unit-norm on their own."""
    g = torch.Generator().manual_seed(seed)
    B = 4
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731

    def teacher():
        return torch.cat([unit(torch.randn(B, d, generator=g)) for d in dims], 1)
    img, txt, syn = (unit(torch.randn(B, 6, generator=g)) for _ in range(3))
    return img, txt, syn, teacher(), teacher(), teacher()


@pytest.mark.parametrize("with_syn", [True, False])
@pytest.mark.parametrize("weights", [None, (0.0, 1.0), (0.25, 0.75)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_equals_apples_dr_clip_loss(with_syn, weights, reduction):
    """Two teachers of different widths and logit scales (DFNDR's 70 / 60). Default: Apple's reduction
    (kinds summed) and Apple's flag default weights (1, 1); "mean" averages the caption kinds."""
    dims, scales, s = [5, 3], [70.0, 60.0], 12.5
    img, txt, syn, t_img, t_txt, t_syn = _loss_batch(dims)
    if not with_syn:
        syn = t_syn = None
    kwargs = {} if weights is None else {"loss_weights": weights}
    out = mobileclip_distill_loss(img, txt, syn, torch.tensor(s), t_img, t_txt, t_syn, dims, scales,
                                  reduction=reduction, **kwargs)
    apple = _apple_dr_clip_loss(img, txt, syn, s, t_img, t_txt, t_syn, dims, scales, weights or (1.0, 1.0))
    kinds = 2 if with_syn else 1
    per = 1.0 if reduction == "sum" else 1.0 / kinds
    for key in ("contrastive_loss", "distill_loss"):
        assert out[key].item() == pytest.approx(per * apple[key], rel=1e-5, abs=1e-7), key
    assert out["loss"].item() == pytest.approx(per * (apple["contrastive_loss"] + apple["distill_loss"]), rel=1e-5)
    assert out["loss_gt"].item() == pytest.approx(apple["per_kind"][0], rel=1e-5)
    assert ("loss_syn" in out) == with_syn
    if with_syn:
        assert out["loss_syn"].item() == pytest.approx(apple["per_kind"][1], rel=1e-5)


def test_loss_without_average_after_softmax_and_lambda_weighting():
    """No --distill-average-after-softmax: one softmax over the whole D with the one logit scale; the
    (1-lam)/lam weighting of FORMATS is loss_weights=(1 - lam, lam)."""
    dims, s, lam = [5, 3], 9.0, 0.3
    img, txt, syn, t_img, t_txt, t_syn = _loss_batch(dims, seed=1)
    out = mobileclip_distill_loss(img, txt, syn, s, t_img, t_txt, t_syn, dims, [50.0, 50.0],
                                  loss_weights=(1 - lam, lam), average_after_softmax=False)
    apple = _apple_dr_clip_loss(img, txt, syn, s, t_img, t_txt, t_syn, dims, [50.0], (1 - lam, lam),
                                after_softmax=False)
    assert out["contrastive_loss"].item() == pytest.approx(apple["contrastive_loss"], rel=1e-5)
    assert out["distill_loss"].item() == pytest.approx(apple["distill_loss"], rel=1e-5)
    rows_i, rows_t = teacher_targets(t_img, t_txt, dims, [70.0, 60.0])
    assert torch.allclose(rows_i.sum(1), torch.ones(4)) and torch.allclose(rows_t.sum(1), torch.ones(4))


def test_loss_refusals():
    dims, scales = [5, 3], [70.0, 60.0]
    img, txt, syn, t_img, t_txt, t_syn = _loss_batch(dims)
    args = (img, txt, syn, 10.0, t_img, t_txt, t_syn)
    with pytest.raises(ValueError, match="D=8, teacher_dims sum to 9"):
        mobileclip_distill_loss(*args, [5, 4], scales)
    with pytest.raises(ValueError, match="reduction"):
        mobileclip_distill_loss(*args, dims, scales, reduction="average")
    with pytest.raises(ValueError, match="loss_weights"):
        mobileclip_distill_loss(*args, dims, scales, loss_weights=(1.0,))
    with pytest.raises(ValueError, match="one logit scale for all teachers"):
        mobileclip_distill_loss(*args, dims, scales, average_after_softmax=False)
    with pytest.raises(ValueError, match="pass both"):
        mobileclip_distill_loss(img, txt, syn, 10.0, t_img, t_txt, None, dims, scales)


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
                                      ds.teacher_dims, ds.teacher_logit_scales, loss_weights=ds.distill_loss_weights)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
