"""Face boxes (face_blur.py) and class ids (datacompnet.py) through the reshard plan's partitions
(partitions.py), so the driver holds no per-sample array of them (issue #16).

Face boxes, from the blur metadata parquet(s), files in the order face_blur.metadata_files gives:
- metadata_layout (per group of files): each file's row groups' row counts (and its columns checked);
- metadata_to_buckets (per run of row groups, ~Sizes.metadata_rows rows): each row with a readable uid
  routed to its uid bucket as (uid, file number, row in file, number of boxes, -1 when malformed), the
  boxes' values in a second part file grouped the same way; rows and malformed uids counted;
- bucket_extras (in match_bucket, per uid bucket): the bucket's metadata rows, in (file, row) order, so a
  uid's first row wins as in one pass over the files; duplicate rows of subset uids and malformed first
  rows counted, the first SAMPLE malformed ones kept by place (the driver reads those few rows again).
Class ids: the class file is a dict read whole by its format (ml-tic-clip's pickle or JSON), so the driver
holds O(file) for it; its entries are routed to the uid buckets in one part file, and each bucket takes
its uids' ids. match_bucket gives each copy its uid's boxes and class id; pass 3 writes them as the task
files' face_bboxes and cls columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.formats.datacompnet import class_id_table, class_ids_for, read_class_ids
from reinforge.formats.subset import UID_OK, UidLookup, locate, parse_hex_uids, uid_hex
from reinforge.io.parts import bucket_of, read_parts, write_parts
from reinforge.io.storage import filesystem
from reinforge.products.reshard import face_blur
from reinforge.products.reshard.pool import SAMPLE

META_COLUMNS = {"hi": np.uint64, "lo": np.uint64, "file": np.int32, "row": np.int64, "boxes": np.int32}
VALUE_COLUMNS = {"v": np.float64}  # box values, 4 per box, in a part file of their own
CLASS_COLUMNS = {"hi": np.uint64, "lo": np.uint64, "cls": np.int64}
BATCH_ROWS = 1 << 16  # reshard.json's row_in_batch: a row's place in a batch of this many rows from the file's start
FILES_PER_TASK = 64  # metadata files per layout task


def values_url(url: str) -> str:
    """The part file holding the box values of the rows in part file `url`."""
    return f"{url}.values"


def ragged_take(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices starts[i] .. starts[i] + counts[i] - 1 for each i, concatenated."""
    counts = np.asarray(counts, np.int64)
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts) + np.arange(total)


def value_starts(boxes: np.ndarray) -> np.ndarray:
    """Where each row's box values start, for rows whose values follow one another in row order."""
    n = 4 * np.maximum(boxes, 0).astype(np.int64)
    return np.cumsum(n) - n


def boxes_column(counts: np.ndarray, starts: np.ndarray, values: np.ndarray) -> pa.Array:
    """The face_bboxes column of a task file: per row `counts` boxes (-1: null, no metadata), their values
    from `starts` in `values`."""
    n = np.maximum(counts, 0).astype(np.int64)
    flat = values[ragged_take(starts, 4 * n)]
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, 4, dtype=np.int32)), pa.array(flat))
    return pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(n)].astype(np.int32)), inner,
                                    mask=pa.array(counts < 0))


# ---------------------------------------------------------------- face boxes: metadata files -> uid buckets

def metadata_layout(files: list[tuple[int, str]]) -> list[list[int]]:
    """Per (file number, URL): its row groups' row counts. A file without uid or face_bboxes is an error."""
    out = []
    for _, url in files:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            missing = {"uid", "face_bboxes"} - set(parquet.schema_arrow.names)
            if missing:
                raise face_blur.BlurError(f"blur metadata {url}: no column {', '.join(sorted(missing))}")
            out.append([parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
    return out


def metadata_tasks(files: list[str], layouts: list[list[int]], rows_per_task: int) -> list[list[tuple]]:
    """Runs of row groups of about `rows_per_task` rows, in file order: per task its pieces (file number,
    URL, first row group, end row group, the first group's first row in the file)."""
    tasks, pieces, rows = [], [], 0
    for number, (url, groups) in enumerate(zip(files, layouts)):
        first_row, start = 0, 0
        for g, n in enumerate(groups):
            rows += n
            if rows >= rows_per_task:
                pieces.append((number, url, start, g + 1, first_row))
                tasks.append(pieces)
                first_row += sum(groups[start:g + 1])
                pieces, rows, start = [], 0, g + 1
        if start < len(groups):
            pieces.append((number, url, start, len(groups), first_row))
    return tasks + ([pieces] if pieces else [])


def metadata_to_buckets(pieces: list[tuple], out_url: str, bounds: np.ndarray) -> dict:
    """Route the pieces' rows with a readable uid to uid buckets (parts.bucket_of), in row order."""
    import pyarrow.compute as pc  # here, not at the top: it costs every reshard run ~0.1 s to import

    rows, bad_uids, parts, values = 0, 0, [], []
    for number, url, first_group, end_group, first_row in pieces:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            at = first_row
            for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=["uid", "face_bboxes"],
                                                        row_groups=range(first_group, end_group)):
                uids = batch.column("uid")
                if pa.types.is_string(uids.type) or pa.types.is_large_string(uids.type):
                    uids = pc.utf8_lpad(uids, 32, "0")  # DataComp pads short uids with zeros
                hi, lo, status = parse_hex_uids(uids)
                ok = np.flatnonzero(status == UID_OK)
                bad_uids += batch.num_rows - len(ok)
                boxes = batch.column("face_bboxes")
                counts, box_values = face_blur.parse_boxes(boxes if len(ok) == len(boxes) else boxes.take(ok))
                parts.append({"hi": hi[ok], "lo": lo[ok], "file": np.full(len(ok), number, np.int32),
                              "row": at + ok, "boxes": counts})
                values.append(box_values)
                rows += batch.num_rows
                at += batch.num_rows
    table = {name: np.concatenate([p[name] for p in parts] or [np.zeros(0, t)]).astype(t, copy=False)
             for name, t in META_COLUMNS.items()}
    part = bucket_of(table["hi"], table["lo"], bounds)
    counts = write_parts(out_url, table, part, len(bounds) + 1)
    value_counts = write_parts(values_url(out_url), {"v": np.concatenate(values or [np.zeros(0)])},
                               np.repeat(part, 4 * np.maximum(table["boxes"], 0)), len(bounds) + 1)
    return {"rows": rows, "bad_uids": bad_uids, "counts": counts, "value_counts": value_counts}


# ---------------------------------------------------------------- class ids: the file -> uid buckets (driver)

def class_ids_to_buckets(url: str, out_url: str, bounds: np.ndarray) -> np.ndarray:
    """The class file's entries (file order) routed to uid buckets; each bucket's entry count."""
    hi, lo, ids = class_id_table(read_class_ids(url), url)
    return write_parts(out_url, {"hi": hi, "lo": lo, "cls": ids}, bucket_of(hi, lo, bounds), len(bounds) + 1)


# ---------------------------------------------------------------- a uid bucket: its uids' boxes and class ids

@dataclass
class BucketExtras:
    """Per subset row of a bucket: its boxes (count, -1: none; where its values start in `values`) and class id."""
    boxes: Optional[np.ndarray] = None
    starts: Optional[np.ndarray] = None
    values: Optional[np.ndarray] = None
    cls: Optional[np.ndarray] = None
    facts: dict = field(default_factory=dict)


def bucket_extras(uids: np.ndarray, counts: np.ndarray, found: np.ndarray, parts: dict) -> BucketExtras:
    """`parts`: "meta" and "meta_values" (metadata part rows, in task order) and/or "classes" (class file
    entries) of this bucket; `found`: which uids the pool holds (their copies are written)."""
    out = BucketExtras()
    if "meta" in parts:
        meta = read_parts(parts["meta"], META_COLUMNS)
        values = read_parts(parts["meta_values"], VALUE_COLUMNS)["v"]
        pos = locate(meta["hi"], meta["lo"], UidLookup(uids))  # each metadata row's subset row
        hit = np.flatnonzero(pos >= 0)
        taken, first = np.unique(pos[hit], return_index=True)  # a uid's first row in (file, row) order
        chosen = hit[first]
        out.boxes = np.full(len(uids), -1, np.int32)
        out.boxes[taken] = meta["boxes"][chosen]
        out.starts = np.zeros(len(uids), np.int64)
        out.starts[taken] = value_starts(meta["boxes"])[chosen]
        out.values = values
        bad = np.sort(chosen[meta["boxes"][chosen] < 0])
        without = np.flatnonzero(found & (out.boxes < 0))
        faces = found & (out.boxes > 0)
        out.facts.update({"duplicate_rows": len(hit) - len(taken), "bad_boxes": len(bad),
                          "bad_box_places": [(int(meta["file"][i]), int(meta["row"][i])) for i in bad[:SAMPLE]],
                          "without": len(without), "without_sample": [uid_hex(*u) for u in uids[without[:SAMPLE]].tolist()],
                          "samples_with_faces": int(counts[faces].sum()), "uids_with_faces": int(faces.sum())})
    if "classes" in parts:
        entries = read_parts(parts["classes"], CLASS_COLUMNS)
        out.cls, has = class_ids_for(entries["hi"], entries["lo"], entries["cls"], uids)
        out.facts.update({"no_class": int((~has).sum()),
                          "no_class_sample": [uid_hex(*u) for u in uids[np.flatnonzero(~has)[:5]].tolist()],
                          "classes": np.unique(out.cls[found]).tolist()})
    return out


# ---------------------------------------------------------------- the driver: what reshard.json says

def blur_report(files: list[str], routed: list[dict], matched: list[dict]) -> dict:
    """face_blur.boxes_report from the routing tasks' and buckets' counts (buckets in uid order)."""
    facts = [m["extras"] for m in matched]
    places = sorted(p for f in facts for p in f["bad_box_places"])[:SAMPLE]  # (file, row): one pass's order
    return face_blur.boxes_report(
        len(files), sum(t["rows"] for t in routed), sum(f["duplicate_rows"] for f in facts),
        sum(t["bad_uids"] for t in routed), sum(f["bad_boxes"] for f in facts),
        face_blur.bad_box_examples(files, places, BATCH_ROWS), sum(f["without"] for f in facts),
        [u for f in facts for u in f["without_sample"]][:SAMPLE], sum(f["samples_with_faces"] for f in facts),
        sum(f["uids_with_faces"] for f in facts))
