"""Make tests/golden/consumer_replay.npz: what Apple's own replay code computes from reinforge entries.

Not part of the package or the suite (CI cannot fetch Apple's code). Run once, by hand, with checkouts of
apple/ml-dr and apple/ml-mobileclip, from the repository root in reinforge's venv:

    HF_HUB_OFFLINE=1 .venv/bin/python tests/golden/make_consumer_golden.py --ml-dr PATH --ml-mobileclip PATH

It draws entries with reinforge's Augmenter on small real photos (PNG, so decoding is exact everywhere),
hands them to ml-dr's `dr.transforms.compose_from_config(config).decompress/reapply` (the config as ml-dr
reads it from an export's config.pth.tar) and to ml-mobileclip's `training/dr/transforms.py` (the config
as its open_clip patch reads dr_config.json), on PIL images decoded as their loaders do, and stores the
images, entries and output tensors. tests/test_consumer_replay.py compares reinforge's pil replay with
them. Only facts are committed: images, entries, outputs, versions.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: conftest's photos


def load_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ml_dr_compose(root: str):
    sys.path.insert(0, root)  # ml-dr imports its top-level `transforms` module
    import dr.transforms
    return dr.transforms.compose_from_config


def ml_mobileclip_compose(root: str):
    # training/dr/transforms.py imports open_clip_train.dr.transforms_base (where the patch installs it)
    import open_clip_train
    package = types.ModuleType("open_clip_train.dr")
    package.__path__ = []
    sys.modules["open_clip_train.dr"] = package
    open_clip_train.dr = package
    load_module("open_clip_train.dr.transforms_base", os.path.join(root, "training/dr/transforms_base.py"))
    return load_module("open_clip_train.dr.transforms", os.path.join(root, "training/dr/transforms.py")).compose_from_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ml-dr", required=True)
    parser.add_argument("--ml-mobileclip", required=True)
    parser.add_argument("--out", default=os.path.join(HERE, "consumer_replay.npz"))
    args = parser.parse_args()

    import PIL
    import torchvision
    from conftest import photo, png_bytes
    from consumer_reference import default_loader
    from test_consumer_replay import DATACOMP_DR, GEOMETRY, IMAGENET_PLUS, every_rand_augment_op

    from reinforge.ops.export_mldr import ml_dr_augmentation
    from reinforge.formats.augment import Augmenter
    from reinforge.formats.seeds import entry_seed
    from reinforge.formats.dr_trainer_config import trainer_augmentation

    consumers = {"ml-dr": ml_dr_compose(args.ml_dr), "ml-mobileclip": ml_mobileclip_compose(args.ml_mobileclip)}
    images = {f"image{i}": png_bytes(photo(i, 56 + 10 * i)) for i in range(3)}
    arrays = {name: np.frombuffer(data, dtype=np.uint8) for name, data in images.items()}
    cases = []
    # ml-dr's CenterCrop calls .contiguous() on its input and fails on the PIL images its trainer replays
    # on, so center_crop cannot be exported to it (reinforge's export refuses it)
    geometry = {k: v for k, v in GEOMETRY.items() if k != "center_crop"}
    plan = [("ml-dr", "imagenet_plus", IMAGENET_PLUS), ("ml-dr", "geometry", geometry),
            ("ml-mobileclip", "datacomp_dr", DATACOMP_DR)]
    for consumer, label, config in plan:
        augmenter = Augmenter(config, "pil")
        if consumer == "ml-dr":  # what an export's config.pth.tar holds
            theirs_config = ml_dr_augmentation(augmenter.config())
        else:  # what dr_config.json holds, as the trainer's json.load returns it
            theirs_config = json.loads(json.dumps(trainer_augmentation(config)))
        compose = consumers[consumer](theirs_config)
        hw = {name: PIL.Image.open(io.BytesIO(data)).size[::-1] for name, data in images.items()}
        drawn = []
        for n in range(10):
            key = f"image{n % 3}"
            partner = f"image{(n + 1) % 3}"
            rng = random.Random(entry_seed(3, key, n))
            entry = (augmenter.sample(rng, hw[key], partner, hw[partner]) if augmenter.uses_partner
                     else augmenter.sample(rng, hw[key]))
            drawn.append((key, json.loads(json.dumps(entry))))
        drawn += [("image1", entry) for entry in every_rand_augment_op(config, hw["image1"])]
        for key, entry in drawn:
            partner = entry[0] if augmenter.uses_partner else None
            params = compose.decompress(json.loads(json.dumps(entry)))
            image2 = default_loader(images[partner]) if partner is not None else None
            out, _ = compose.reapply(default_loader(images[key]), params, image2)
            name = f"out{len(cases)}"
            arrays[name] = out.numpy().astype(np.float32)
            cases.append({"consumer": consumer, "label": label, "config": augmenter.config(), "entry": entry,
                          "image": key, "partner": partner, "output": name,
                          "std": config.get("normalize", {}).get("std", [1.0])})
    meta = {"pillow": PIL.__version__, "torchvision": torchvision.__version__, "cases": cases,
            "made_by": "tests/golden/make_consumer_golden.py"}
    np.savez_compressed(args.out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {len(cases)} cases to {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
