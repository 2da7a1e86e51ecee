"""Hostile-input memory benchmark: peak RSS on a corpus of compression bombs, lying .npy headers and
escaping keys ÷ peak RSS on the same corpus without them (goal ≤ 1.2), measured in one run.

Measures, each in a process of its own (its peak RSS is the child's ru_maxrss, from os.wait4):
  run               the task executor a Ray worker runs (read -> stages -> shard -> manifest), every task of
                    an ImageNet+ recipe (two small timm teachers, N=4), in one process without Ray, so the
                    figure is the worker's alone. Bomb inputs: a .tar.gz shard with a jpg member inflating
                    2.2 GB from 2.3 MB, escaping keys in the plain shard.
  validate          `validate` of that run's output; bomb corpus: the same shards plus a paug.json.gz and a
                    prob.npz inflating 2.2 GB, a prob.npz 1 GiB, a prob.npz whose header claims 4 TiB,
                    escaping keys.
  reader imagenet+  ReinforcedImageNet over every item of that run (same corpora as validate).
  reader mobileclip MobileCLIPDRDataset over DataCompDR shards (N=30, D=1536, S=5, fp16 npz); bomb corpus:
                    npz inflating 2.2 GB, npz claiming 4 TiB, pth.gz inflating 2.2 GB, a pth.gz whose
                    torch zip declares a 2 GiB record, paug.json nested 100,000 deep, an escaping key.
  inspect           `reinforge inspect` of the DataCompDR shard: a clean sample / the npz bomb's.

Corpora are real photos (tests/conftest.py's photo()); bombs come from tests/hostile_gen.py, built small.
Run: ../shared/tools/offline .venv/bin/python bench/hostile.py
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
BOMB = 2_200 * 2**20  # "a 2.3 MB member expanding to 2.2 GB" (issue #11)
TIB4 = (1 << 40,)
BAD_KEYS = ["../../x", "/abs/x", "a/../../b"]
DR_N, DR_DIMS, DR_S, DR_SAMPLES = 30, (768, 768), 5, 16


# ----------------------------------------------------------------------------------------- corpora

def photos_shards(folder: str, bombs: bool) -> str:
    """A plain tar and a .tar.gz of 16 photos each (jpg + cls); with bombs: escaping keys (and a legal
    sub/dir/name) in the tar, a 2.2 GB jpg bomb in the .tar.gz."""
    from conftest import jpeg_bytes, photo
    from hostile_gen import write_raw_tar, write_tar_gz
    os.makedirs(folder, exist_ok=True)
    keys = [f"a{i}" for i in range(16)] + (BAD_KEYS + ["sub/dir/name"] if bombs else [])
    write_raw_tar(f"{folder}/a.tar", [(f"{k}.{ext}", data) for i, k in enumerate(keys) for ext, data in
                                      (("jpg", jpeg_bytes(photo(i, 96))), ("cls", str(i % 10).encode()))])
    members = [(f"b{i}.{ext}", data) for i in range(16) for ext, data in
               (("jpg", jpeg_bytes(photo(20 + i, 96))), ("cls", str(i % 10).encode()))]
    if bombs:
        members[16:16] = [("bomb.jpg", BOMB), ("bomb.cls", b"3")]
    write_tar_gz(f"{folder}/b.tar.gz", members)
    return f"{folder}/*.tar*"


def bombed_imagenet_run(clean: str, out: str) -> None:
    """A copy of a finished ImageNet+ run whose shard a also holds bombs and escaping keys."""
    from hostile_gen import copies_after, gzip_bomb, npz_bomb, npz_claiming, replace_members, rewrite_shard
    shutil.copytree(clean, out)
    changes = {"a1": {"paug.json.gz": gzip_bomb(BOMB)}, "a3": {"prob.npz": npz_bomb("values", BOMB)},
               "a5": {"prob.npz": npz_bomb("values", 2**30)}, "a7": {"prob.npz": npz_claiming("values", TIB4)}}
    after = {"a0": [BAD_KEYS[0]], "a2": [BAD_KEYS[1]], "a4": [BAD_KEYS[2]]}
    rewrite_shard(out, "a", lambda m: copies_after(replace_members(m, changes), "a0", after))


def datacomp_dr_run(out: str, bombs: bool) -> None:
    """DataCompDR shards as a MobileCLIP run leaves them (keep_images, fp16 npz, legacy layout)."""
    import numpy as np
    from conftest import jpeg_bytes, photo
    from hostile_gen import (copies_after, gzip_bomb, gzip_of, npz_bomb, npz_claiming, replace_members,
                             write_run_shard, zip_of)

    from reinforge.formats.augment import Augmenter
    from reinforge.formats.datacomp_dr import DRSample, StorageSpec, encode_dr_sample
    from reinforge.formats.dr_trainer_config import dr_trainer_config
    from reinforge.formats.image import decode_rgb
    from reinforge.io.manifest import RunLayout
    augmentation = {"random_resized_crop": {"size": 224, "interpolation": "bicubic"}, "rand_augment": {"p": 1.0}}
    augmenter, rng, gen = Augmenter(augmentation), random.Random(0), np.random.default_rng(0)
    members = []
    for i in range(DR_SAMPLES):
        image = jpeg_bytes(photo(i, 256))
        rows = lambda n: gen.standard_normal((n, sum(DR_DIMS))).astype(np.float32)  # noqa: E731
        sample = DRSample(uid=f"{i:032x}", image_ext="jpg", image=image, caption=f"photo {i}", url=None,
                          syn={"syn_text": [f"caption {c}" for c in range(DR_S)]},
                          entries=[augmenter.sample(rng, tuple(decode_rgb(image).shape[-2:])) for _ in range(DR_N)],
                          image_emb=rows(DR_N), text_emb=rows(1), syn_emb={"syn_text": rows(DR_S)})
        encoded = encode_dr_sample(sample, StorageSpec("npz", "float16"))
        members += [(f"{sample.uid}.{ext}", data) for ext, data in encoded.items()]
    if bombs:
        torch_zip = gzip_of([zip_of({"archive/data/0": [2**31]})])  # a torch record declaring 2 GiB
        uid = [f"{i:032x}" for i in range(6)]
        changes = {uid[1]: {"npz": npz_bomb("image_emb", BOMB)}, uid[2]: {"npz": npz_claiming("image_emb", TIB4)},
                   uid[3]: {"npz": None, "pth.gz": gzip_bomb(BOMB)}, uid[4]: {"npz": None, "pth.gz": torch_zip},
                   uid[5]: {"paug.json": b"[" * 100_000}}
        members = copies_after(replace_members(members, changes), uid[0], {uid[0]: [BAD_KEYS[0]]})
    write_run_shard(out, "part-000000", members)
    teachers = [{"model": f"teacher{i}", "dim": d} for i, d in enumerate(DR_DIMS)]
    config = {**dr_trainer_config(augmentation, DR_N, teachers), "captioners": [{"num_captions": DR_S}]}
    with open(RunLayout(out).dr_config, "w") as f:
        json.dump(config, f)


# ----------------------------------------------------------------------------------------- measures (children)

def measure_run(recipe_file: str) -> dict:
    from reinforge.runtime.executor import TaskExecutor
    from reinforge.runtime.pipeline import build_pipeline
    from reinforge.runtime.runner import write_run_record
    from reinforge.products.registry import parse_recipe
    from reinforge.io.manifest import RunLayout
    with open(recipe_file) as f:
        recipe = parse_recipe(json.load(f))
    pipeline, layout = build_pipeline(recipe), RunLayout(recipe.output)
    digest = write_run_record(layout, recipe, force=False)
    pipeline.prepare(layout)
    tasks = pipeline.tasks()
    executor = TaskExecutor(pipeline, layout, digest, recipe.max_error_fraction)
    results = [executor.run(task) for task in tasks]
    return {"samples": sum(r["samples_out"] for r in results), "skipped": sum(r["errors"] for r in results),
            "failed": [r["task"] for r in results if r["status"] != "done"]}


def measure_validate(run: str) -> dict:
    from reinforge.ops.rundir import validate_run
    checked, problems = validate_run(run)
    return {"samples": checked, "problems": sorted({p.split(": ")[2] for p in problems if p.count(": ") >= 2})}


def measure_reader_imagenet(run: str) -> dict:
    from reinforge.readers import ReinforcedImageNet
    ds = ReinforcedImageNet(run)
    items = sum(1 for i in range(len(ds)) if ds[i] is not None)
    return {"items": items, "skipped": ds.skipped}


def measure_reader_mobileclip(run: str) -> dict:
    import open_clip

    from reinforge.readers.mobileclip import MobileCLIPDRDataset
    ds = MobileCLIPDRDataset(run, open_clip.get_tokenizer("ViT-B-32"))
    return {"items": sum(1 for _ in ds), "skipped": ds.skipped}


def measure_inspect(shard_and_key: str) -> dict:
    import contextlib
    import io

    from reinforge.cli.main import cli
    shard, _, key = shard_and_key.partition("#")
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(["inspect", shard, "--key", key], standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
    said = (err.getvalue().strip() or out.getvalue().strip()).splitlines()
    return {"exit": code, "said": said[0][:50] if said else ""}


MEASURES = {"run": measure_run, "validate": measure_validate, "reader imagenet+": measure_reader_imagenet,
            "reader mobileclip": measure_reader_mobileclip, "inspect": measure_inspect}


def child(measure: str, argument: str) -> None:
    print(json.dumps(MEASURES[measure](argument)))


def peak(measure: str, argument: str) -> tuple[float, dict, float]:
    """(peak RSS MiB of the process that ran `measure`, its result, seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", measure, argument],
                            stdout=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage, not RUSAGE_CHILDREN's max over all so far
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{measure} {argument}: exit {proc.returncode}")
    return usage.ru_maxrss / 1024, json.loads(out.decode().strip().splitlines()[-1]), time.perf_counter() - started


# ----------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("MEASURE", "ARGUMENT"), help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from conftest import tiny_recipe
    work = tempfile.mkdtemp(prefix="reinforge-hostile-")
    try:
        cases: dict[str, dict[str, str]] = {}
        for corpus in ("clean", "bomb"):
            recipe = tiny_recipe(photos_shards(f"{work}/{corpus}/inputs", corpus == "bomb"), f"{work}/{corpus}/run")
            with open(f"{work}/{corpus}/recipe.json", "w") as f:
                json.dump(recipe, f)
            datacomp_dr_run(f"{work}/{corpus}/dr", corpus == "bomb")
            shard = f"{work}/{corpus}/dr/shards/part-000000.tar"
            reinforced = f"{work}/{corpus}/reinforced"
            cases[corpus] = {"run": f"{work}/{corpus}/recipe.json", "validate": reinforced,
                             "reader imagenet+": reinforced, "reader mobileclip": f"{work}/{corpus}/dr",
                             "inspect": f"{shard}#{1:032x}"}
        figures: dict[str, dict] = {}
        for measure in MEASURES:
            figures[measure] = {corpus: peak(measure, cases[corpus][measure]) for corpus in ("clean", "bomb")}
            if measure == "run":  # validate and the ImageNet+ reader read the clean run, and a bombed copy of it
                shutil.copytree(f"{work}/clean/run", f"{work}/clean/reinforced")
                bombed_imagenet_run(f"{work}/clean/run", f"{work}/bomb/reinforced")
        print(f"{'measure':<18} {'clean MiB':>10} {'bomb MiB':>10} {'ratio':>6}  bomb corpus result (clean)")
        for measure, pair in figures.items():
            (clean, clean_result, _), (bomb, bomb_result, seconds) = pair["clean"], pair["bomb"]
            print(f"{measure:<18} {clean:>10.0f} {bomb:>10.0f} {bomb / clean:>6.2f}  {json.dumps(bomb_result)} "
                  f"({json.dumps(clean_result)}; bomb run {seconds:.0f} s)")
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
