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

Scale (issue #16): every pass over the scores runs as tasks (TaskMap: Ray, worker processes or inline) over
units of whole row groups (score_units.py), and the driver holds per-unit counts, never a column:
1. uids: each unit routes its (uid, row) to uid buckets (the high bits of the uid) in a part file;
   per bucket, a stable sort finds the rows whose uid an earlier row has (RepeatedRows: 8 B a repeat, at
   most a bit a row, a unit's share handed to each of its tasks).
2. a top() threshold and its exact tie-break are radix selections (top.py, radix.py): each pass a 65536-bin
   histogram per unit, summed, and at most radix.SMALL keys gathered at the end.
3. decide: each unit evaluates the rule on its rows, counts, and routes its kept uids to uid buckets;
   per bucket, the kept uids are sorted, and the driver appends the buckets to the subset file in order.
Part files (io/parts.py) live in a work folder beside the output (so tasks on any node see them), removed
at the end. Units, batches and buckets change how the work is cut, never the bytes written.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np

from reinforge.curation.filters.clusters import FilterError
from reinforge.curation.filters.rules import NUMERIC, Compare, Node, Rule, Top, columns, leaves, parse_rule
from reinforge.curation.filters.score_units import Passes, RepeatedRows, Scores, Unit, open_scores, part_file
from reinforge.curation.filters.scores import UNIT_ROWS
from reinforge.curation.filters.top import ResolvedTop
from reinforge.formats.subset import (appending_subset, first_occurrence, is_sorted_unique, make_subset, uid_hex,
                                      uid_order)
from reinforge.io.parts import bucket_bits, concatenate_columns, read_parts, write_uid_buckets
from reinforge.io.storage import absolute_url, remove_tree, write_bytes
from reinforge.runtime.ray_session import TaskMap, ray_session, where_to_map

FORMAT = "reinforge.filter_decision/1"
SAMPLE = 10
_SOURCES = {"clip_b32": "clip_b32_similarity_score", "clip_l14": "clip_l14_similarity_score",
            "short_side": "original_width/original_height", "aspect": "original_width/original_height"}
UID_ROWS = {"hi": np.uint64, "lo": np.uint64, "row": np.int64}  # part file columns
UIDS = {"hi": np.uint64, "lo": np.uint64}


# --- pass 1: the rows whose uid an earlier row has ----------------------------------------------------------

def unit_uids(unit: Unit, _repeats, work: str, bits: int) -> np.ndarray:
    """A unit's (uid, row) to its part file by uid bucket; returns its rows per bucket."""
    parts = {"hi": [], "lo": [], "row": []}
    for start, n, b in unit.batches(["uid_hi", "uid_lo"]):
        parts["hi"].append(b["uid_hi"])
        parts["lo"].append(b["uid_lo"])
        parts["row"].append(np.arange(start, start + n, dtype=np.int64))
    rows = concatenate_columns(parts, UID_ROWS)
    del parts  # the batches: the unit's rows are held once while grouped
    return write_uid_buckets(part_file(work, "uids", unit), rows, bits)


def bucket_repeats(parts: list[tuple[str, int, int]]) -> tuple[np.ndarray, list[str]]:
    """A uid bucket's repeated rows (each row of a uid but its first) and the first SAMPLE of their uids."""
    records = read_parts(parts, UID_ROWS)  # units in order, rows in order inside them: input order
    order = uid_order(records["hi"], records["lo"])  # stable: a uid's first row stays first
    hi, lo, rows = records["hi"][order], records["lo"][order], records["row"][order]
    later = ~first_occurrence(hi, lo)
    return rows[later], [uid_hex(h, l) for h, l in zip(hi[later][:SAMPLE], lo[later][:SAMPLE])]


def mark_repeats(passes: Passes, rows: int) -> tuple[int, list[str]]:
    """Set passes.repeats; return (repeated rows, a sample of their uids in uid order)."""
    counts = list(passes.per_unit(unit_uids, (passes.work, passes.bits)))
    repeats, sample = RepeatedRows(rows), []
    for later, some in passes.per_bucket(bucket_repeats, "uids", counts):
        if len(later):
            repeats.add(later)
        sample += some[:SAMPLE - len(sample)]
    repeats.close()
    remove_tree(f"{passes.work}/uids")
    passes.repeats = [repeats.part(u.start, u.rows) for u in passes.units]
    return repeats.count, sample


# --- pass 3 (pass 2, the top() thresholds, is top.py): the rule on every unique row, kept uids sorted ---------

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


@dataclass
class UnitDecision:
    atoms: np.ndarray  # per atom of leaves(rule): pass, fail, valid (valid counted for datacomp's top() only)
    unique: int
    kept: int
    seen: dict[str, bool]  # per column: does a unique row hold a valid value
    buckets: np.ndarray  # kept uids per uid bucket in the unit's part file


def decide_unit(unit: Unit, repeats: RepeatedRows, rule: Rule, semantics: str, tops: dict, work: str,
                bits: int) -> UnitDecision:
    """The rule on a unit's unique rows: its counts, and its kept uids to its part file by uid bucket."""
    names, atoms_in_order = columns(rule), leaves(rule)
    counts = np.zeros((len(atoms_in_order), 3), np.int64)
    seen = dict.fromkeys(names, False)
    unique_rows, kept = 0, {"hi": [], "lo": []}
    for start, n, b in unit.batches(["uid_hi", "uid_lo"] + names):
        unique = repeats.unique(start, n)
        b = {k: (v[unique] if isinstance(v, np.ndarray) else (v[0][unique], v[1])) for k, v in b.items()}
        for name in names:
            if not seen[name]:
                v = b[name]
                seen[name] = bool(((v[0] >= 0) if name not in NUMERIC else np.isfinite(v)).any())
        atoms = {a: tops[a].test(b) if a in tops else _compare(a, semantics, b) for a in atoms_in_order}
        for i, a in enumerate(atoms_in_order):
            true, false = atoms[a]
            counts[i, 0] += int(true.sum())
            counts[i, 1] += int(false.sum())
            if a in tops and semantics == "datacomp":
                counts[i, 2] += int(np.isfinite(b[a.column]).sum())
        true, _ = _evaluate(rule, atoms)
        kept["hi"].append(b["uid_hi"][true])
        kept["lo"].append(b["uid_lo"][true])
        unique_rows += int(unique.sum())
    kept = concatenate_columns(kept, UIDS)
    buckets = write_uid_buckets(part_file(work, "kept", unit), kept, bits)
    return UnitDecision(counts, unique_rows, len(kept["hi"]), seen, buckets)


def sorted_bucket(parts: list[tuple[str, int, int]]) -> np.ndarray:
    """A uid bucket's kept uids, sorted (unique: repeats were dropped)."""
    records = read_parts(parts, UIDS)
    order = uid_order(records["hi"], records["lo"])
    uids = make_subset(records["hi"][order], records["lo"][order])
    if not is_sorted_unique(uids):
        raise AssertionError(f"{parts[0][0]}: kept uids are not sorted and unique")
    return uids


def write_subset(out: str, passes: Passes, buckets: list[np.ndarray], total: int) -> None:
    """The kept uids as one sorted subset .npy (np.save's bytes), bucket after bucket."""
    with appending_subset(out, total) as subset:
        for uids in passes.per_bucket(sorted_bucket, "kept", buckets):
            subset.append(uids)


def _check_valid(seen: dict[str, bool], scores_dir: str) -> None:
    for name, valid in seen.items():
        if not valid:
            source = _SOURCES.get(name, name)
            raise FilterError(f"{scores_dir}: the rule uses {name}, but no scored row has a valid value "
                              f"(check the metadata column {source} and score_report.json)")


def decide(scores_dir: str, rule_text: str, out: str, report_path: Optional[str] = None,
           semantics: str = "datacomp", unit_rows: int = UNIT_ROWS, address: Optional[str] = None,
           where: Optional[str] = None) -> dict:
    """Apply `rule_text` to the scores; write the subset file `out` and its report; return the report. The
    passes run as tasks on Ray (`address`, or the Ray of this process), on worker processes for a large
    file, else inline (`where` names one); the bytes are the same."""
    rule = parse_rule(rule_text, semantics)
    names = columns(rule)
    scores = open_scores(scores_dir, names)
    if not scores.rows:
        raise FilterError(f"{scores_dir}: no scored rows ({scores.report.get('rows', 0)} metadata rows, "
                          f"{scores.report.get('malformed_uids', {}).get('rows', 0)} with malformed uids)")
    work = absolute_url(out) + ".work"
    with ray_session(address) if address else nullcontext():
        tasks = TaskMap(where or where_to_map(scores.rows))
        passes = Passes(tasks, scores.units(unit_rows), work, bucket_bits(scores.rows))
        try:
            report = _decide(passes, scores, scores_dir, rule, rule_text, semantics, out)
        finally:
            tasks.close()
            remove_tree(work)
    write_bytes(report_path or default_report_path(out), json.dumps(report, indent=1, sort_keys=True).encode())
    return report


def _decide(passes: Passes, scores: Scores, scores_dir: str, rule: Rule, rule_text: str, semantics: str,
            out: str) -> dict:
    repeats, sample = mark_repeats(passes, scores.rows)
    tops = {a: ResolvedTop(a, semantics, passes, scores.types[a.column], scores.rows)
            for a in leaves(rule) if isinstance(a, Top)}
    atoms = leaves(rule)
    counts, unique_rows, kept, buckets = np.zeros((len(atoms), 3), np.int64), 0, 0, []
    seen = dict.fromkeys(columns(rule), False)
    for part in passes.per_unit(decide_unit, (rule, semantics, tops, passes.work, passes.bits)):
        counts += part.atoms
        unique_rows += part.unique
        kept += part.kept
        seen = {name: valid or part.seen[name] for name, valid in seen.items()}
        buckets.append(part.buckets)
    _check_valid(seen, scores_dir)
    atom_report = []  # in rule order
    for a, (passed, failed, valid) in zip(atoms, counts.tolist()):
        details = dict(tops[a].details) if a in tops else {}
        if a in tops and semantics == "datacomp":
            details = {"valid": valid, "keep": passed, **details}
        atom_report.append({"atom": str(a), "pass": passed, "fail": failed, "invalid": unique_rows - passed - failed,
                            **details})
    malformed = scores.report["malformed_uids"]["rows"]
    report = {"format": FORMAT, "scores": scores_dir, "rule": rule_text, "parsed": str(rule),
              "semantics": semantics, "rows_in": scores.report["rows"], "malformed_uids": malformed,
              "duplicate_uids": {"rows": repeats, "sample": sample},
              "unique": unique_rows, "kept": kept, "dropped": unique_rows - kept,
              "atoms": atom_report, "output": out}
    if report["rows_in"] != malformed + repeats + report["kept"] + report["dropped"]:
        raise AssertionError(f"filter accounting is off: {report}")
    write_subset(out, passes, buckets, kept)
    return report


def default_report_path(out: str) -> str:
    return (out[:-4] if out.endswith(".npy") else out) + ".report.json"
