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

from reinforge.curation.filters import score_units
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
    monkeypatch.setattr(score_units, "BATCH", 333)  # batches straddle row groups and bitmask bytes
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


@pytest.mark.parametrize("semantics", ["exact", "datacomp"])
def test_units_and_workers_write_the_same_bytes(tmp_path, monkeypatch, semantics):
    """Cut into units of 2 row groups (7 tasks a pass) and run inline, on worker processes and as Ray tasks,
    `filter apply` writes the bytes of one whole-file unit (subset and report), and leaves no work files."""
    monkeypatch.setattr(score_units, "BATCH", 333)
    _pool(tmp_path)
    rule = "top(clip_l14, 0.3) & (words>=2 | !lang==de) & top(clip_b32, 0.77)"
    outputs = {}
    for name, unit_rows, where in (("whole", 10**9, "inline"), ("units", 1000, "inline"),
                                   ("processes", 1000, "processes"), ("ray", 1000, "ray")):
        out = tmp_path / f"{name}.npy"
        decide(str(tmp_path), rule, str(out), str(tmp_path / "report.json"), semantics, unit_rows, where=where)
        report = json.loads((tmp_path / "report.json").read_text())
        report["output"] = None
        outputs[name] = (out.read_bytes(), report)
    assert all(o == outputs["whole"] for o in outputs.values())
    assert outputs["whole"][1]["duplicate_uids"]["rows"] == 300 and outputs["whole"][1]["kept"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if "work" in p.name) == []


def test_ties_resolved_on_the_low_half(tmp_path, monkeypatch):
    """All rows share one score and one high half: exact top() keeps the lowest low halves."""
    monkeypatch.setattr(score_units, "BATCH", 64)
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


# --- radix selection (radix.py): the k-th smallest without holding the column -----------------------------

def _chunks(keys: np.ndarray, rng) -> list[np.ndarray]:
    """The keys cut at random places (empty batches included), as streamed batches are."""
    return np.split(keys, np.sort(rng.integers(0, len(keys) + 1, 6)))


def _adversarial(rng, n=2000) -> dict[str, np.ndarray]:
    f32 = np.float32
    tiny = np.finfo(f32).smallest_subnormal
    return {
        "all ties": np.full(n, 0.25, f32),
        "zeros of both signs": rng.choice(np.array([0.0, -0.0], f32), n),
        "ties, signs, subnormals, inf": rng.choice(np.array([-1.5, -0.0, 0.0, tiny, -tiny, 1e-40, -1e-40, 3.4e38,
                                                             -np.inf, np.inf, 0.3, 0.3, 0.3], f32), n),
        "normal float32": rng.standard_normal(n).astype(f32),
        "float64 with subnormals": rng.choice(np.array([5e-324, -5e-324, -0.0, 0.0, 1e-310, -np.inf, np.inf, 2.5,
                                                        -2.5], np.float64), n),
        "float64 spread": rng.standard_normal(n) * 1e300,
        "int32 extremes": rng.choice(np.array([-2**31, -3, -1, 0, 2, 2**31 - 1], np.int32), n),
        "int32 spread": rng.integers(-2**31, 2**31, n, np.int64).astype(np.int32),
        "int64 extremes": rng.choice(np.array([-2**63, -1, 0, 1, 2**63 - 1], np.int64), n),
        "int16": rng.integers(-2**15, 2**15, n, np.int64).astype(np.int16),
        "uint64 colliding high halves": rng.choice(np.array([0, 3, 2**63, 2**64 - 1], np.uint64), n),
        "uint64 spread": rng.integers(0, 2**64, n, np.uint64, endpoint=False),
    }


@pytest.mark.parametrize("small", [0, 5, None])  # 0: every pass a histogram; None: radix.SMALL as shipped
def test_radix_select_equals_partition(monkeypatch, small):
    from reinforge.curation.filters import radix
    if small is not None:
        monkeypatch.setattr(radix, "SMALL", small)
    rng = np.random.default_rng(1)
    for name, values in _adversarial(rng).items():
        keys = radix.order_keys(values)
        chunks = _chunks(keys, rng)
        ordered = np.sort(values)
        ties = np.flatnonzero(ordered[1:] != ordered[:-1])  # the edges of tied runs
        for k in sorted({0, len(values) - 1, len(values) // 2, *ties[:3].tolist(), *(ties[-3:] + 1).tolist()}):
            for count in (None, len(values)):
                got = radix.radix_select(lambda: iter(chunks), lambda m: k, 8 * keys.dtype.itemsize, count=count)
                want = np.partition(values, k)[k]
                value = radix.key_value(got.key, values.dtype)
                assert value.dtype == values.dtype and value == want, (name, k)
                assert (got.count, got.below, got.equal) == (len(values), int((values < want).sum()),
                                                             int((values == want).sum())), (name, k)
    none = radix.radix_select(lambda: iter([keys]), lambda m: None, 64)
    assert none.key is None and none.count == len(keys)


def test_order_keys_sort_as_the_values():
    from reinforge.curation.filters.radix import key_value, order_keys
    rng = np.random.default_rng(2)
    for dtype, bits in ((np.float32, np.uint32), (np.float64, np.uint64)):
        values = rng.integers(0, np.iinfo(bits).max, 20000, bits, endpoint=True).view(dtype)
        values = np.concatenate([np.array([0.0, -0.0, np.inf, -np.inf], dtype), values[~np.isnan(values)]])
        keys = order_keys(values)
        assert keys.dtype == bits
        assert (np.diff(values[np.argsort(keys, kind="stable")]) >= 0).all()
        assert ((keys[:, None] == keys[None, :2000]) == (values[:, None] == values[None, :2000])).all()
        back = np.array([key_value(int(k), dtype) for k in keys[:3000]], dtype)
        zero = values[:3000] == 0  # -0.0 comes back as +0.0
        assert (back.view(bits) == np.where(zero, 0, values[:3000]).view(bits)).all()
    ints = np.array([-2**31, -1, 0, 1, 2**31 - 1], np.int32)
    assert (np.diff(order_keys(ints).astype(np.int64)) > 0).all()
    assert [int(key_value(int(k), np.int32)) for k in order_keys(ints)] == ints.tolist()


def _adversarial_pool(folder, column, values):
    """The stress pool of _pool (repeats, colliding high halves) with `column` replaced (None = null)."""
    _pool(folder)
    table = pq.read_table(folder / SCORES)
    i = table.schema.get_field_index(column)
    table = table.set_column(i, column, pa.array(values, table.schema.field(column).type, from_pandas=True))
    pq.write_table(table, folder / SCORES, row_group_size=777)
    return table.column("uid_hi").to_numpy(), table.column("uid_lo").to_numpy()


def _adversarial_column(kind, rng):
    if kind == "ints with nulls":  # batches with nulls come as float64 and are cast back to int32
        values = rng.choice(np.array([-2**31, -3, 0, 2, 2**31 - 1], np.int64), N).astype(object)
        values[rng.random(N) < 0.1] = None
        return "words", values
    f32 = np.float32
    tiny = float(np.finfo(f32).smallest_subnormal)
    pick = {"zeros of both signs": [0.0, -0.0, 0.0, -0.0, np.nan],
            "signs, subnormals, inf": [-1.5, -0.0, 0.0, tiny, -tiny, 1e-40, -1e-40, np.inf, -np.inf, np.nan, 0.3]}[kind]
    return "clip_l14", rng.choice(np.array(pick, f32), N)


@pytest.mark.parametrize("semantics", ["exact", "datacomp"])
@pytest.mark.parametrize("kind", ["zeros of both signs", "signs, subnormals, inf", "ints with nulls"])
def test_top_on_adversarial_columns(tmp_path, monkeypatch, semantics, kind):
    """Ties everywhere, -0.0 with 0.0, subnormals, +-inf, NaN/nulls, ints: the radix selection with every pass
    a histogram (SMALL = 0) and batches that cut tied runs, against the whole-table reference, k at both ends."""
    from reinforge.curation.filters import radix
    monkeypatch.setattr(score_units, "BATCH", 333)
    monkeypatch.setattr(radix, "SMALL", 0)
    column, values = _adversarial_column(kind, np.random.default_rng(3))
    hi, lo = _adversarial_pool(tmp_path, column, values)
    v = np.array([np.nan if x is None else x for x in values], np.float64)
    fractions = [0.0, 0.0001, 0.0003, 0.3, 0.77] + ([1.0] if semantics == "exact" else [])  # rank n-1 ... rank 0
    for fraction in fractions:
        report = decide(str(tmp_path), f"top({column}, {fraction})", str(tmp_path / "out.npy"), semantics=semantics)
        got = read_subset(str(tmp_path / "out.npy"), counts="none").uids
        want = _reference(hi, lo, v, fraction, semantics)
        assert list(zip(got["f0"].tolist(), got["f1"].tolist())) == want, (kind, fraction)
        atom = report["atoms"][0]
        if semantics == "datacomp":
            ranked = -np.sort(-v)  # NaN last
            assert atom["threshold"] == ranked[atom["position"]] or math.isnan(ranked[atom["position"]])
        elif atom["keep"]:
            first = {}
            for i, uid in enumerate(zip(hi.tolist(), lo.tolist())):
                first.setdefault(uid, i)
            assert atom["threshold"] == min(v[first[uid]] for uid in want)
        if atom.get("threshold") == 0:
            assert math.copysign(1, atom["threshold"]) == 1  # -0.0 and 0.0 share a key: the threshold is 0.0


def test_tie_break_over_colliding_high_halves(tmp_path, monkeypatch):
    """Exact top() with every row tied: the tie-break selects high halves (4 of them, so 64-bit collisions)
    and then low halves at the boundary's high half, by histogram passes (SMALL = 0) and by gathering."""
    from reinforge.curation.filters import radix
    monkeypatch.setattr(score_units, "BATCH", 100)
    hi, lo = _adversarial_pool(tmp_path, "clip_l14", np.full(N, 0.5, np.float32))
    v = np.full(N, 0.5)
    for small in (0, radix.SMALL):
        monkeypatch.setattr(radix, "SMALL", small)
        for fraction in (0.0003, 0.26, 0.5, 0.999, 1.0):
            report = decide(str(tmp_path), f"top(clip_l14, {fraction})", str(tmp_path / "out.npy"), semantics="exact")
            got = read_subset(str(tmp_path / "out.npy"), counts="none").uids
            assert list(zip(got["f0"].tolist(), got["f1"].tolist())) == _reference(hi, lo, v, fraction, "exact")
            atom = report["atoms"][0]
            assert atom["keep"] >= 1
            assert atom["tied_not_kept"] == atom["valid"] - atom["keep"] and atom["threshold"] == 0.5


@pytest.mark.parametrize("repeats", [0, 3, 15, 16, 17, 400])
def test_repeated_rows_listed_or_as_bits(repeats):
    """RepeatedRows keeps the repeated rows' numbers up to one row in 64 (here 1,000 rows: 16), then a bit
    per row; either way, added in any order and in pieces, it marks exactly those rows, batch by batch."""
    rows = 1000
    rng = np.random.default_rng(repeats)
    repeated = rng.choice(rows, repeats, replace=False).astype(np.int64)
    marks = score_units.RepeatedRows(rows)
    for piece in np.array_split(repeated, 5):  # as uid buckets find them: not in row order
        marks.add(piece)
    marks.close()
    assert (marks.bits is not None) == (repeats > 16)
    expected = np.ones(rows, bool)
    expected[repeated] = False
    for start in range(0, rows, 37):
        n = min(37, rows - start)
        assert (marks.unique(start, n) == expected[start:start + n]).all()
    for start, n in ((0, rows), (5, 300), (301, 37), (999, 1), (640, 360)):  # a unit's share, read in batches
        part = marks.part(start, n)
        for at in range(start, start + n, 29):
            m = min(29, start + n - at)
            assert (part.unique(at, m) == expected[at:at + m]).all()


def test_rewritten_scores_are_read_anew(tmp_path):
    """Tasks reuse a parsed footer per file version: scores rewritten in place (another pool, another row
    group size) are read from their own footer, not the cached one."""
    _pool(tmp_path)
    decide(str(tmp_path), "top(clip_l14, 0.3)", str(tmp_path / "a.npy"))
    hi, lo, l14, _ = _pool(tmp_path, seed=1)
    table = pq.read_table(tmp_path / SCORES)
    pq.write_table(table, tmp_path / SCORES, row_group_size=500)
    decide(str(tmp_path), "top(clip_l14, 0.3)", str(tmp_path / "b.npy"))
    got = read_subset(str(tmp_path / "b.npy"), counts="none").uids
    assert list(zip(got["f0"].tolist(), got["f1"].tolist())) == _reference(hi, lo, l14, 0.3, "datacomp")


def test_parts_decide_as_one_file(tmp_path, monkeypatch):
    """The scores as parts (what `filter score` writes: the report lists them) decide as the same rows in one
    file (what earlier versions wrote) do: units never span parts, rows are numbered across them."""
    monkeypatch.setattr(score_units, "BATCH", 333)
    one, parts = tmp_path / "one", tmp_path / "parts"
    one.mkdir()
    (parts / "scores").mkdir(parents=True)
    _pool(one)
    table, listed = pq.read_table(one / SCORES), []
    for i, (a, b) in enumerate([(0, 1200), (1200, 1300), (1300, N)]):
        pq.write_table(table.slice(a, b - a), parts / "scores" / f"{i:06d}.parquet", row_group_size=250)
        listed.append({"file": f"scores/{i:06d}.parquet", "row_groups": [min(250, b - s) for s in range(a, b, 250)]})
    (parts / REPORT).write_text(json.dumps({"rows": N, "malformed_uids": {"rows": 0}, "parts": listed}))
    rule = "top(clip_l14, 0.3) & (words>=2 | !lang==de)"
    for where in ("inline", "processes"):
        outputs = []
        for folder in (one, parts):
            report = decide(str(folder), rule, str(folder / "out.npy"), unit_rows=400, where=where)
            outputs.append(((folder / "out.npy").read_bytes(), {k: v for k, v in report.items()
                                                                 if k not in ("scores", "output")}))
        assert outputs[0] == outputs[1] and outputs[0][1]["kept"] > 0, where
