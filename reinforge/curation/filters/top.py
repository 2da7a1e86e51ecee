"""top(col, f) of `filter apply` resolved to a row-local test: a threshold (and, in exact semantics, the last
tied uid kept), found by radix selections (radix.py) whose passes are tasks over the scores' units: each unit's
65536-bin histogram of the keys still in play, summed by the driver, and at most radix.SMALL keys gathered at
the end. Semantics are decide.py's."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from reinforge.curation.filters.clusters import FilterError
from reinforge.curation.filters.radix import (Selected, bin_histogram, concatenate_keys, in_bin, key_value, order_keys,
                                              select, sum_histograms)
from reinforge.curation.filters.rules import Top
from reinforge.curation.filters.score_units import Passes, RepeatedRows, Unit

_MAX_U64 = np.uint64(2**64 - 1)


@dataclass(frozen=True)
class KeySpec:
    """The keys a selection reads from a unit: order keys of a column's values (every non-NaN row's, or the
    finite values of unique rows), or a uid half of the unique rows tied at `tied` (with high half `hi`)."""
    column: str
    stored: str  # the column's stored dtype
    unique_finite: bool = False
    tied: Optional[float] = None
    half: str = "uid_hi"
    hi: Optional[int] = None

    def names(self) -> list[str]:
        if self.tied is None:
            return [self.column]
        return ["uid_hi", self.column] + (["uid_lo"] if self.half == "uid_lo" else [])

    def keys(self, unit: Unit, repeats: RepeatedRows) -> Iterator[np.ndarray]:
        for start, n, b in unit.batches(self.names()):
            v = b[self.column]
            if self.tied is not None:
                at = repeats.unique(start, n) & (v == self.tied)
                if self.hi is not None:
                    at &= b["uid_hi"] == np.uint64(self.hi)
                yield b[self.half][at]
                continue
            if v.dtype.kind == "f":
                keep = np.isfinite(v) if self.unique_finite else ~np.isnan(v)
            else:
                keep = np.ones(n, bool)
            if self.unique_finite:
                keep &= repeats.unique(start, n)
            # a batch with nulls came as float64, and its other values are of the stored type
            yield order_keys(v[keep].astype(self.stored, copy=False))


def unit_histogram(unit: Unit, repeats: RepeatedRows, spec: KeySpec, key_bits: int, prefix: int,
                   fixed: int) -> np.ndarray:
    return sum_histograms(bin_histogram(keys, key_bits, prefix, fixed) for keys in spec.keys(unit, repeats))


def unit_gather(unit: Unit, repeats: RepeatedRows, spec: KeySpec, key_bits: int, prefix: int,
                fixed: int) -> np.ndarray:
    return concatenate_keys(in_bin(keys, key_bits, prefix, fixed) for keys in spec.keys(unit, repeats))


class UnitKeys:
    """radix.Keys as tasks: each unit's histogram (or keys in the bin), summed (or joined) in unit order."""

    def __init__(self, passes: Passes, spec: KeySpec):
        self.passes, self.spec = passes, spec

    def histogram(self, key_bits: int, prefix: int, fixed: int) -> np.ndarray:
        return sum_histograms(self.passes.per_unit(unit_histogram, (self.spec, key_bits, prefix, fixed)))

    def gather(self, key_bits: int, prefix: int, fixed: int) -> np.ndarray:
        return concatenate_keys(self.passes.per_unit(unit_gather, (self.spec, key_bits, prefix, fixed)))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class ResolvedTop:
    """A top() atom resolved to a row-local test: a threshold (and, in exact semantics, the last tied uid kept),
    found by radix selections over the units. Holds a few numbers, so it travels to the decide tasks."""

    def __init__(self, atom: Top, semantics: str, passes: Passes, stored: np.dtype, rows: int):
        self.atom, self.semantics, self.stored = atom, semantics, stored
        self.details: dict = {}
        self.threshold = math.nan
        self.boundary = None  # exact: (hi, lo) of the last tied row kept
        if semantics == "datacomp":
            self._datacomp(passes, rows)
        else:
            self._exact(passes)

    def _select(self, passes: Passes, rank, unique_finite: bool) -> Selected:
        """The rank(n)-th smallest of the column's n non-NaN values (of every row), or of its finite values
        (of unique rows), as an order key of the stored type."""
        spec = KeySpec(self.atom.column, self.stored.str, unique_finite)
        return select(UnitKeys(passes, spec), rank, 8 * self.stored.itemsize)

    def _datacomp(self, passes: Passes, n: int) -> None:
        # DataComp ranks every scored row (repeats and invalid values included, NaN last) and takes the
        # score at descending position int(f*n)
        a = self.atom
        position = int(n * a.fraction)
        if not 0 <= position < n:
            raise FilterError(f"{a}: DataComp's threshold is the score at sorted position int(f*n) = {position}, "
                              f"outside the {n} scored rows (use --semantics exact)")
        selected = self._select(passes, lambda m: m - 1 - position if position < m else None, unique_finite=False)
        if selected.key is not None:
            self.threshold = float(key_value(selected.key, self.stored))
        self.details = {"position": position, "ranked_rows": n, "threshold": self.threshold}

    def _exact(self, passes: Passes) -> None:
        # the round(f*n) highest unique valid rows, ties broken by uid ascending
        def smallest_kept(valid: int) -> Optional[int]:  # the rank of the keep-th largest
            keep = _round_half_up(self.atom.fraction * valid)
            return valid - keep if keep else None
        selected = self._select(passes, smallest_kept, unique_finite=True)
        valid = selected.count
        keep = _round_half_up(self.atom.fraction * valid)
        self.details = {"valid": valid, "keep": keep}
        if not keep:
            return
        self.threshold = float(key_value(selected.key, self.stored))
        greater, tied = valid - selected.below - selected.equal, selected.equal
        need = keep - greater  # >= 1: the threshold is the keep-th largest
        # the need-th smallest high half among the tied rows, then (a 64-bit collision there) the low half
        column = self.atom.column
        h = select(UnitKeys(passes, KeySpec(column, self.stored.str, tied=self.threshold)), lambda m: need - 1, 64,
                   count=tied)
        lo = _MAX_U64
        if h.equal > 1:
            spec = KeySpec(column, self.stored.str, tied=self.threshold, half="uid_lo", hi=h.key)
            lo = select(UnitKeys(passes, spec), lambda m: need - h.below - 1, 64, count=h.equal).key
        self.boundary = (np.uint64(h.key), np.uint64(lo))
        self.details.update(threshold=self.threshold, tied_not_kept=tied - need)

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
