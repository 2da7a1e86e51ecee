"""The view a teacher scores is the view the consumer's trainer makes from the stored entry (FORMATS §1):
reinforge's `pil` backend against Apple's reference replay, written from its behaviour
(tests/consumer_reference.py), and against outputs of Apple's own code (tests/golden/), bit for bit."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, photo, png_bytes
from consumer_reference import default_loader, reapply
from torchvision.transforms import RandAugment

from reinforge.formats.augment import Augmenter
from reinforge.formats.rand_augment import RAND_AUGMENT_OPS
from reinforge.formats.seeds import entry_seed
from reinforge.formats.image import decode_rgb
from reinforge.stages.augment import Augment
from reinforge.stages.base import Batch

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGENET_PLUS = {  # ml-dr's RandAugment + mixing set, small views
    "random_resized_crop": {"size": 40}, "random_horizontal_flip": {"p": 0.5}, "rand_augment": {"p": 1.0},
    "to_tensor": {}, "random_erase": {"p": 0.25}, "normalize": {"mean": MEAN, "std": STD},
    "mixup": {"alpha": 1.0, "p": 0.5, "div_by": 2.0}, "cutmix": {"alpha": 1.0, "p": 0.5},
}
DATACOMP_DR = {"random_resized_crop": {"size": 40, "interpolation": "bicubic"}, "rand_augment": {"p": 1.0},
               "normalize": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}
GEOMETRY = {  # every other transform: resize, center and random crops (padded), bilinear RandAugment
    "resize": {"size": 60, "interpolation": "bicubic"}, "center_crop": {"size": 56},
    "random_crop": {"size": [40, 48], "padding": 3}, "random_horizontal_flip": {"p": 0.5},
    "rand_augment": {"p": 0.8, "interpolation": "bilinear", "num_ops": 3}, "random_erase": {"p": 0.5},
    "normalize": {"mean": MEAN, "std": STD}, "mixup": {"p": 0.5}, "cutmix": {"p": 0.5},
}
CONFIGS = {"imagenet_plus": IMAGENET_PLUS, "datacomp_dr": DATACOMP_DR, "geometry": GEOMETRY}


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Real photos as files, JPEG and PNG, of different sizes."""
    return {f"img{i}": (jpeg_bytes if i % 2 else png_bytes)(photo(i, 64 + 12 * i)) for i in range(4)}


def draw(augmenter: Augmenter, images: dict, key: str, n: int) -> tuple[list, str]:
    rng = random.Random(entry_seed(5, key, n))
    partner = [k for k in images if k != key][n % 3]
    hw = {k: tuple(decode_rgb(b).shape[-2:]) for k, b in (images.items())}
    entry = augmenter.sample(rng, hw[key], partner, hw[partner]) if augmenter.uses_partner else \
        augmenter.sample(rng, hw[key])
    return json.loads(json.dumps(entry)), partner  # as stored


def every_rand_augment_op(config: dict, image_hw: tuple[int, int]) -> list[list]:
    """Unmixed entries that apply each of the 14 ops at torchvision's bin-9 magnitude, with both signs."""
    mixing = [k for k in ("mixup", "cutmix") if k in config]
    plain = Augmenter({k: v for k, v in config.items() if k not in mixing})
    slot = plain.layout().index("rand_augment")
    table = RandAugment()._augmentation_space(31, plain.output_size)
    entries = []
    for op, name in enumerate(RAND_AUGMENT_OPS):
        values, signed = table[name]
        value = float(values[9]) if values.ndim > 0 else 0.0
        for sign in ((1, -1) if signed else (1,)):
            magnitude = int(sign * value) if name in ("TranslateX", "TranslateY", "Posterize") else \
                round(sign * value, 4)
            view = plain.sample(random.Random(op * 2 + sign), image_hw)
            view[slot] = [[op, magnitude]] * config["rand_augment"].get("num_ops", 2)
            entries.append([None] * bool(mixing) + view + [None] * len(mixing))
    return entries


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pil_replay_is_the_reference_trainers_view(name, images):
    config = CONFIGS[name]
    augmenter = Augmenter(config, "pil")
    decoded = {k: decode_rgb(b) for k, b in images.items()}
    pil = {k: default_loader(b) for k, b in images.items()}
    trainer_config = augmenter.config()  # what dr_config.json holds
    cases = [(key, *draw(augmenter, images, key, n)) for key in images for n in range(12)]
    cases += [("img2", entry, None) for entry in every_rand_augment_op(config, tuple(decoded["img2"].shape[-2:]))]
    mixed = 0
    for key, entry, partner in cases:
        partner = entry[0] if augmenter.uses_partner and entry[0] is not None else None
        mixed += partner is not None
        ours = augmenter.apply(entry, decoded[key], decoded[partner] if partner else None)
        theirs = reapply(trainer_config, entry, pil[key], pil[partner] if partner else None)
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs), (name, entry)
    assert mixed > 0 or not augmenter.uses_partner


def test_tensor_backend_is_not_the_consumers_view(images):
    """Why the backend matters: the same parameters on uint8 tensors give other pixels (bicubic)."""
    entry = draw(Augmenter(DATACOMP_DR), images, "img1", 0)[0]
    image = decode_rgb(images["img1"])
    pil, tensor = Augmenter(DATACOMP_DR, "pil").apply(entry, image), Augmenter(DATACOMP_DR, "tensor").apply(entry, image)
    assert pil.shape == tensor.shape and not torch.equal(pil, tensor)


@pytest.mark.parametrize("name", ["imagenet_plus", "datacomp_dr"])
def test_views_the_teachers_score_are_the_consumers(name, images):
    """The Augment stage (what both products run before their teachers) hands the teachers exactly the
    views the consumer rebuilds from the stored entries."""
    config = CONFIGS[name]
    stage = Augment(config, num_samples=6, seed=11)  # the products' default backend
    assert stage.augmenter.backend == "pil"
    batch = Batch([{"__key__": k, "image": decode_rgb(b)} for k, b in images.items()])
    out = stage(batch)
    assert not out.errors and len(out.samples) == len(images)
    trainer_config = stage.augmenter.config()
    for sample in out.samples:
        for entry, view in zip(sample["entries"], sample["views"]):
            entry = json.loads(json.dumps(entry))
            partner = entry[0] if stage.augmenter.uses_partner else None
            expected = reapply(trainer_config, entry, default_loader(images[sample["__key__"]]),
                               default_loader(images[partner]) if partner is not None else None)
            assert torch.equal(view, expected), entry


GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "consumer_replay.npz")


def test_replay_equals_apples_own_code():
    """Outputs of Apple's ml-dr and ml-mobileclip replay code (run once by tests/golden/make_consumer_golden.py
    on these PNGs and entries) against reinforge's pil backend."""
    import PIL
    import torchvision
    golden = np.load(GOLDEN, allow_pickle=False)
    meta = json.loads(str(golden["meta"]))
    same_versions = (meta["pillow"], meta["torchvision"]) == (PIL.__version__, torchvision.__version__)
    for case in meta["cases"]:
        augmenter = Augmenter(case["config"], "pil")
        image = decode_rgb(golden[case["image"]].tobytes())
        partner = decode_rgb(golden[case["partner"]].tobytes()) if case["partner"] else None
        ours = augmenter.apply(case["entry"], image, partner).numpy()
        theirs = golden[case["output"]]
        assert ours.shape == theirs.shape, case
        if same_versions:
            assert np.array_equal(ours, theirs), case
        else:  # another Pillow/torchvision may resample by a rounding step differently
            assert np.abs(ours - theirs).max() <= 2 / 255 / min(case.get("std", [1.0])), case
    assert {c["consumer"] for c in meta["cases"]} == {"ml-dr", "ml-mobileclip"}
