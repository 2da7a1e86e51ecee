"""MobileCLIP / DataCompDR pipeline benchmark: prints ratios measured in one run (never asserted in tests).

1. efficiency: reinforced samples/s of the whole mobileclip_dr pipeline (local Ray, one actor) / bare
   samples/s of the same captioner + teachers doing the same model work (the stages' own generation and
   embedding calls on ready inputs: no decoding, augmenting, preprocessing, encoding or writing), same
   batch sizes, threads, N and S, in the same process. The bare rate is measured before and after the
   pipeline and averaged, since the CPU is shared.
2. storage: bytes per sample at N=30, S=5, two 768-d teachers, legacy layout, from real written shards:
   fp16 npz and bf16 pth.gz vs DataCompDR's bf16 (~110 KB), and each one's max abs error vs float32.

Models are open_clip configs with seeded random weights in local-dir: folders (nothing is downloaded);
the bare measurement loads the very same folders, so the captioner draws the very same tokens.

Run: ../shared/tools/offline .venv/bin/python bench/mobileclip_dr.py   (7 min; --quick 3 min: measured on the shared 2-core CPU)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import TINY_CLIP, jpeg_bytes, photo, tiny_open_clip, write_open_clip_dir, write_shard  # noqa: E402  real photos, tiny models

from reinforge.runtime.ray_session import start_local_ray  # noqa: E402
from reinforge.ops.rundir import merged_stats  # noqa: E402
from reinforge.runtime.runner import run_recipe  # noqa: E402
from reinforge.products.registry import parse_recipe  # noqa: E402

AUGMENTATION = {"random_resized_crop": {"size": 224, "interpolation": "bicubic"}, "rand_augment": {"p": 1.0}}
# a ViT-S-32 image tower with a small text decoder: a CoCa that captions in seconds on 2 cores
SMALL_COCA = {"embed_dim": 256,
              "vision_cfg": {"image_size": 224, "layers": 12, "width": 384, "patch_size": 32, "head_width": 64,
                             "attentional_pool": True, "attn_pooler_heads": 4, "output_tokens": True},
              "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4,
                           "embed_cls": True, "output_tokens": True},
              "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4,
                                 "attn_pooler_heads": 4},
              "custom_text": True}
DATACOMPDR_BF16 = (30 + 1 + 5) * 1536 * 2  # N=30 image rows + GT + 5 synthetic text rows, D=2x768, bf16


def open_clip_dir(work: str, name: str, cfg: dict, seed: int) -> str:
    """A local-dir: open_clip model folder (config + seeded random weights) every Ray worker loads identically."""
    return write_open_clip_dir(f"{work}/models/{name}", cfg, seed)


def open_clip_get(name: str) -> dict:
    import open_clip
    return copy.deepcopy(open_clip.get_model_config(name))


def make_inputs(folder: str, shards: int, per_shard: int, size: int) -> str:
    """DataComp-style shards of real photos: jpg + txt + json uid."""
    os.makedirs(folder, exist_ok=True)
    captions = ["a cat on a sofa", "a cup of coffee on a table", "an astronaut in a white suit",
                "a rocket on the launch pad", "cells under a microscope", "galaxies in deep space"]
    i = 0
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            samples.append((f"{i:09d}", {"jpg": jpeg_bytes(photo(i, size)), "txt": captions[i % 6].encode(),
                                         "json": json.dumps({"uid": uuid.UUID(int=7 + i).hex}).encode()}))
            i += 1
        write_shard(f"{folder}/{s:08d}.tar", samples)
    return f"{folder}/*.tar"


def recipe(inputs: str, output: str, captioner: str, teachers: list[str], n: int, s: int, args, **changes) -> dict:
    r = {"product": "mobileclip_dr", "output": output, "seed": 0, "input": {"format": "webdataset", "path": inputs},
         "augmentation": {"num_samples": n, "samples_per_batch": 8, "image_augmentation": AUGMENTATION},
         "captioners": [{"model": captioner, "num_captions": s, "batch_size": 8}],
         "teachers": [{"model": t, "batch_size": args.batch_size} for t in teachers],
         "resources": {"num_actors": 1, "cpus_per_actor": args.threads, "object_store_memory_mb": 512}}
    r.update(changes)
    return r


def bare_samples_per_second(r, inputs: str, threads: int) -> float:
    """The captioner's generation and the teachers' embedding, on inputs prepared outside the clock."""
    from reinforge.runtime.pipeline import build_pipeline
    from reinforge.formats.sources import WebDatasetSource
    from reinforge.stages.base import Batch
    from reinforge.stages.captioner import CocaCaptioner
    from reinforge.stages.clip_teachers import ClipTeacherEnsemble
    torch.set_num_threads(threads)
    captioner, ensemble = CocaCaptioner(r.captioners[0], r.seed), ClipTeacherEnsemble(r.teachers)
    captioner.setup()
    ensemble.setup()
    prep = [s for s in build_pipeline(r).build_stages() if not s.is_model and s.name != "encode"]
    samples = [m for task in WebDatasetSource(inputs).tasks() for m in WebDatasetSource(inputs).read(task)]
    batches = []
    for start in range(0, len(samples), r.augmentation.samples_per_batch):
        batch = Batch(samples[start:start + r.augmentation.samples_per_batch])
        for stage in prep:  # decode, uid, caption, augment: the views the teachers embed
            batch = stage(batch)
        for sample in batch.samples:
            sample["_caption_input"] = captioner._prepare(sample)
        batches.append(batch.samples)
    done, seconds = 0, 0.0
    with torch.inference_mode():
        for batch in batches:
            started = time.perf_counter()
            for sample, captions in zip(batch, captioner._caption(batch)):
                sample["syn"] = {r.captioners[0].syn_key: captions}
            ensemble._embed(batch)
            seconds += time.perf_counter() - started
            done += len(batch)
    return done / seconds


def efficiency(work: str, args) -> None:
    import ray
    n, s, count = (10, 2, 4) if args.quick else (30, 5, 8)
    inputs = make_inputs(f"{work}/eff-in", 1, count, 256)
    teachers = [open_clip_dir(work, f"vit-s-32-{i}", open_clip_get("ViT-S-32"), seed=i) for i in (1, 2)]
    captioner = open_clip_dir(work, "coca-small", SMALL_COCA, seed=3)
    r = parse_recipe(recipe(inputs, f"{work}/eff-run", captioner, teachers, n, s, args))
    before = bare_samples_per_second(r, inputs, args.threads)
    start_local_ray(num_cpus=args.threads, object_store_memory_mb=512)
    summary = run_recipe(r, progress=False)
    ray.shutdown()  # free the cores before timing the bare models again
    after = bare_samples_per_second(r, inputs, args.threads)
    bare = (before + after) / 2
    pipeline = summary.samples / summary.seconds
    print(f"[efficiency] teachers 2x ViT-S-32 (random init, 224 px, D=2x384), captioner CoCa with a ViT-S-32 "
          f"image tower + 4-layer 256-wide text decoder (top-p, max_length 30); RRC 224 + RandAugment; "
          f"N={n}, S={s}, samples_per_batch 8, teacher batch {args.batch_size}, captioner batch 8, "
          f"{args.threads} threads, {summary.samples} samples")
    print(f"  pipeline {pipeline:.3f} samples/s (decode+caption+augment+teachers+encode+write, on Ray) / "
          f"bare {bare:.3f} samples/s (before {before:.3f}, after {after:.3f}) = {pipeline / bare:.2f}   "
          f"(goal >= 0.85)")
    stages, _ = merged_stats(f"{work}/eff-run")
    total = sum(st.seconds for st in stages.values())
    print("  time share by stage: " + ", ".join(f"{k} {v.seconds / total:.0%}" for k, v in stages.items()))


def rows(sample) -> np.ndarray:
    """Every stored embedding row of a decoded sample: image, ground-truth text, synthetic captions."""
    return np.concatenate([sample.image_emb, sample.text_emb, *sample.syn_emb.values()])


def storage(work: str, args) -> None:
    """Bytes per sample from real shards; fp16 / bf16 error vs a float32 run of the same models and seed."""
    import ray
    from reinforge.formats.datacomp_dr import decode_dr_sample
    from reinforge.formats.wds import iter_samples
    count = 3 if args.quick else 6
    inputs = make_inputs(f"{work}/sto-in", 1, count, 320)
    wide = copy.deepcopy(TINY_CLIP)
    wide["embed_dim"] = 768  # bytes depend on shapes and entropy, not on how good the towers are
    teachers = [open_clip_dir(work, f"tiny-768-{i}", wide, seed=10 + i) for i in (1, 2)]
    captioner = tiny_open_clip("coca")
    runs = {"fp16 npz": {"format": "npz", "dtype": "float16"}, "bf16 pth.gz": {"format": "pth.gz", "dtype": "bfloat16"},
            "fp32 npz": {"format": "npz", "dtype": "float32"}}
    start_local_ray(num_cpus=args.threads, object_store_memory_mb=512)
    samples = {}
    for name, store in runs.items():
        out = f"{work}/sto-{store['dtype']}"
        summary = run_recipe(parse_recipe(recipe(inputs, out, captioner, teachers, 30, 5, args,
                                                 storage={**store, "layout": "legacy"})), progress=False)
        assert summary.ok and summary.samples == count, summary
        shard = f"{out}/shards/00000000.tar"
        with open(shard, "rb") as f:
            samples[name] = list(iter_samples(f))
        samples[name + " size"] = os.path.getsize(shard)
    ray.shutdown()
    reference = [decode_dr_sample(m) for m in samples["fp32 npz"]]
    print(f"[storage] N=30 (RRC 224 + RandAugment), S=5, two 768-d teachers (random init), legacy layout, "
          f"{count} samples; DataCompDR bf16 embeddings: {DATACOMPDR_BF16 / 1e3:.1f} KB/sample")
    for name in ("fp16 npz", "bf16 pth.gz", "fp32 npz"):
        members = samples[name]
        emb = np.mean([len(m.get("npz", m.get("pth.gz", b""))) for m in members])
        rest = np.mean([len(m["paug.json"]) + len(m["syn.json"]) + len(m["json"]) for m in members])
        media = sum(len(m["jpg"]) + len(m["txt"]) for m in members)
        whole = (samples[name + " size"] - media) / len(members)
        error = max(float(np.abs(rows(decode_dr_sample(m)) - rows(ref)).max()) for m, ref in zip(members, reference))
        print(f"  {name:<12} embeddings {emb / 1e3:6.1f} KB ({emb / DATACOMPDR_BF16:.2f}x DataCompDR bf16), "
              f"paug+syn+json {rest / 1e3:.2f} KB, whole sample without jpg/txt {whole / 1e3:6.1f} KB "
              f"({whole / DATACOMPDR_BF16:.2f}x); max abs error vs float32 {error:.2e}")
    print("  note: random-init embeddings look like noise to a compressor; real teacher embeddings may "
          "compress somewhat differently")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["efficiency", "storage"])
    parser.add_argument("--quick", action="store_true", help="efficiency at N=10, S=2 on 4 samples, storage on 3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="teacher batch size")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="reinforge-bench-")
    started = time.perf_counter()
    try:
        for name, fn in (("efficiency", efficiency), ("storage", storage)):
            if args.only in (None, name):
                section = time.perf_counter()
                fn(work, args)
                print(f"  ({name}: {time.perf_counter() - section:.0f} s)")
    finally:
        print(f"(bench wall time {time.perf_counter() - started:.0f} s; the CPU is shared, so rates are noisy)")
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
