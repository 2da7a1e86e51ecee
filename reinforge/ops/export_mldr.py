"""Export an ImageNet+ run to Apple ML-DR's reference folder layout (FORMATS §3; ml-dr dr/data.py):

  config.pth.tar      torch.save(generation config), with reinforce.image_augmentation / num_samples
  config.json         the same config as JSON
  {index}.pth.tar     torch.save((index, [{"params": entry, "prob": (values, ids)}, ...]))
  index.json          {index: sample key}

The reference trainer looks images and mixing partners up by dataset index, so partner keys in
slot 0 are rewritten to the partner's index. ml-dr builds its transforms straight from
`config.pth.tar` (`dr.transforms.compose_from_config`), and torchvision's classes there take
interpolation as an `InterpolationMode`, not a string: non-default interpolations are written as
such, default ones are left out (torchvision's own default then applies), so that the common
configs hold plain values only and load with `torch.load(weights_only=True)`, the default since
torch 2.6. A config with e.g. a bicubic crop needs `torch.serialization.add_safe_globals(
[InterpolationMode])` (or `weights_only=False`) in the trainer on those torch versions.
"""
from __future__ import annotations

import copy
import json
import os
import re

import torch
from torchvision.transforms import InterpolationMode

from reinforge.formats.imagenet_plus import SchemaError, decode_sample
from reinforge.formats.wds import iter_samples
from reinforge.io.manifest import TMP_MARKER, RunLayout
from reinforge.io.runs import require_dr_config
from reinforge.readers.imagenet_plus import index_shard, shard_urls


def _atomic_save(path: str, write) -> None:
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f"{TMP_MARKER}{base}.{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_torch(path: str, obj) -> None:
    _atomic_save(path, lambda tmp: torch.save(obj, tmp))


def _save_json(path: str, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    _atomic_save(path, write)


# torchvision's defaults for the transforms whose interpolation ml-dr passes through unconverted
_DEFAULT_INTERPOLATION = {"resize": "bilinear", "random_resized_crop": "bilinear", "rand_augment": "nearest"}


def ml_dr_augmentation(image_augmentation: dict) -> dict:
    """image_augmentation as ml-dr's compose_from_config must receive it (see the module docstring)."""
    config = copy.deepcopy(image_augmentation)
    for name, default in _DEFAULT_INTERPOLATION.items():
        fields = config.get(name)
        if not isinstance(fields, dict) or "interpolation" not in fields:
            continue
        value = fields.pop("interpolation")
        if value != default:
            fields["interpolation"] = InterpolationMode(value)
    return config


def dataset_indices(keys: list[str]) -> dict[str, int]:
    """int(key) when every key is a decimal integer (ImageFolder runs key by dataset index), else position."""
    if all(re.fullmatch(r"[0-9]+", k) for k in keys) and len({int(k) for k in keys}) == len(keys):
        return {k: int(k) for k in keys}
    return {k: i for i, k in enumerate(keys)}


def export_ml_dr(run_dir: str, out_dir: str) -> dict:
    layout = RunLayout(run_dir.rstrip("/"))
    config = require_dr_config(layout.root)
    reinforce = config.get("reinforce", {})
    if "image_augmentation" not in reinforce or "num_samples" not in reinforce:
        raise SchemaError(f"{layout.dr_config}: needs reinforce.image_augmentation and reinforce.num_samples")
    mixing = any(t in reinforce["image_augmentation"] for t in ("mixup", "cutmix"))
    if "center_crop" in reinforce["image_augmentation"]:
        # ml-dr's CenterCrop calls .contiguous() on the PIL image it replays on: every image would fail
        raise SchemaError("ml-dr's trainer cannot replay center_crop (its CenterCrop fails on PIL images); "
                          "this run cannot be exported to it")
    if reinforce.get("replay_backend", "tensor") != "pil":
        raise SchemaError(f"this run's teachers scored views rendered by the "
                          f"{reinforce.get('replay_backend', 'tensor')!r} backend; ml-dr replays on PIL images, "
                          f"so its views would not be the ones scored: regenerate with augmentation.backend: pil")

    urls = shard_urls(run_dir)
    keys = [key for url in urls for key, _ in index_shard(url)]  # headers only: a cheap first pass
    if len(set(keys)) != len(keys):
        raise SchemaError("duplicate sample keys across the run's shards")
    index = dataset_indices(keys)

    os.makedirs(out_dir, exist_ok=True)
    images = augmentations = 0
    for url in urls:
        with open(url, "rb") as f:
            for members in iter_samples(f):
                sample = decode_sample(members)
                records = []
                for entry, values, ids in zip(sample.entries, sample.values, sample.ids):
                    entry = list(entry)
                    if mixing and entry[0] is not None:
                        if entry[0] not in index:
                            raise SchemaError(f"sample {sample.key}: mixing partner {entry[0]!r} is not in the run")
                        entry[0] = index[entry[0]]
                    records.append({"params": entry, "prob": (values.tolist(), ids.tolist())})
                i = index[sample.key]
                _save_torch(os.path.join(out_dir, f"{i}.pth.tar"), (i, records))
                images += 1
                augmentations += len(records)

    torch_config = {**config, "reinforce": {**reinforce,
                                            "image_augmentation": ml_dr_augmentation(reinforce["image_augmentation"])}}
    _save_torch(os.path.join(out_dir, "config.pth.tar"), torch_config)
    _save_json(os.path.join(out_dir, "config.json"), config)
    _save_json(os.path.join(out_dir, "index.json"), {str(i): k for k, i in index.items()})
    return {"images": images, "augmentations": augmentations}
