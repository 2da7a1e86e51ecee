"""models/: the teacher spec union by `kind` (defaults per place, dumps as before kinds existed,
one-line errors), the Teacher protocol both loaders implement, and bad-sample isolation in the pool
encoder. Tiny real models: a random-init timm resnet10t and a random-init open_clip folder."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import tiny_open_clip

from reinforge.formats.recipe import ConfigError, config_digest
from reinforge.models.specs import TEACHER_SPECS, OpenClipTeacherSpec, TimmTeacherSpec
from reinforge.models.teacher import LOADERS, load_teacher
from reinforge.products.registry import load_recipe, parse_recipe

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
AUG = {"num_samples": 2, "image_augmentation": {"random_resized_crop": {"size": 32}}}
INPUT = {"format": "webdataset", "path": "in/*.tar"}
# config digests of the shipped recipes before teacher kinds existed: runs made then still resume
DIGESTS_BEFORE_KINDS = {"demo.yaml": "fd1c84b8923ffa3e", "embed_pool.yaml": "bd43ee71dba5e048",
                        "imagenet_plus.yaml": "3227c5048872af36", "mobileclip_dr.yaml": "28ff926ec82a2cc4"}


def imagenet(teacher: dict) -> dict:
    return {"output": "o", "input": {"format": "imagefolder", "path": "in"}, "augmentation": AUG,
            "teachers": [teacher]}


def mobileclip(teacher: dict) -> dict:
    return {"product": "mobileclip_dr", "output": "o", "mode": "embeddings", "input": INPUT,
            "augmentation": AUG, "teachers": [teacher]}


def embed(encoder: dict) -> dict:
    return {"product": "embed_pool", "output": "o", "input": INPUT, "encoder": encoder}


def config_error(raw: dict, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        parse_recipe(raw, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_kind_has_a_loader():
    assert set(LOADERS) == set(TEACHER_SPECS)


@pytest.mark.parametrize("name", sorted(DIGESTS_BEFORE_KINDS))
def test_shipped_recipes_keep_their_digests(name):
    with open(os.path.join(CONFIGS, name)) as f:
        recipe = load_recipe(f.read())
    assert config_digest(recipe) == DIGESTS_BEFORE_KINDS[name]


def test_recipes_without_kind_dump_as_before():
    """What run.json and dr_config.json recorded before kinds: teachers without `kind`, encoders with it.
    Naming a place's default kind changes nothing; another kind is written out."""
    timm = parse_recipe(imagenet({"model": "resnet10t", "num_classes": 10}))
    before = {"model": "resnet10t", "pretrained": False, "checkpoint": None, "checkpoint_key_map": "exact",
              "num_classes": 10, "batch_size": 64}
    assert timm.model_dump(mode="json")["teachers"] == [before]
    assert timm.teachers[0].model_dump(mode="json") == before  # as dr_config.json writes each teacher
    explicit = parse_recipe(imagenet({"model": "resnet10t", "num_classes": 10, "kind": "timm"}))
    assert explicit.model_dump(mode="json") == timm.model_dump(mode="json")
    assert config_digest(explicit) == config_digest(timm)

    clip = parse_recipe(mobileclip({"model": "ViT-B-32"}))
    before = {"model": "ViT-B-32", "pretrained": None, "batch_size": 64, "logit_scale": None, "precision": "float32"}
    assert clip.model_dump(mode="json")["teachers"] == [before]
    assert clip.teachers[0].model_dump(mode="json") == before
    assert config_digest(parse_recipe(mobileclip({"model": "ViT-B-32", "kind": "open_clip"}))) == config_digest(clip)
    assert parse_recipe(clip.model_dump(mode="json")).model_dump() == clip.model_dump()  # run.json re-parses

    encoder = parse_recipe(embed({"model": "ViT-B-32"})).model_dump(mode="json")["encoder"]
    assert encoder == {"kind": "open_clip", "model": "ViT-B-32", "pretrained": None, "checkpoint": None,
                       "checkpoint_key_map": "exact", "image_size": None, "batch_size": 64,
                       "precision": "float32", "text": False}


def test_unknown_or_unusable_kind_is_a_one_line_config_error():
    known = "known: open_clip, timm"
    assert config_error(imagenet({"model": "resnet10t", "kind": "onnx"})) == \
        f"config error: teachers.0.kind: unknown teacher kind 'onnx'; {known}"
    assert config_error(mobileclip({"model": "ViT-B-32", "kind": "onnx"})) == \
        f"config error: teachers.0.kind: unknown teacher kind 'onnx'; {known}"
    assert config_error(embed({"model": "ViT-B-32", "kind": "onnx"})) == \
        f"config error: encoder.kind: Value error, unknown teacher kind 'onnx'; {known}"
    assert config_error(imagenet({"model": "resnet10t"}), ("teachers.0.kind=open_clip",)) == \
        "config error: teachers.0.kind: imagenet_plus teachers must be of kind timm, not 'open_clip'"
    assert config_error(mobileclip({"model": "resnet10t", "kind": "timm"})) == \
        "config error: teachers.0.kind: mobileclip_dr teachers must be of kind open_clip, not 'timm'"
    # the fields of the chosen kind are checked as before, under the same names
    assert config_error(imagenet({"model": "resnet10t", "precision": "float16"})) == \
        "config error: teachers.0.precision: Extra inputs are not permitted"
    assert config_error(mobileclip({"model": "ViT-B-32", "batch_size": 0})).startswith(
        "config error: teachers.0.batch_size: Input should be greater than or equal to 1")
    assert config_error(imagenet("resnet10t")).startswith("config error: teachers.0: Input should be a mapping")
    assert "text: a timm model has no text tower" in config_error(embed({"model": "resnet10t", "kind": "timm",
                                                                          "text": True}))


def test_both_loaders_give_the_teacher_protocol():
    timm = load_teacher(TimmTeacherSpec(model="resnet10t", num_classes=10, batch_size=3), "cpu", "float32")
    assert (timm.size, timm.dim, timm.num_classes, timm.text_tower) == ((176, 176), 10, 10, False)
    assert len(timm.mean) == len(timm.std) == 3 and timm.version["model"] == "resnet10t"
    x = timm.normalize(torch.rand(5, 3, 32, 32))
    with torch.inference_mode():
        assert timm.images(x).shape == (5, 10) and timm.images(x[:0]).shape == (0, 10)  # chunks of 3, and none
        assert torch.allclose(timm.images(x), timm.model(x), atol=1e-5)
    with pytest.raises(ValueError, match="no text tower"):
        timm.texts(["a cat"])
    pooled = load_teacher(TimmTeacherSpec(model="resnet10t"), "cpu", "float32", pooled=True, image_size=48)
    assert (pooled.size, pooled.dim, pooled.num_classes) == ((48, 48), 512, None)

    clip = load_teacher(OpenClipTeacherSpec(model=tiny_open_clip(), batch_size=2), "cpu", "float32",
                        image_size=64)  # an open_clip model keeps its own input size
    assert (clip.size, clip.dim, clip.num_classes, clip.text_tower) == ((32, 32), 32, None, True)
    assert clip.logit_scale == pytest.approx(1 / 0.07)  # a local-dir: folder holds weights: the model's own scale
    with torch.inference_mode():
        assert clip.images(clip.normalize(torch.rand(3, 3, 32, 32))).shape == (3, 32)
        assert clip.texts(["a cat", "a dog", "a cup"]).shape == (3, 32) and clip.texts([]).shape == (0, 32)


def test_encoder_isolates_a_bad_sample():
    """The pool encoder (a model stage) skips and counts a sample that breaks its batch; the others are
    embedded exactly as in a batch of their own."""
    from reinforge.stages.base import Batch
    from reinforge.stages.embed import Encoder
    recipe = parse_recipe(embed({"model": tiny_open_clip(), "batch_size": 2}))
    encoder = Encoder(recipe.encoder, device="cpu")
    encoder.setup()
    torch.manual_seed(0)
    good = [{"__key__": f"k{i}", "sha256": "0" * 64, "view": torch.rand(3, 32, 32)} for i in range(3)]
    bad = {"__key__": "bad", "sha256": "0" * 64, "view": torch.rand(2, 32, 32)}  # two channels
    alone = encoder(Batch([dict(s) for s in good]))
    out = encoder(Batch([dict(good[0]), bad, dict(good[1]), dict(good[2])]))
    assert [s["__key__"] for s in out.samples] == ["k0", "k1", "k2"]
    assert [(e.key, e.stage) for e in out.errors] == [("bad", "encoder")]
    for got, want in zip(out.samples, alone.samples):
        assert np.allclose(got["members"]["image_emb"].astype(np.float32),
                           want["members"]["image_emb"].astype(np.float32), atol=1e-3)
