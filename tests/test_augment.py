"""Replayable augmentations (FORMATS.md section 1) on real photos."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from skimage import data
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

from reinforge.formats.augment import Augmenter
from reinforge.formats.augment_config import TRANSFORM_ORDER
from reinforge.formats.rand_augment import RAND_AUGMENT_OPS
from reinforge.formats.seeds import entry_seed

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

RRC_RA = {  # DataCompDR: RRC + RandAugment only
    "random_resized_crop": {"size": 224, "interpolation": "bicubic"},
    "rand_augment": {"p": 1.0},
    "normalize": {"mean": MEAN, "std": STD},
}
IMAGENET_PLUS = {  # ml-dr randaug_mixing.yaml, small output size to keep the test fast
    "uint8": {"enable": True},
    "random_resized_crop": {"enable": True, "size": 96},
    "random_horizontal_flip": {"enable": True, "p": 0.5},
    "rand_augment": {"enable": True, "p": 1.0},
    "to_tensor": {"enable": True},
    "normalize": {"mean": MEAN, "std": STD},
    "random_erase": {"enable": True, "p": 0.25},
    "mixup": {"enable": True, "alpha": 1.0, "div_by": 2.0, "p": 0.5},
    "cutmix": {"enable": True, "alpha": 1.0, "p": 0.5},
}


def chw(array) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small images: torch's intra-op threads only add contention on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    return {"astronaut": chw(data.astronaut()), "chelsea": chw(data.chelsea()), "coffee": chw(data.coffee())}


def hw(image: torch.Tensor) -> tuple[int, int]:
    return tuple(image.shape[-2:])


def draw(aug: Augmenter, seed: int, photos: dict, name="astronaut", partner="coffee") -> list:
    rng = random.Random(entry_seed(0, name, seed))
    if aug.uses_partner:
        return aug.sample(rng, hw(photos[name]), partner, hw(photos[partner]))
    return aug.sample(rng, hw(photos[name]))


def is_box(slot, n=4) -> bool:
    return isinstance(slot, list) and len(slot) == n and all(type(v) is int for v in slot)


def is_rand_augment(slot) -> bool:
    return (isinstance(slot, list) and len(slot) == 2
            and all(type(op) is int and type(mag) in (int, float) for op, mag in slot))


# -- layout ----------------------------------------------------------------------------------------

def test_layout_rrc_rand_augment(photos):
    aug = Augmenter(RRC_RA)
    assert not aug.uses_partner and aug.output_size == (224, 224)
    for seed in range(20):
        entry = draw(aug, seed, photos)
        assert len(entry) == 2, entry  # [[t, l, h, w], [[op, mag], [op, mag]]]
        assert is_box(entry[0]) and is_rand_augment(entry[1])


def test_layout_without_random_parameters(photos):
    aug = Augmenter({"resize": {"size": 256}, "center_crop": {"size": 224}, "normalize": {"mean": MEAN, "std": STD}})
    # ml-dr's Compose.compress gives resize a slot (its fixed size); only uint8, center_crop, to_tensor
    # and normalize have none
    assert aug.sample(random.Random(0), (512, 512)) == [256]
    assert aug.output_size == (224, 224)
    x = aug.apply([256], photos["chelsea"])
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32


def test_layout_crop_flip_erase(photos):
    aug = Augmenter({"random_crop": {"size": [200, 240], "padding": 4}, "random_horizontal_flip": {},
                     "random_erase": {"p": 0.5}})
    assert aug.output_size == (200, 240)
    kinds = Counter()
    for seed in range(50):
        crop, flip, erase = draw(aug, seed, photos, "chelsea")
        assert is_box(crop, 2) and isinstance(flip, bool) and (erase is None or is_box(erase))
        kinds[flip] += 1
        kinds["erase"] += erase is not None
        assert aug.apply([crop, flip, erase], photos["chelsea"]).shape == (3, 200, 240)
    assert kinds[True] and kinds[False] and 0 < kinds["erase"] < 50


def test_layout_with_mixing(photos):
    aug = Augmenter(IMAGENET_PLUS)
    assert aug.uses_partner
    assert aug.layout() == ["partner", "random_resized_crop", "random_horizontal_flip", "rand_augment",
                            "random_erase", "mixup", "cutmix"]
    seen = Counter()
    for seed in range(100):
        entry = draw(aug, seed, photos)
        assert len(entry) == 7
        partner, rrc, flip, ra, erase, mixup, cutmix = entry
        if partner is None:  # no mixing: plain slots, mixing slots null
            seen["plain"] += 1
            assert is_box(rrc) and isinstance(flip, bool) and is_rand_augment(ra)
            assert (erase is None or is_box(erase)) and mixup is None and cutmix is None
        else:  # mixing: every non-mixing slot is [self, partner], exactly one mixing slot set
            assert partner == "coffee"
            assert all(isinstance(s, list) and len(s) == 2 for s in (rrc, flip, ra, erase))
            assert all(is_box(b) for b in rrc) and all(isinstance(f, bool) for f in flip)
            assert all(is_rand_augment(r) for r in ra) and all(e is None or is_box(e) for e in erase)
            assert (mixup is None) != (cutmix is None)
            seen["mixup" if mixup is not None else "cutmix"] += 1
            if mixup is not None:
                assert 0.0 <= mixup <= 0.5  # div_by 2
            else:  # ml-dr: lam is the Beta draw, the box has sides int(96 * sqrt(1 - lam)) before clipping
                lam, x1, y1, x2, y2 = cutmix
                assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 96 and 0.0 <= lam <= 1.0
                side = int(96 * (1.0 - lam) ** 0.5)
                assert x2 - x1 <= 2 * (side // 2) and y2 - y1 <= 2 * (side // 2)
    # choose one of the two (0.5) then its p (0.5): about 25 / 25 / 50 of 100
    assert seen["mixup"] > 10 and seen["cutmix"] > 10 and seen["plain"] > 30


def test_single_mixing_transform_always_chosen(photos):
    aug = Augmenter({"random_resized_crop": {"size": 64}, "cutmix": {"p": 1.0}})
    for seed in range(10):
        entry = draw(aug, seed, photos)
        assert entry[0] == "coffee" and len(entry) == 3 and entry[2][0] <= 1.0


def test_config_order_does_not_matter(photos):
    forward = Augmenter(IMAGENET_PLUS)
    backward = Augmenter(dict(reversed(list(IMAGENET_PLUS.items()))))
    assert forward.config() == backward.config()
    assert list(forward.config()) == [k for k in TRANSFORM_ORDER if k in forward.config()]
    for seed in range(10):
        entry = draw(forward, seed, photos)
        assert entry == draw(backward, seed, photos)
        assert torch.equal(forward.apply(entry, photos["astronaut"], photos["coffee"]),
                           backward.apply(entry, photos["astronaut"], photos["coffee"]))


def test_config_is_normalised_and_round_trips():
    aug = Augmenter(IMAGENET_PLUS)
    config = aug.config()
    assert json.loads(json.dumps(config)) == config
    assert Augmenter(config).config() == config
    assert config["uint8"] == {} and config["to_tensor"] == {}
    assert config["random_resized_crop"] == {"size": 96, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                                             "interpolation": "bilinear"}
    assert config["rand_augment"] == {"p": 1.0, "num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31,
                                      "interpolation": "nearest"}
    assert config["random_erase"] == {"p": 0.25, "scale": [0.02, 0.33], "ratio": [0.3, 3.3], "value": 0.0}
    assert config["mixup"] == {"alpha": 1.0, "p": 0.5, "div_by": 2.0}


def test_disabled_transform_is_ignored():
    aug = Augmenter({"random_resized_crop": {"size": 64}, "mixup": {"enable": False, "alpha": 1.0},
                     "rand_augment": {"enable": False}})
    assert not aug.uses_partner and "rand_augment" not in aug.config()
    assert len(aug.sample(random.Random(0), (100, 100))) == 1


# -- replay ----------------------------------------------------------------------------------------

def test_replay_is_bit_identical_over_many_entries(photos):
    aug = Augmenter(IMAGENET_PLUS)
    names = list(photos)
    fired = Counter()
    for seed in range(200):
        name, partner = names[seed % 3], names[(seed + 1) % 3]
        rng = random.Random(entry_seed(7, name, seed))
        entry, x = aug.augment(rng, photos[name], partner, photos[partner])
        assert x.dtype == torch.float32 and x.shape == (3, 96, 96)
        restored = json.loads(json.dumps(entry))
        assert restored == entry
        assert torch.equal(aug.apply(restored, photos[name], photos[partner]), x)
        assert torch.equal(aug.apply(entry, photos[name], photos[partner]), x)
        if entry[0] is not None:
            fired["mixup" if entry[5] is not None else "cutmix"] += 1
        for flip, erase in ([(entry[2], entry[4])] if entry[0] is None else zip(entry[2], entry[4])):
            fired["flip"] += flip
            fired["erase"] += erase is not None
    assert min(fired.values()) > 10, fired  # every transform type was replayed


def test_replay_of_every_transform_type(photos):
    config = {"resize": {"size": 300}, "center_crop": {"size": 280}, "random_crop": {"size": 256, "padding": 2},
              "random_resized_crop": {"size": [72, 88], "scale": [0.3, 1.0], "interpolation": "bicubic"},
              "random_horizontal_flip": {"p": 0.5}, "rand_augment": {"p": 0.8, "interpolation": "bilinear"},
              "random_erase": {"p": 0.5}, "normalize": {"mean": MEAN, "std": STD},
              "mixup": {"p": 0.7}, "cutmix": {"p": 0.7}}
    aug = Augmenter(config)
    assert aug.output_size == (72, 88)
    for seed in range(40):
        entry = draw(aug, seed, photos, "chelsea", "astronaut")
        assert len(entry) == 9  # partner, resize, random_crop, rrc, flip, rand_augment, erase, mixup, cutmix
        assert entry[1] in (300, [300, 300])  # resize stores its size, as ml-dr does
        x = aug.apply(json.loads(json.dumps(entry)), photos["chelsea"], photos["astronaut"])
        assert x.shape == (3, 72, 88)
        assert torch.equal(x, aug.apply(entry, photos["chelsea"], photos["astronaut"]))


@pytest.mark.parametrize("backend", ["pil", "tensor"])
def test_replay_matches_torchvision(photos, backend):
    """pil: torchvision's functional calls on the PIL image, then to_tensor (the reference trainers);
    tensor: the same calls on the uint8 tensor."""
    image = photos["coffee"]
    source = F.to_pil_image(image) if backend == "pil" else image

    def to_float(x):
        return F.to_tensor(x) if backend == "pil" else (x / 255.0).to(torch.float32)
    aug = Augmenter({"random_resized_crop": {"size": 128, "interpolation": "bicubic"},
                     "random_horizontal_flip": {}, "normalize": {"mean": MEAN, "std": STD}}, backend)
    for seed in range(5):
        (top, left, h, w), flip = entry = draw(aug, seed, photos, "coffee")
        expected = F.resized_crop(source, top, left, h, w, [128, 128], InterpolationMode.BICUBIC, antialias=True)
        expected = F.hflip(expected) if flip else expected
        expected = F.normalize(to_float(expected), MEAN, STD)
        assert torch.equal(aug.apply(entry, image), expected)

    # RandAugment ops whose torchvision value survives quantisation replay exactly like torchvision
    ra = Augmenter({"center_crop": {"size": 224}, "rand_augment": {}}, backend)
    crop = F.center_crop(source, [224, 224])
    table = RandAugment()._augmentation_space(31, (224, 224))
    for name, sign in [("Rotate", 1), ("Rotate", -1), ("Solarize", 1), ("Posterize", 1), ("TranslateX", -1)]:
        op = RAND_AUGMENT_OPS.index(name)
        tv_magnitude = sign * float(table[name][0][9])
        stored = [[op, int(tv_magnitude) if name in ("Posterize", "TranslateX") else round(tv_magnitude, 4)]] * 2
        expected = crop
        for _ in range(2):
            expected = _apply_op(expected, name, tv_magnitude, InterpolationMode.NEAREST, None)
        assert torch.equal(ra.apply([stored], image), to_float(expected)), name


def test_mixing_math(photos):
    aug = Augmenter({"center_crop": {"size": 200}, "mixup": {}, "cutmix": {}})
    a, b = photos["chelsea"], photos["astronaut"]
    xa = (F.center_crop(a, [200, 200]) / 255.0).float()
    xb = (F.center_crop(b, [200, 200]) / 255.0).float()
    assert torch.equal(aug.apply(["b", 0.3, None], a, b), 0.3 * xa + 0.7 * xb)
    mixed = aug.apply(["b", None, [0.75, 10, 20, 110, 70]], a, b)
    assert torch.equal(mixed[:, 10:110, 20:70], xb[:, 10:110, 20:70])  # ml-dr: x along the height, y the width
    mixed[:, 10:110, 20:70] = xa[:, 10:110, 20:70]
    assert torch.equal(mixed, xa)


# -- RandAugment -----------------------------------------------------------------------------------

def test_rand_augment_magnitudes_are_torchvision_bins(photos):
    out_h, out_w = 160, 224  # not square, so TranslateX must scale with the width, TranslateY with the height
    aug = Augmenter({"random_resized_crop": {"size": [out_h, out_w]}, "rand_augment": {}})
    table = RandAugment()._augmentation_space(31, (out_h, out_w))
    assert tuple(table) == RAND_AUGMENT_OPS
    signs = {name: set() for name in RAND_AUGMENT_OPS}
    for seed in range(1500):
        for op, magnitude in draw(aug, seed, photos)[1]:
            name = RAND_AUGMENT_OPS[op]
            values, signed = table[name]
            tv = float(values[9]) if values.ndim > 0 else 0.0
            if name in ("TranslateX", "TranslateY", "Posterize"):
                assert type(magnitude) is int and abs(magnitude) == int(tv), (name, magnitude, tv)
            else:
                assert type(magnitude) is float and abs(abs(magnitude) - tv) <= 5e-5, (name, magnitude, tv)
            signs[name].add(magnitude > 0 if magnitude else 0)
            assert signed or magnitude >= 0
    assert all(len(signs[n]) == 2 for n in ("ShearX", "TranslateX", "TranslateY", "Rotate", "Brightness"))
    assert table["TranslateX"][0][9] != table["TranslateY"][0][9]


def test_every_rand_augment_op_occurs(photos):
    aug = Augmenter(RRC_RA)
    counts = Counter(op for seed in range(1000) for op, _ in draw(aug, seed, photos)[1])
    assert sorted(counts) == list(range(len(RAND_AUGMENT_OPS)))
    assert min(counts.values()) > 80  # 2000 draws over 14 ops: ~143 each


def test_skipped_transforms_are_null(photos):
    aug = Augmenter({"random_resized_crop": {"size": 64}, "rand_augment": {"p": 0.0}, "random_erase": {"p": 0.0}})
    for seed in range(10):
        rrc, ra, erase = entry = draw(aug, seed, photos)
        assert ra is None and erase is None
        assert torch.equal(aug.apply(entry, photos["astronaut"]),
                           aug.apply([rrc, None, None], photos["astronaut"]))


# -- errors ----------------------------------------------------------------------------------------

def test_out_of_bounds_boxes_raise(photos):
    small = photos["chelsea"]  # 300 x 451
    aug = Augmenter(RRC_RA)
    with pytest.raises(ValueError, match="outside"):
        aug.apply([[100, 0, 201, 200], None], small)  # top + height > H
    with pytest.raises(ValueError, match="outside"):
        aug.apply([[0, 300, 100, 152], None], small)  # left + width > W
    # an entry drawn for a full-size image must not replay on a downscaled copy
    big_entry = next(e for s in range(100) if (e := draw(aug, s, photos))[0][0] + e[0][2] > 300)
    with pytest.raises(ValueError, match="outside"):
        aug.apply(big_entry, small)
    crop = Augmenter({"random_crop": {"size": 100}})
    with pytest.raises(ValueError, match="outside"):
        crop.apply([[201, 0]], small)
    erase = Augmenter({"random_resized_crop": {"size": 64}, "random_erase": {"p": 1.0}})
    with pytest.raises(ValueError, match="outside"):
        erase.apply([[0, 0, 64, 64], [60, 0, 5, 5]], small)
    cut = Augmenter({"random_resized_crop": {"size": 64}, "cutmix": {}})
    with pytest.raises(ValueError, match="outside"):
        cut.apply(["x", [[0, 0, 64, 64], [0, 0, 64, 64]], [0.5, 0, 0, 65, 10]], small, small)
    with pytest.raises(ValueError, match="larger"):
        Augmenter({"center_crop": {"size": 400}}).apply([], small)


def test_malformed_entries_raise(photos):
    image = photos["astronaut"]
    aug = Augmenter(RRC_RA)
    with pytest.raises(ValueError, match="expects 2"):
        aug.apply([[0, 0, 10, 10]], image)
    with pytest.raises(ValueError, match="expects 2"):
        aug.apply([[0, 0, 10, 10], None, None], image)
    with pytest.raises(ValueError, match="random_resized_crop"):
        aug.apply([[0, 0, 10], None], image)
    with pytest.raises(ValueError, match="rand_augment"):
        aug.apply([[0, 0, 10, 10], [[14, 0.0], [0, 0.0]]], image)
    with pytest.raises(ValueError, match="rand_augment"):
        aug.apply([[0, 0, 10, 10], [[0, 0.0]]], image)
    mix = Augmenter(IMAGENET_PLUS)
    entry = next(e for s in range(50) if (e := draw(mix, s, photos))[0] is not None)
    with pytest.raises(ValueError, match="partner_image"):
        mix.apply(entry, image)
    with pytest.raises(ValueError, match="pair"):
        mix.apply([entry[0], entry[1][0]] + entry[2:], image, photos["coffee"])
    with pytest.raises(ValueError, match="neither mixup nor cutmix"):
        mix.apply(entry[:5] + [None, None], image, photos["coffee"])
    with pytest.raises(ValueError, match="uint8"):
        aug.apply(draw(aug, 0, photos), image.float())


def test_mixing_requires_partner_and_equal_sizes(photos):
    aug = Augmenter({"rand_augment": {}, "mixup": {"p": 1.0}})  # no crop: view size = image size
    assert aug.output_size is None
    with pytest.raises(ValueError, match="partner"):
        aug.sample(random.Random(0), (300, 451))
    with pytest.raises(ValueError, match="one size"):
        aug.sample(random.Random(0), (300, 451), "astronaut", (512, 512))
    entry = aug.sample(random.Random(0), (300, 451), 5, (300, 451))
    assert entry[0] == 5
    with pytest.raises(ValueError, match="one shape"):
        aug.apply(entry, photos["chelsea"], photos["astronaut"])


@pytest.mark.parametrize("config, needle", [
    ({"random_rotate": {"degrees": 10}}, "random_rotate"),
    ({"random_resized_crop": {"size": 224, "scal": [0.1, 1.0]}}, "random_resized_crop.scal"),
    ({"random_resized_crop": {"scale": [0.1, 1.0]}}, "random_resized_crop.size"),
    ({"random_resized_crop": {"size": 0}}, "random_resized_crop.size"),
    ({"random_resized_crop": {"size": 224, "scale": [0.9, 0.1]}}, "random_resized_crop.scale"),
    ({"random_resized_crop": {"size": 224, "interpolation": "lanczos"}}, "interpolation"),
    ({"random_horizontal_flip": {"p": 1.5}}, "random_horizontal_flip.p"),
    ({"rand_augment": {"magnitude": 31}}, "rand_augment.magnitude"),
    ({"rand_augment": {"interpolation": "bicubic"}}, "rand_augment.interpolation"),
    ({"normalize": {"mean": MEAN, "std": [0.2, 0.0, 0.2]}}, "normalize.std"),
    ({"mixup": {"div_by": 0.5}}, "mixup.div_by"),
    ({"cutmix": {"alpha": 0}}, "cutmix.alpha"),
    ({"random_erase": {"value": 0.5}}, "random_erase.value"),  # ml-dr erases with 0 whatever value says
    ({"random_erase": {"value": "random"}}, "random_erase.value"),
    ({"random_erase": {"ratio": [0.0, 3.3]}}, "random_erase.ratio"),
    ({"to_tensor": {"enable": "yes"}}, "to_tensor.enable"),
])
def test_bad_configs_name_the_field(config, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        Augmenter(config)


# -- determinism -----------------------------------------------------------------------------------

def test_independent_of_global_random_state(photos):
    aug = Augmenter(IMAGENET_PLUS)
    torch.manual_seed(0)
    random.seed(0)
    first = [draw(aug, s, photos) for s in range(30)]
    torch.manual_seed(1234)
    random.seed(1234)
    torch.rand(100)
    random.random()
    assert [draw(aug, s, photos) for s in range(30)] == first
    # and neither drawing nor replaying consumes the global generators
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    for s in range(10):
        aug.augment(random.Random(s), photos["astronaut"], "coffee", photos["coffee"])
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def test_replay_is_independent_of_thread_count(photos):
    """Generation and replay run in different processes with different torch thread counts."""
    aug = Augmenter({"resize": {"size": 256, "interpolation": "bicubic"}, "rand_augment": {},
                     "normalize": {"mean": MEAN, "std": STD}})
    contrast, sharpness = RAND_AUGMENT_OPS.index("Contrast"), RAND_AUGMENT_OPS.index("Sharpness")
    entries = [draw(aug, s, photos) for s in range(4)] + [[256, [[contrast, 0.27], [sharpness, -0.27]]]]
    reference = [aug.apply(e, photos["coffee"]) for e in entries]
    try:
        for threads in (2, 4):
            torch.set_num_threads(threads)
            assert all(torch.equal(aug.apply(e, photos["coffee"]), r) for e, r in zip(entries, reference))
    finally:
        torch.set_num_threads(1)


def test_entry_seed_is_stable():
    assert entry_seed(0, "abc", 3) == 18107919563439812895
    assert entry_seed(0, "abc", 3) == entry_seed(0, "abc", 3)
    seeds = {entry_seed(0, "abc", 3), entry_seed(1, "abc", 3), entry_seed(0, "abd", 3), entry_seed(0, "abc", 4),
             entry_seed(0, "abc", 3, "partner"), entry_seed(0, "ab", 3, "c")}
    assert len(seeds) == 6 and all(0 <= s < 2 ** 64 for s in seeds)


def test_plain_view(photos):
    aug = Augmenter(IMAGENET_PLUS)
    x = aug.plain(photos["coffee"])
    resized = F.resize(F.to_pil_image(photos["coffee"]), [96], InterpolationMode.BILINEAR, antialias=True)
    expected = F.normalize(F.to_tensor(F.center_crop(resized, [96, 96])), MEAN, STD)
    assert x.shape == (3, 96, 96) and torch.equal(x, expected)
    resized = F.resize(photos["coffee"], [96], InterpolationMode.BILINEAR, antialias=True)
    expected = F.normalize((F.center_crop(resized, [96, 96]) / 255.0).float(), MEAN, STD)
    assert torch.equal(Augmenter(IMAGENET_PLUS, "tensor").plain(photos["coffee"]), expected)
    wide = Augmenter({"random_resized_crop": {"size": [64, 128]}})
    assert wide.plain(photos["astronaut"]).shape == (3, 64, 128)


def test_pil_crops_are_not_capped_by_pils_bomb_limit(photos, monkeypatch):
    """The image is decoded under the run's own max_image_pixels; PIL's process-wide limit (89.5 MP)
    must not refuse crops of it (a 100 MP recipe limit would otherwise fail in RandomResizedCrop)."""
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if the photo were far above PIL's limit
    aug = Augmenter({"random_resized_crop": {"size": 32, "scale": [0.5, 1.0]}})
    entry = aug.sample(random.Random(0), hw(photos["chelsea"]))  # a box of >= 67k pixels
    assert aug.apply(entry, photos["chelsea"]).shape == (3, 32, 32)
    with pytest.raises(Image.DecompressionBombError):  # PIL's own check, elsewhere, is untouched
        F.to_pil_image(photos["chelsea"]).crop((0, 0, 100, 100))
