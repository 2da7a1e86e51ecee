"""Decision pass of the DataComp filters: a rule over the stored scores -> a DataComp subset file and a
JSON report. No model runs here; a new threshold costs one read of a few score columns.

- Duplicate uids: the first scored row (input order) stands for the uid; later rows are counted.
- Invalid values (null, NaN, inf) make an atom unknown; rules combine with SQL's three-valued logic
  (`!` of unknown is unknown), and only rows whose rule is true are kept, so an invalid score never
  passes a filter nor its negation. Invalid rows are counted per atom.
- `top(col, f)` ranks the pool's unique rows with a valid `col` and keeps exactly round(f*n) (rounded
  half up) of them: highest first, ties broken by uid ascending. It is an atom like any other, so
  `basic & top(clip_l14, 0.3)` keeps the basic rows among the pool's top 30%, as DataComp's
  intersection baselines do.
- Semantics `datacomp` (the default) decides as DataComp's baseline code does, uid for uid:
  `top(col, f)` takes the score at sorted position int(f*n) over every scored row (duplicate uids and
  invalid values included, invalid ones sorted last) and keeps every row >= it, so ties and one more
  row are kept; comparisons are made in float32 (the columns' type, as pandas compares them), so a
  clip_b32 equal to float32(0.22) passes `clip_b32>=0.22`; the named filters `text` and `caption` are
  DataComp's (rules.py). Semantics `exact` keeps the round(f*n) rule above and float64 comparisons.
- Accounting (checked before writing): rows in = malformed uids + duplicate rows + kept + dropped.
The report holds every threshold resolved to a number, so a decision can be reproduced or audited.

Memory (issue #16): the scores are streamed in batches, never held whole. The driver keeps the repeated
rows (RepeatedRows: 8 B per repeat, at most a bit per row) and spills uids to files by their high bits to
find repeats and to write the sorted subset (24 B a row under the temp directory, TMPDIR; removed as each
bucket is read). A top() threshold and its
exact tie-break are radix selections over a few more passes (radix.py): a 65536-bin histogram per pass
and at most radix.SMALL keys at the end, not the column.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np

from reinforge.curation.filters.clusters import FilterError
from reinforge.curation.filters.radix import Selected, key_value, order_keys, radix_select
from reinforge.curation.filters.rules import NUMERIC, Compare, Node, Rule, Top, columns, leaves, parse_rule
from reinforge.curation.filters.scores import REPORT, SCORES
from reinforge.formats.subset import SUBSET_DTYPE, first_occurrence, is_sorted_unique, uid_hex, uid_order
from reinforge.io.spill import UidSpill, bucket_bits
from reinforge.io.storage import atomic_open, filesystem, read_text, write_bytes

FORMAT = "reinforge.filter_decision/1"
SAMPLE = 10
BATCH = 1 << 16  # rows per streamed batch
_SOURCES = {"clip_b32": "clip_b32_similarity_score", "clip_l14": "clip_l14_similarity_score",
            "short_side": "original_width/original_height", "aspect": "original_width/original_height"}
_MAX_U64 = np.uint64(2**64 - 1)


class RepeatedRows:
    """The rows whose uid an earlier row has: their sorted numbers while those take less room than a bit per
    row (8 B each: up to one row in 64), else a bit per row. Scored pools repeat few uids (~0.1 %: ~0.01 B
    per row), and a bit per row would be 1.6 GB over DataComp-xlarge's 12.8B rows."""

    def __init__(self, rows: int):
        self.rows, self.count = rows, 0
        self.listed: list[np.ndarray] = []
        self.sorted: Optional[np.ndarray] = None
        self.bits: Optional[np.ndarray] = None  # packed, little bit order

    def add(self, rows: np.ndarray) -> None:
        self.count += len(rows)
        if self.bits is None and 64 * self.count > self.rows + 64:
            self.bits = np.zeros((self.rows + 7) // 8, np.uint8)
            for listed in self.listed:
                self._set(listed)
            self.listed = []
        if self.bits is not None:
            self._set(rows)
        else:
            self.listed.append(rows)

    def _set(self, rows: np.ndarray) -> None:
        np.bitwise_or.at(self.bits, rows >> 3, (1 << (rows & 7)).astype(np.uint8))

    def close(self) -> None:
        """Every repeated row added: sort the listed ones."""
        if self.bits is None:
            self.sorted = np.sort(np.concatenate(self.listed or [np.zeros(0, np.int64)]))
            self.listed = []

    def unique(self, start: int, n: int) -> np.ndarray:
        """Mask of the rows [start, start+n) that are the first row of their uid."""
        if self.bits is not None:
            bits = np.unpackbits(self.bits[start // 8:(start + n + 7) // 8], bitorder="little")
            return bits[start % 8:start % 8 + n] == 0
        mask = np.ones(n, bool)
        a, b = np.searchsorted(self.sorted, [start, start + n])
        mask[self.sorted[a:b] - start] = False
        return mask


class _Scores:
    """The scores file, read in batches of a few columns; `repeat` marks rows whose uid came earlier."""

    def __init__(self, pf, report: dict):
        self.pf, self.report = pf, report
        self.rows = pf.metadata.num_rows
        self.repeat = RepeatedRows(self.rows)

    def batches(self, names: list[str]) -> Iterator[tuple[int, int, dict]]:
        """(first row, rows, {name: column}) per batch: uids as uint64, numeric columns as numpy in their stored
        type (nulls as NaN, in float64 then), strings as (codes with -1 for null, dictionary list)."""
        import pyarrow as pa
        start = 0
        for batch in self.pf.iter_batches(batch_size=BATCH, columns=names, use_threads=False):
            out = {}
            for name in names:
                col = batch.column(name)
                if name in ("uid_hi", "uid_lo"):
                    out[name] = col.to_numpy(zero_copy_only=False)
                elif name in NUMERIC:
                    out[name] = (col.to_numpy(zero_copy_only=False) if col.null_count == 0
                                 else col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False))
                else:  # dictionary-encoded strings: compare codes, not Python strings
                    out[name] = (col.indices.fill_null(-1).to_numpy(zero_copy_only=False), col.dictionary.to_pylist())
            yield start, batch.num_rows, out
            start += batch.num_rows

    def unique(self, start: int, n: int) -> np.ndarray:
        """Mask of the batch rows [start, start+n) that are the first row of their uid."""
        return self.repeat.unique(start, n)


@contextmanager
def open_scores(scores_dir: str, names: list[str]) -> Iterator[_Scores]:
    import pyarrow.parquet as pq
    scores_dir = scores_dir.rstrip("/")
    fs, path = filesystem(f"{scores_dir}/{SCORES}")
    if not fs.exists(path):
        raise FilterError(f"{scores_dir}: no {SCORES} (run `reinforge filter score` first)")
    report = json.loads(read_text(f"{scores_dir}/{REPORT}"))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering reads ahead of iter_batches, O(file) in memory
        available = pf.schema_arrow.names
        missing = [n for n in names if n not in available]
        if missing:
            hint = (" (score with --clusters K --cluster-targets ...)" if any(n.startswith("cluster") for n in missing)
                    else " (score with --cld3)" if "lang_cld3" in missing else "")
            raise FilterError(f"{scores_dir}: the scores have no column {', '.join(missing)}{hint}")
        yield _Scores(pf, report)


def _mark_repeats(scores: _Scores) -> tuple[int, list[str]]:
    """Set scores.repeat for every row whose uid an earlier row has; return (repeats, sample in uid order)."""
    repeats, sample = 0, []
    with UidSpill(bucket_bits(scores.rows), np.int64) as spill:
        for start, n, b in scores.batches(["uid_hi", "uid_lo"]):
            spill.add(b["uid_hi"], b["uid_lo"], np.arange(start, start + n, dtype=np.int64))
        for records in spill.buckets():
            order = uid_order(records["hi"], records["lo"])  # stable: rows were added in input order
            hi, lo, rows = records["hi"][order], records["lo"][order], records["p"][order]
            later = ~first_occurrence(hi, lo)
            if later.any():
                r = rows[later]
                scores.repeat.add(r)
                repeats += len(r)
                sample += [uid_hex(h, l) for h, l in zip(hi[later][:SAMPLE - len(sample)], lo[later][:SAMPLE - len(sample)])]
    scores.repeat.close()
    return repeats, sample


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class _Top:
    """A top() atom resolved to a row-local test: a threshold (and, in exact semantics, the last tied uid kept).
    Both are found by radix selections over streamed passes (radix.py), never by holding the column."""

    def __init__(self, atom: Top, semantics: str, scores: _Scores):
        self.atom, self.semantics = atom, semantics
        self.details: dict = {}
        self.threshold = math.nan
        self.boundary = None  # exact: (hi, lo) of the last tied row kept
        self.stored = np.dtype(scores.pf.schema_arrow.field(atom.column).type.to_pandas_dtype())
        (self._datacomp if semantics == "datacomp" else self._exact)(scores)

    def _select(self, scores: _Scores, rank, unique_finite: bool) -> Selected:
        """The rank(n)-th smallest of the column's n non-NaN values (of every row), or of its finite values
        (of unique rows), as an order key of the stored type."""
        column = self.atom.column

        def passes() -> Iterator[np.ndarray]:
            for start, n, b in scores.batches([column]):
                v = b[column]
                if v.dtype.kind == "f":
                    keep = np.isfinite(v) if unique_finite else ~np.isnan(v)
                else:
                    keep = np.ones(n, bool)
                if unique_finite:
                    keep &= scores.unique(start, n)
                # exact: a batch with nulls came as float64, and its other values are of the stored type
                yield order_keys(v[keep].astype(self.stored, copy=False))
        return radix_select(passes, rank, 8 * self.stored.itemsize)

    def _datacomp(self, scores: _Scores) -> None:
        # DataComp ranks every scored row (repeats and invalid values included, NaN last) and takes the
        # score at descending position int(f*n)
        n, a = scores.rows, self.atom
        position = int(n * a.fraction)
        if not 0 <= position < n:
            raise FilterError(f"{a}: DataComp's threshold is the score at sorted position int(f*n) = {position}, "
                              f"outside the {n} scored rows (use --semantics exact)")
        selected = self._select(scores, lambda m: m - 1 - position if position < m else None, unique_finite=False)
        if selected.key is not None:
            self.threshold = float(key_value(selected.key, self.stored))
        self.details = {"position": position, "ranked_rows": n, "threshold": self.threshold}

    def _exact(self, scores: _Scores) -> None:
        # the round(f*n) highest unique valid rows, ties broken by uid ascending
        def smallest_kept(valid: int) -> Optional[int]:  # the rank of the keep-th largest
            keep = _round_half_up(self.atom.fraction * valid)
            return valid - keep if keep else None
        selected = self._select(scores, smallest_kept, unique_finite=True)
        valid = selected.count
        keep = _round_half_up(self.atom.fraction * valid)
        self.details = {"valid": valid, "keep": keep}
        if not keep:
            return
        self.threshold = float(key_value(selected.key, self.stored))
        greater, tied = valid - selected.below - selected.equal, selected.equal
        need = keep - greater  # >= 1: the threshold is the keep-th largest
        # the need-th smallest high half among the tied rows, then (a 64-bit collision there) the low half
        h = radix_select(lambda: self._tied(scores, "uid_hi"), lambda m: need - 1, 64, count=tied)
        lo = _MAX_U64
        if h.equal > 1:
            lo = radix_select(lambda: self._tied(scores, "uid_lo", np.uint64(h.key)), lambda m: need - h.below - 1, 64,
                              count=h.equal).key
        self.boundary = (np.uint64(h.key), np.uint64(lo))
        self.details.update(threshold=self.threshold, tied_not_kept=tied - need)

    def _tied(self, scores: _Scores, half: str, hi: Optional[np.uint64] = None) -> Iterator[np.ndarray]:
        """One uid half of the unique rows tied with the threshold (and with high half `hi`), batch by batch."""
        column = self.atom.column
        for start, n, b in scores.batches(["uid_hi", column] + (["uid_lo"] if half == "uid_lo" else [])):
            at = scores.unique(start, n) & (b[column] == self.threshold)
            if hi is not None:
                at &= b["uid_hi"] == hi
            yield b[half][at]

    def test(self, b: dict) -> tuple[np.ndarray, np.ndarray]:
        v = b[self.atom.column]
        finite = np.isfinite(v)
        with np.errstate(invalid="ignore"):
            if self.semantics == "datacomp":
                true = v >= self.threshold
            elif self.boundary is None:
                true = np.zeros(len(v), bool)
            else:
                h, lo = self.boundary
                hi_, lo_ = b["uid_hi"], b["uid_lo"]
                tie_kept = (hi_ < h) | ((hi_ == h) & (lo_ <= lo))
                true = finite & ((v > self.threshold) | ((v == self.threshold) & tie_kept))
        return true, finite & ~true


def _compare(a: Compare, semantics: str, b: dict) -> tuple[np.ndarray, np.ndarray]:
    if a.column in NUMERIC:
        v = b[a.column].astype(np.float64, copy=False)
        valid = np.isfinite(v)
        # stored scores are float32; DataComp (pandas) compares them to the constant in float32
        value = float(np.float32(a.value)) if semantics == "datacomp" else a.value
        with np.errstate(invalid="ignore"):
            hit = {">=": v >= value, ">": v > value, "<=": v <= value, "<": v < value,
                   "==": v == value, "!=": v != value}[a.op]
    else:
        codes, dictionary = b[a.column]
        valid = codes >= 0
        code = dictionary.index(a.value) if a.value in dictionary else -2
        hit = (codes == code) if a.op == "==" else (codes != code)
    return hit & valid, ~hit & valid


def _evaluate(rule: Rule, atoms: dict) -> tuple[np.ndarray, np.ndarray]:
    """Three-valued: (true, false) masks; neither means unknown."""
    if not isinstance(rule, Node):
        return atoms[rule]
    if rule.op == "not":
        true, false = _evaluate(rule.parts[0], atoms)
        return false, true
    results = [_evaluate(p, atoms) for p in rule.parts]
    trues, falses = [r[0] for r in results], [r[1] for r in results]
    if rule.op == "and":
        return np.logical_and.reduce(trues), np.logical_or.reduce(falses)
    return np.logical_or.reduce(trues), np.logical_and.reduce(falses)


def _check_valid(rule: Rule, scores: _Scores, scores_dir: str) -> None:
    names = columns(rule)
    seen = dict.fromkeys(names, False)
    for start, n, b in scores.batches(names):
        unique = scores.unique(start, n)
        for name in names:
            if not seen[name]:
                v = b[name]
                seen[name] = bool(((v[0] >= 0) if name not in NUMERIC else np.isfinite(v))[unique].any())
        if all(seen.values()):
            return
    for name in names:
        if not seen[name]:
            source = _SOURCES.get(name, name)
            raise FilterError(f"{scores_dir}: the rule uses {name}, but no scored row has a valid value "
                              f"(check the metadata column {source} and score_report.json)")


def _write_sorted(out: str, spill: UidSpill, total: int) -> None:
    """The spilled uids as one sorted subset .npy, written bucket by bucket (np.save's bytes)."""
    header = np.lib.format.header_data_from_array_1_0(np.empty(0, SUBSET_DTYPE))
    header["shape"] = (total,)
    last, written = None, 0
    with atomic_open(out) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for records in spill.buckets():
            uids = np.empty(len(records), SUBSET_DTYPE)
            order = uid_order(records["hi"], records["lo"])
            uids["f0"], uids["f1"] = records["hi"][order], records["lo"][order]
            edge = uids[:1] if last is None else np.concatenate([last, uids[:1]])
            if not (is_sorted_unique(uids) and is_sorted_unique(edge)):
                raise AssertionError(f"{out}: kept uids are not sorted and unique")
            if len(uids):
                last = uids[-1:]
            f.write(uids.tobytes())
            written += len(uids)
    if written != total:
        raise AssertionError(f"{out}: wrote {written} uids, expected {total}")


def decide(scores_dir: str, rule_text: str, out: str, report_path: Optional[str] = None,
           semantics: str = "datacomp") -> dict:
    """Apply `rule_text` to the scores; write the subset file `out` and its report; return the report."""
    rule = parse_rule(rule_text, semantics)
    names = columns(rule)
    with open_scores(scores_dir, names) as scores:
        score_report = scores.report
        if not scores.rows:
            raise FilterError(f"{scores_dir}: no scored rows ({score_report.get('rows', 0)} metadata rows, "
                              f"{score_report.get('malformed_uids', {}).get('rows', 0)} with malformed uids)")
        repeats, sample = _mark_repeats(scores)
        _check_valid(rule, scores, scores_dir)
        tops = {a: _Top(a, semantics, scores) for a in leaves(rule) if isinstance(a, Top)}
        counts = {a: [0, 0, 0] for a in leaves(rule)}  # the report lists atoms in rule order: pass, fail, valid
        unique_rows, kept = 0, 0
        with UidSpill(bucket_bits(scores.rows)) as spill:
            for start, n, b in scores.batches(["uid_hi", "uid_lo"] + names):
                unique = scores.unique(start, n)
                b = {k: (v[unique] if isinstance(v, np.ndarray) else (v[0][unique], v[1])) for k, v in b.items()}
                atoms = {a: tops[a].test(b) if a in tops else _compare(a, semantics, b) for a in counts}
                for a, (true, false) in atoms.items():
                    counts[a][0] += int(true.sum())
                    counts[a][1] += int(false.sum())
                    if a in tops and semantics == "datacomp":
                        counts[a][2] += int(np.isfinite(b[a.column]).sum())
                true, _ = _evaluate(rule, atoms)
                spill.add(b["uid_hi"][true], b["uid_lo"][true])
                unique_rows += int(unique.sum())
                kept += int(true.sum())
            atom_report = []
            for a, (passed, failed, valid) in counts.items():
                details = dict(tops[a].details) if a in tops else {}
                if a in tops and semantics == "datacomp":
                    details = {"valid": valid, "keep": passed, **details}
                atom_report.append({"atom": str(a), "pass": passed, "fail": failed,
                                    "invalid": unique_rows - passed - failed, **details})
            malformed = score_report["malformed_uids"]["rows"]
            report = {"format": FORMAT, "scores": scores_dir, "rule": rule_text, "parsed": str(rule),
                      "semantics": semantics, "rows_in": score_report["rows"], "malformed_uids": malformed,
                      "duplicate_uids": {"rows": repeats, "sample": sample},
                      "unique": unique_rows, "kept": kept, "dropped": unique_rows - kept,
                      "atoms": atom_report, "output": out}
            if report["rows_in"] != malformed + repeats + report["kept"] + report["dropped"]:
                raise AssertionError(f"filter accounting is off: {report}")
            _write_sorted(out, spill, kept)
    write_bytes(report_path or default_report_path(out), json.dumps(report, indent=1, sort_keys=True).encode())
    return report


def default_report_path(out: str) -> str:
    return (out[:-4] if out.endswith(".npy") else out) + ".report.json"
