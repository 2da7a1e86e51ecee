"""`filter apply` streams the scores (issue #16): decisions in small batches and spilled uid buckets equal
a whole-table reference, on a pool built to stress the streaming edges: heavy score ties, NaN and inf,
repeated uids with different scores, high halves shared by many uids (ties broken on the low half), and
batch boundaries that do not fall on the packed bitmask's bytes."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reinforge.curation.filters import decide as decide_module
from reinforge.curation.filters.decide import decide
from reinforge.curation.filters.scores import REPORT, SCORES, _schema
from reinforge.formats.subset import read_subset

N = 5000


def _pool(folder, seed=0):
    rng = np.random.default_rng(seed)
    hi = rng.choice(np.array([3, 2**63, 2**64 - 5, 12345], np.uint64), N)  # many uids per high half
    lo = rng.integers(0, 2**64, N, np.uint64, endpoint=False)
    dup = rng.choice(np.arange(100, N), 300, replace=False)
    src = rng.integers(0, 100, 300)
    hi[dup], lo[dup] = hi[src], lo[src]  # later rows repeat an earlier uid (with their own scores)
    l14 = rng.choice(np.array([0.1, 0.2, 0.25, 0.3, np.nan, np.inf], np.float32), N, p=[.3, .3, .2, .1, .05, .05])
    words = rng.integers(0, 6, N).astype(np.int32)
    cols = {"uid_hi": hi, "uid_lo": lo, "file": np.zeros(N, np.int32), "row": np.arange(N), "words": words,
            "chars": words * 5, "lang": pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 2, N).astype(np.int32)),
                                                                       pa.array(["en", "de"])),
            "synset_hits": words % 2, "synset": words, "wordnet_hits": words % 3, "ft_words": words,
            "short_side": np.full(N, 300, np.float32), "aspect": np.ones(N, np.float32),
            "clip_b32": rng.random(N).astype(np.float32), "clip_l14": l14}
    schema = _schema(False)
    table = pa.table({k: pa.array(v) if isinstance(v, np.ndarray) else v for k, v in cols.items()}).cast(schema)
    pq.write_table(table, f"{folder}/{SCORES}", row_group_size=777)
    with open(f"{folder}/{REPORT}", "w") as f:
        json.dump({"rows": N, "malformed_uids": {"rows": 0}}, f)
    return hi, lo, l14.astype(np.float64), words.astype(np.float64)


def _reference(hi, lo, v, fraction, semantics):
    """The decision over the whole table at once: first row per uid; exact keeps round(f*n) of the valid
    unique rows by (score desc, uid asc); datacomp keeps unique rows >= the score at int(f*n) of all rows."""
    seen, unique = set(), []
    for i, uid in enumerate(zip(hi.tolist(), lo.tolist())):
        if uid not in seen:
            seen.add(uid)
            unique.append(i)
    unique = np.array(unique)
    if semantics == "exact":
        valid = [i for i in unique if math.isfinite(v[i])]
        ranked = sorted(valid, key=lambda i: (-v[i], int(hi[i]), int(lo[i])))
        kept = ranked[:int(math.floor(fraction * len(valid) + 0.5))]
    else:
        threshold = (-np.sort(-v))[int(len(v) * fraction)]
        kept = [i for i in unique if v[i] >= threshold]
    return sorted((int(hi[i]), int(lo[i])) for i in kept)


@pytest.mark.parametrize("semantics", ["exact", "datacomp"])
@pytest.mark.parametrize("column,fraction", [("clip_l14", 0.3), ("clip_l14", 0.77), ("words", 0.5)])
def test_streamed_decision_equals_whole_table(tmp_path, monkeypatch, semantics, column, fraction):
    monkeypatch.setattr(decide_module, "BATCH", 333)  # batches straddle row groups and bitmask bytes
    hi, lo, l14, words = _pool(tmp_path)
    v = l14 if column == "clip_l14" else words
    report = decide(str(tmp_path), f"top({column}, {fraction})", str(tmp_path / "out.npy"), semantics=semantics)
    got = read_subset(str(tmp_path / "out.npy"), counts="none").uids
    assert list(zip(got["f0"].tolist(), got["f1"].tolist())) == _reference(hi, lo, v, fraction, semantics)
    assert report["duplicate_uids"]["rows"] == 300
    assert report["unique"] == N - 300 and report["kept"] == len(got)
    # the file is exactly what np.save writes for the same array
    import io
    buf = io.BytesIO()
    np.save(buf, got)
    assert (tmp_path / "out.npy").read_bytes() == buf.getvalue()


def test_ties_resolved_on_the_low_half(tmp_path, monkeypatch):
    """All rows share one score and one high half: exact top() keeps the lowest low halves."""
    monkeypatch.setattr(decide_module, "BATCH", 64)
    hi, lo, l14, words = _pool(tmp_path)
    table = pq.read_table(tmp_path / SCORES)
    table = table.set_column(0, "uid_hi", pa.array(np.full(N, 7, np.uint64)))
    table = table.set_column(table.schema.get_field_index("clip_l14"), "clip_l14", pa.array(np.full(N, 0.5, np.float32)))
    pq.write_table(table, tmp_path / SCORES, row_group_size=1000)
    decide(str(tmp_path), "top(clip_l14, 0.1)", str(tmp_path / "out.npy"), semantics="exact")
    got = read_subset(str(tmp_path / "out.npy"), counts="none").uids
    unique_lo = np.unique(lo)
    assert got["f1"].tolist() == unique_lo[:int(math.floor(0.1 * len(unique_lo) + 0.5))].tolist()
    assert (got["f0"] == 7).all()
