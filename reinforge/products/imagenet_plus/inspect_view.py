"""`reinforge inspect` of an ImageNet+ sample: label, image, and the first stored augmentations with
their top-5 teacher probabilities."""
from __future__ import annotations

import json
from typing import Iterator


def shows(members: dict) -> bool:
    return "prob.npz" in members


def describe(members: dict, augmentations: int, limits=None) -> Iterator[str]:
    from reinforge.formats.imagenet_plus import decode_sample
    sample = decode_sample(members, limits)
    yield f"label: {sample.label}   image: {sample.image_ext}, {len(sample.image)} B   meta: {json.dumps(sample.meta)}"
    yield f"stored augmentations: {sample.num_augmentations}, top-k: {sample.values.shape[1]}"
    for n in range(min(augmentations, sample.num_augmentations)):
        top = ", ".join(f"{int(c)}:{v:.3f}" for v, c in zip(sample.values[n][:5], sample.ids[n][:5]))
        yield f"  [{n}] params {json.dumps(sample.entries[n])}"
        yield f"      top-5 {top}  (stored mass {sample.values[n].sum():.3f})"
