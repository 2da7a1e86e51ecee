"""Stable seeds for the per-entry `random.Random` that draws an augmentation entry (or a caption)."""
from __future__ import annotations

import hashlib


def entry_seed(seed: int, key: str, index: int, *extra: str) -> int:
    """A stable 64-bit seed for random.Random from (run seed, sample key, augmentation index, ...).
    blake2b over length-prefixed parts, so it is the same on every machine and Python version."""
    h = hashlib.blake2b(digest_size=8)
    for part in (str(seed), str(key), str(index), *map(str, extra)):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return int.from_bytes(h.digest(), "big")
