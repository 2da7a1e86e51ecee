"""`reinforge inspect` of a DataCompDR / DFNDR sample (also what `join` writes): uid, caption, synthetic
captions, embedding shapes and the first stored augmentations."""
from __future__ import annotations

import json
from typing import Iterator


def shows(members: dict) -> bool:
    return "npz" in members or "pth.gz" in members or "qemb.npz" in members


def describe(members: dict, augmentations: int, limits=None) -> Iterator[str]:
    from reinforge.formats.datacomp_dr import decode_dr_sample
    sample = decode_dr_sample(members, limits)
    yield f"uid: {sample.uid}   caption: {sample.caption!r}   sha256: {sample.meta.get('sha256')}"
    for key, captions in sample.syn.items():
        yield f"{key}: {captions}"
    yield (f"image_emb {tuple(sample.image_emb.shape)}, text_emb {tuple(sample.text_emb.shape)}, "
           + ", ".join(f"{k}_emb {tuple(v.shape)}" for k, v in sample.syn_emb.items()))
    for n in range(min(augmentations, len(sample.entries))):
        yield f"  [{n}] params {json.dumps(sample.entries[n])}"
