"""Print, per DataComp baseline, the uids DataComp's code kept and reinforge's `datacomp` semantics keep on
a folder written by make_datacomp_filters_golden.py (the committed one, or a larger run with --out):

    python tests/golden/compare_datacomp_filters.py [FOLDER] [--semantics datacomp|exact] [--kmeans datacomp|spherical]

Columns: DataComp kept, reinforge kept, only DataComp, only reinforge. Not a test (tests/test_filters.py
asserts the committed folder); a measuring aid for larger generated pools.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from test_filters import GOLDEN_RULES  # noqa: E402  (golden file -> reinforge rule)

from reinforge.curation.filters.decide import decide  # noqa: E402
from reinforge.curation.filters.scores import ScoreOptions, score_metadata  # noqa: E402


def uids(path: str) -> set:
    a = np.load(path)
    return set(zip(a["f0"].tolist(), a["f1"].tolist()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", default=os.path.join(HERE, "datacomp_filters"))
    parser.add_argument("--semantics", default="datacomp")
    parser.add_argument("--kmeans", default="datacomp")
    args = parser.parse_args()
    info = json.load(open(os.path.join(args.folder, "golden.json")))
    with tempfile.TemporaryDirectory() as tmp:
        scores = os.path.join(tmp, "scores")
        score_metadata([os.path.join(args.folder, "metadata")], scores,
                       ScoreOptions(clusters=info["k"], cluster_targets=os.path.join(args.folder, "targets.npy"),
                                    seed=info["seed"], cld3=True, kmeans=args.kmeans))
        print(f"{info['rows']:,} rows, k={info['k']}, semantics {args.semantics}, kmeans {args.kmeans}; "
              f"DataComp's assignment margins {info['min_assignment_margin']}")
        print(f"{'baseline':<44}{'DataComp':>10}{'reinforge':>10}{'only DC':>9}{'only rf':>9}")
        for name, rule in GOLDEN_RULES.items():
            decide(scores, rule, os.path.join(tmp, "x.npy"), semantics=args.semantics)
            got, want = uids(os.path.join(tmp, "x.npy")), uids(os.path.join(args.folder, f"{name}.npy"))
            print(f"{name:<44}{len(want):>10,}{len(got):>10,}{len(want - got):>9,}{len(got - want):>9,}")


if __name__ == "__main__":
    main()
