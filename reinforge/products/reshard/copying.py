"""One task: copy the samples assigned to one output shard out of the pool, byte for byte.

A task reads only its own assignment file (plan/tasks/<task>.parquet, written by prepare) and fetches
each sample's byte range from its pool shard, in the assigned order (or through a seeded shuffle
buffer, DataComp's --shuffle-bufsize). Keys: the uid (32 hex) for the first copy, `<uid>_r<k>` for
copy k >= 1; members are copied unchanged (json keeps the original uid), unless DataCompExtras adds
what DataComp's resharder adds (cls, blurred faces, face boxes).
"""
from __future__ import annotations

import json
import random
from typing import Iterator

import pyarrow.parquet as pq

from reinforge.formats.limits import Limits
from reinforge.formats.pool_reader import PoolReader
from reinforge.formats.subset import uid_hex
from reinforge.io.storage import filesystem
from reinforge.products.reshard import face_blur
from reinforge.stages.base import MapStage, SkipSample

EXTRA_FIELDS = ("__face_bboxes__", "__cls__")  # per-sample facts read_assigned() hands to the stages


def read_assigned(assignment_url: str) -> Iterator[dict]:
    """The pool samples one output shard is assigned, in assignment order, with their output keys."""
    fs, path = filesystem(assignment_url)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read()  # not read_table: its dataset layer imports pandas (~0.4 s)
    rows = {name: table.column(name).to_pylist() for name in table.column_names}
    uids = [uid_hex(hi, lo) for hi, lo in zip(rows["uid_hi"], rows["uid_lo"])]
    copies = rows["copy"]
    boxes, classes = rows.get("face_bboxes"), rows.get("cls")
    shards, spans = rows["shard"], list(zip(rows["offset"], rows["length"]))
    # rows are grouped by pool shard within a copy round: each run of one shard is fetched together
    runs = [i for i in range(len(shards) + 1) if i in (0, len(shards)) or shards[i] != shards[i - 1]]
    reader = PoolReader(open_limit=1, limits=Limits.default())
    try:
        for first, end in zip(runs[:-1], runs[1:]):
            for i, sample in enumerate(reader.fetch_many(shards[first], spans[first:end]), first):
                sample["__key__"] = uids[i] if copies[i] == 0 else f"{uids[i]}_r{copies[i]}"
                sample["__uid__"] = uids[i]
                if boxes is not None and boxes[i] is not None:
                    sample["__face_bboxes__"] = boxes[i]
                if classes is not None:
                    sample["__cls__"] = classes[i]
                yield sample
    finally:
        reader.close()


def buffer_shuffle(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """webdataset's _shuffle(bufsize, initial=bufsize), as DataComp's --shuffle-bufsize calls it: fill a
    buffer (taking two samples per step while it is short), then emit a random buffered sample per
    incoming one, and drain at the end. Here rng is seeded, so the order is the same on every run."""
    buf: list = []
    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:
            nxt = next(samples, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= bufsize:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list, rng: random.Random) -> dict:
    k = rng.randint(0, len(buf) - 1)
    sample, buf[k] = buf[k], buf[-1]
    buf.pop()
    return sample


class Passthrough(MapStage):
    """Checks that the fetched bytes are the assigned uid, then hands the members on unchanged."""
    name = "reshard"

    def __init__(self, uid_field: str):
        self.uid_field = uid_field

    def process(self, sample: dict) -> dict:
        if "__error__" in sample:
            raise SkipSample(*sample["__error__"])
        try:
            uid = json.loads(sample["json"]).get(self.uid_field)
        except (KeyError, ValueError, AttributeError):
            raise SkipSample("bad_json", "sample has no readable json member") from None
        if not isinstance(uid, str) or uid.lower() != sample["__uid__"]:
            raise SkipSample("uid_mismatch", f"pool sample has uid {uid!r}, the index said {sample['__uid__']}")
        return {"__key__": sample["__key__"],
                "members": {ext: data for ext, data in sample.items() if not ext.startswith("__")},
                **{k: sample[k] for k in EXTRA_FIELDS if k in sample}}


class DataCompExtras(MapStage):
    """What DataComp's resharder (with ml-tic-clip's -c) adds to a sample: the cls member, blurred faces
    (the image becomes webp), the face boxes in the json member."""
    name = "datacomp_extras"

    def __init__(self, apply_blur: bool, inject_blur_metadata: bool, webp_quality: int):
        self.apply_blur, self.inject, self.quality = apply_blur, inject_blur_metadata, webp_quality

    def process(self, sample: dict) -> dict:
        members = sample["members"]
        boxes = sample.get("__face_bboxes__")
        if boxes and self.apply_blur:
            image = face_blur.image_member(members)
            if image is None:
                raise SkipSample("no_image", "sample has face boxes but no jpg/jpeg/png/webp member to blur")
            try:
                webp = face_blur.reencode_blurred(members[image], boxes, self.quality)
            except ValueError as exc:
                raise SkipSample("undecodable_image", f"cannot blur {image}: {exc}") from None
            members = {("webp" if ext == image else ext): (webp if ext == image else data)
                       for ext, data in members.items() if ext != "webp" or image == "webp"}
        if boxes and self.inject:
            try:
                members["json"] = face_blur.inject_boxes(members["json"], boxes)
            except (KeyError, ValueError, AttributeError):
                raise SkipSample("bad_json", "cannot add face_bboxes to the json member") from None
        if "__cls__" in sample:
            members["cls"] = str(int(sample["__cls__"])).encode("ascii")  # webdataset's encoding of an int cls
        return {"__key__": sample["__key__"], "members": members}
