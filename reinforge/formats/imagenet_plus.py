"""ImageNet+ sample layout (FORMATS §1, §3): one self-contained WebDataset sample per training image.

Members, in this order:
  <image ext>  original image bytes (jpg/png/webp), exactly as read
  cls          class index, ASCII decimal
  json         {"key", "sha256" (of the image bytes), "height", "width", "source"}
  paug.json.gz {"param_aug": [N entries]}  (FORMATS §1; a real JSON list), gzip-compressed: the
               parameters shrink ~3x (webdataset decoders unpack `.gz` members); plain
               `paug.json` is written with compress_params=False and read either way
  prob.npz     "values" float16 [N, k] (descending) and "ids" int16/int32 [N, k]: the teacher
               ensemble's top-k probabilities for each stored augmentation
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from reinforge.formats.arrays import load_npz, npz_bytes
from reinforge.formats.image import find_image
# SchemaError lives in limits (beside MemberTooLarge, its subclass); it is imported from here too
from reinforge.formats.limits import Limits, SchemaError, gunzip, too_large

PARAMS_MEMBER = "paug.json"
PARAMS_MEMBER_GZ = "paug.json.gz"
PROBS_MEMBER = "prob.npz"
LABEL_MEMBER = "cls"
META_MEMBER = "json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps_compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def sparsify(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row, values descending; torch.topk is deterministic on identical inputs."""
    values, ids = torch.topk(probs.float(), k=min(k, probs.shape[-1]), dim=-1, sorted=True)
    return values.numpy(), ids.numpy()


def id_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def encode_probs(values: np.ndarray, ids: np.ndarray, num_classes: int) -> bytes:
    return npz_bytes({"values": values.astype(np.float16), "ids": ids.astype(id_dtype(num_classes))})


def decode_probs(data: bytes, limits: Limits | None = None) -> tuple[np.ndarray, np.ndarray]:
    arrays = load_npz(data, (limits or Limits.default()).arrays)
    if set(arrays) != {"values", "ids"}:
        raise SchemaError(f"{PROBS_MEMBER} holds {sorted(arrays)}, expected ['ids', 'values']")
    values, ids = arrays["values"], arrays["ids"]
    if values.shape != ids.shape or values.ndim != 2:
        raise SchemaError(f"{PROBS_MEMBER}: values {values.shape} and ids {ids.shape} must be equal 2-d shapes")
    return values.astype(np.float32), ids.astype(np.int64)


def densify(values, ids, num_classes: int) -> torch.Tensor:
    """Dense target: the stored top-k, and the remaining mass spread uniformly over the other classes."""
    values = torch.as_tensor(values, dtype=torch.float32)
    ids = torch.as_tensor(ids, dtype=torch.long)
    rest = max(0.0, 1.0 - float(values.sum()))
    others = num_classes - ids.numel()
    target = torch.full((num_classes,), rest / others if others > 0 else 0.0)
    target[ids] = values
    total = float(target.sum())
    return target / total if total > 0 else torch.full((num_classes,), 1.0 / num_classes)


@dataclass
class ReinforcedSample:
    key: str
    image_ext: str
    image: bytes
    label: int
    entries: list
    values: np.ndarray  # float32 [N, k]
    ids: np.ndarray  # int64 [N, k]
    meta: dict = field(default_factory=dict)

    @property
    def num_augmentations(self) -> int:
        return len(self.entries)


def encode_sample(sample: ReinforcedSample, num_classes: int, compress_params: bool = True) -> dict[str, bytes]:
    meta = {**sample.meta, "key": sample.key, "sha256": sha256_hex(sample.image)}  # never a stale hash
    params = dumps_compact({"param_aug": sample.entries})
    return {
        sample.image_ext: sample.image,
        LABEL_MEMBER: str(int(sample.label)).encode(),
        META_MEMBER: dumps_compact(meta),
        **({PARAMS_MEMBER_GZ: gzip.compress(params, compresslevel=9, mtime=0)} if compress_params
           else {PARAMS_MEMBER: params}),
        PROBS_MEMBER: encode_probs(sample.values, sample.ids, num_classes),
    }


def params_json(members: dict, limits: Limits | None = None) -> bytes:
    """The paug JSON of a sample, from the gzip or the plain member, at most limits.params bytes."""
    bound = (limits or Limits.default()).params
    if PARAMS_MEMBER_GZ in members:
        return gunzip(members[PARAMS_MEMBER_GZ], bound, PARAMS_MEMBER_GZ)
    if PARAMS_MEMBER in members:
        if len(members[PARAMS_MEMBER]) > bound:  # parsed JSON takes many times its bytes
            raise too_large(PARAMS_MEMBER, len(members[PARAMS_MEMBER]), bound)
        return members[PARAMS_MEMBER]
    raise SchemaError(f"missing member {PARAMS_MEMBER_GZ!r} (or {PARAMS_MEMBER!r})")


def _named(key: str, read, *args):
    """read(*args), its SchemaError (or MemberTooLarge) naming the sample."""
    try:
        return read(*args)
    except SchemaError as exc:
        raise type(exc)(f"sample {key}: {exc}") from None


def decode_sample(members: dict, limits: Limits | None = None) -> ReinforcedSample:
    """Raises SchemaError naming the key; MemberTooLarge (a SchemaError) when a member would inflate
    past `limits` (default: Limits.default())."""
    key = members.get("__key__", "?")
    found = find_image(members)
    if found is None:
        raise SchemaError(f"sample {key}: no image member")
    for name in (LABEL_MEMBER, META_MEMBER, PROBS_MEMBER):
        if name not in members:
            raise SchemaError(f"sample {key}: missing member {name!r}")
    try:
        label = int(members[LABEL_MEMBER].decode().strip())
        meta = json.loads(members[META_MEMBER])
        params = json.loads(_named(key, params_json, members, limits))
    except SchemaError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise SchemaError(f"sample {key}: {exc}") from exc
    entries = params.get("param_aug") if isinstance(params, dict) else None
    if isinstance(entries, str):  # tolerate writers that stored the list as a JSON string
        try:
            entries = json.loads(entries)
        except (ValueError, RecursionError) as exc:
            raise SchemaError(f"sample {key}: param_aug string is not JSON: {exc}") from None
    if not isinstance(entries, list):
        raise SchemaError(f"sample {key}: {PARAMS_MEMBER} must hold a list under 'param_aug'")
    values, ids = _named(key, decode_probs, members[PROBS_MEMBER], limits)
    if values.shape[0] != len(entries):
        raise SchemaError(f"sample {key}: {len(entries)} augmentations but {values.shape[0]} probability rows")
    return ReinforcedSample(key=key, image_ext=found[0], image=found[1], label=label, entries=entries,
                            values=values, ids=ids, meta=meta)
