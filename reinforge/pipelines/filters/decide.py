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
"""
from __future__ import annotations

import json
import math
from typing import Optional

import numpy as np

from reinforge.pipelines.filters.clusters import FilterError
from reinforge.pipelines.filters.rules import NUMERIC, Compare, Node, Rule, Top, columns, leaves, parse_rule
from reinforge.pipelines.filters.scores import REPORT, SCORES
from reinforge.pipelines.storage import filesystem, read_text, write_bytes
from reinforge.schemas.subset import first_occurrence, make_subset, uid_hex, uid_order, write_subset

FORMAT = "reinforge.filter_decision/1"
SAMPLE = 10
_SOURCES = {"clip_b32": "clip_b32_similarity_score", "clip_l14": "clip_l14_similarity_score",
            "short_side": "original_width/original_height", "aspect": "original_width/original_height"}


def load_scores(scores_dir: str, names: list[str]) -> tuple[dict, dict]:
    """(columns by name, the score report); `lang` comes back as (codes, dictionary), the rest float64."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    scores_dir = scores_dir.rstrip("/")
    fs, path = filesystem(f"{scores_dir}/{SCORES}")
    if not fs.exists(path):
        raise FilterError(f"{scores_dir}: no {SCORES} (run `reinforge filter score` first)")
    report = json.loads(read_text(f"{scores_dir}/{REPORT}"))
    with fs.open(path, "rb") as f:
        available = pq.ParquetFile(f).schema_arrow.names
        missing = [n for n in names if n not in available]
        if missing:
            hint = (" (score with --clusters K --cluster-targets ...)" if any(n.startswith("cluster") for n in missing)
                    else " (score with --cld3)" if "lang_cld3" in missing else "")
            raise FilterError(f"{scores_dir}: the scores have no column {', '.join(missing)}{hint}")
        table = pq.read_table(f, columns=["uid_hi", "uid_lo"] + names)
    data = {"uid_hi": table.column("uid_hi").to_numpy(), "uid_lo": table.column("uid_lo").to_numpy()}
    for name in names:
        col = table.column(name)
        if name in NUMERIC:
            data[name] = col.cast(pa.float64()).fill_null(np.nan).to_numpy()
        else:  # dictionary-encoded strings: compare codes, not millions of Python strings
            col = col.unify_dictionaries().combine_chunks()
            data[name] = (col.indices.fill_null(-1).to_numpy(), col.dictionary.to_pylist())
    return data, report


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class _Evaluator:
    """Three-valued evaluation over the unique rows (uid order): each atom gives (true, false) masks."""

    def __init__(self, data: dict, rows: np.ndarray, semantics: str = "datacomp"):
        self.data, self.rows, self.semantics = data, rows, semantics
        self.hi, self.lo = data["uid_hi"][rows], data["uid_lo"][rows]
        self.atoms: dict = {}  # atom -> (true, false, details)

    def atom(self, a) -> tuple[np.ndarray, np.ndarray]:
        if a not in self.atoms:
            if isinstance(a, Top):
                self.atoms[a] = self._top_datacomp(a) if self.semantics == "datacomp" else self._top(a)
            else:
                self.atoms[a] = self._compare(a)
        true, false, _ = self.atoms[a]
        return true, false

    def _compare(self, a: Compare):
        if a.column in NUMERIC:
            v = self.data[a.column][self.rows]
            valid = np.isfinite(v)
            # stored scores are float32; DataComp (pandas) compares them to the constant in float32
            value = float(np.float32(a.value)) if self.semantics == "datacomp" else a.value
            a = Compare(a.column, a.op, value)
            with np.errstate(invalid="ignore"):
                hit = {">=": v >= a.value, ">": v > a.value, "<=": v <= a.value, "<": v < a.value,
                       "==": v == a.value, "!=": v != a.value}[a.op]
        else:
            codes, dictionary = self.data[a.column]
            codes = codes[self.rows]
            valid = codes >= 0
            code = dictionary.index(a.value) if a.value in dictionary else -2
            hit = (codes == code) if a.op == "==" else (codes != code)
        return hit & valid, ~hit & valid, {}

    def _top(self, a: Top):
        v = self.data[a.column][self.rows]
        valid = np.flatnonzero(np.isfinite(v))
        keep = _round_half_up(a.fraction * len(valid))
        order = valid[np.lexsort((self.lo[valid], self.hi[valid], -v[valid]))]
        true = np.zeros(len(v), bool)
        true[order[:keep]] = True
        false = np.isfinite(v) & ~true
        details = {"valid": len(valid), "keep": keep}
        if keep:
            threshold = float(v[order[keep - 1]])
            details.update(threshold=threshold, tied_not_kept=int((v[order[keep:]] == threshold).sum()))
        return true, false, details

    def _top_datacomp(self, a: Top):
        everything = self.data[a.column]  # every scored row, as DataComp ranks the whole metadata frame
        n = len(everything)
        position = int(n * a.fraction)
        if not 0 <= position < n:
            raise FilterError(f"{a}: DataComp's threshold is the score at sorted position int(f*n) = {position}, "
                              f"outside the {n} scored rows (use --semantics exact)")
        ordered = -np.sort(-everything)  # descending; NaN sorts last, as in DataComp
        threshold = ordered[position]
        v = self.data[a.column][self.rows]
        with np.errstate(invalid="ignore"):
            true = v >= threshold
        false = np.isfinite(v) & ~true
        details = {"valid": int(np.isfinite(v).sum()), "keep": int(true.sum()), "position": position,
                   "ranked_rows": n, "threshold": float(threshold)}
        return true, false, details

    def evaluate(self, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(rule, Node):
            return self.atom(rule)
        if rule.op == "not":
            true, false = self.evaluate(rule.parts[0])
            return false, true
        results = [self.evaluate(p) for p in rule.parts]
        trues, falses = [r[0] for r in results], [r[1] for r in results]
        if rule.op == "and":
            return np.logical_and.reduce(trues), np.logical_or.reduce(falses)
        return np.logical_or.reduce(trues), np.logical_and.reduce(falses)

    def atom_report(self) -> list[dict]:
        out = []
        for a, (true, false, details) in self.atoms.items():
            out.append({"atom": str(a), "pass": int(true.sum()), "fail": int(false.sum()),
                        "invalid": int(len(true) - true.sum() - false.sum()), **details})
        return out


def _check_valid(rule: Rule, data: dict, rows: np.ndarray, scores_dir: str) -> None:
    for name in columns(rule):
        values = data[name]
        valid = np.isfinite(values[rows]).any() if name in NUMERIC else (values[0][rows] >= 0).any()
        if not valid:
            source = _SOURCES.get(name, name)
            raise FilterError(f"{scores_dir}: the rule uses {name}, but no scored row has a valid value "
                              f"(check the metadata column {source} and score_report.json)")


def decide(scores_dir: str, rule_text: str, out: str, report_path: Optional[str] = None,
           semantics: str = "datacomp") -> dict:
    """Apply `rule_text` to the scores; write the subset file `out` and its report; return the report."""
    rule = parse_rule(rule_text, semantics)
    data, score_report = load_scores(scores_dir, columns(rule))
    hi, lo = data["uid_hi"], data["uid_lo"]
    if not len(hi):
        raise FilterError(f"{scores_dir}: no scored rows ({score_report.get('rows', 0)} metadata rows, "
                          f"{score_report.get('malformed_uids', {}).get('rows', 0)} with malformed uids)")
    order = uid_order(hi, lo)
    first = first_occurrence(hi[order], lo[order])
    rows, repeats = order[first], order[~first]
    _check_valid(rule, data, rows, scores_dir)
    evaluator = _Evaluator(data, rows, semantics)
    for a in leaves(rule):  # the report lists atoms in rule order
        evaluator.atom(a)
    kept, _ = evaluator.evaluate(rule)
    uids = make_subset(hi[rows][kept], lo[rows][kept])
    malformed = score_report["malformed_uids"]["rows"]
    report = {"format": FORMAT, "scores": scores_dir, "rule": rule_text, "parsed": str(rule), "semantics": semantics,
              "rows_in": score_report["rows"], "malformed_uids": malformed,
              "duplicate_uids": {"rows": len(repeats), "sample": [uid_hex(hi[r], lo[r]) for r in repeats[:SAMPLE]]},
              "unique": len(rows), "kept": len(uids), "dropped": len(rows) - len(uids),
              "atoms": evaluator.atom_report(),
              "output": out}
    if report["rows_in"] != malformed + len(repeats) + report["kept"] + report["dropped"]:
        raise AssertionError(f"filter accounting is off: {report}")
    write_subset(out, uids)
    write_bytes(report_path or default_report_path(out), json.dumps(report, indent=1, sort_keys=True).encode())
    return report


def default_report_path(out: str) -> str:
    return (out[:-4] if out.endswith(".npy") else out) + ".report.json"
