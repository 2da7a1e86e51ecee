"""What DataComp's train.py makes of a reinforge reshard folder: run its get_input_shards once, save the result.

train.py's folder handling (get_input_shards, with split_filename / prepare_filename / path_or_cloudpath) is
compiled from a DataComp checkout and run on a small reshard run made by tests/test_reshard_datacomp.py's
`train_golden_run` (the test rebuilds the same run). Paths are saved relative to the run folder ("RUN").

    PYTHONPATH=.:tests python tests/golden/make_datacomp_train_golden.py --datacomp PATH/datacomp \\
        --out tests/golden/datacomp_train_shards.json

CI cannot fetch the checkout: the committed JSON is the evidence. No DataComp code is copied here.
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import re
import tempfile
from pathlib import Path


def get_input_shards(datacomp: str):
    tree = ast.parse(open(f"{datacomp}/train.py").read())
    wanted = ("prepare_filename", "split_filename", "get_input_shards", "path_or_cloudpath")
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    namespace = {"collections": collections, "re": re, "json": json, "Path": Path, "CloudPath": None}
    exec(compile(ast.Module(nodes, []), f"{datacomp}/train.py", "exec"), namespace)
    return namespace["get_input_shards"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datacomp", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from test_reshard_datacomp import train_golden_run
    fn = get_input_shards(args.datacomp)
    with tempfile.TemporaryDirectory() as tmp:
        run = train_golden_run(Path(tmp))
        result = {}
        for data_dir in (run, f"{run}/shards"):
            data_str, weights = fn(Path(data_dir), None)
            result[data_dir.replace(run, "RUN")] = data_str.replace(run, "RUN")
    json.dump({"get_input_shards": result, "datacomp_train_py": "train.py of mlfoundations/datacomp"},
              open(args.out, "w"), indent=1)
    print(result)


if __name__ == "__main__":
    main()
