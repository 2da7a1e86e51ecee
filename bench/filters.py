"""DataComp filters benchmark: prints rates and ratios (never asserted in tests).

1. score pass: rows/s of `score_metadata` on a generated DataComp-like metadata table (default 1M rows,
   10 row groups, captions of 3-14 words in English and four other languages, sizes, CLIP scores) with
   paired npz image embeddings and the image-based clustering on (k-means k=256 on a 64-dim pool;
   `--kmeans datacomp`, the default, trains on every caption-filtered row as DataComp did, `spherical` on
   a 256-per-centroid sample). Also the share of it spent in the per-caption Python (language id + synset
   lookup), the cost floor, and what `--cld3` (CLD3 for the laion2b baseline) would add to it.
   Then the same pass cut into `--units` units of whole row groups, scored as Ray tasks on an embedded
   local Ray (all this machine's cores): wall rows/s ÷ the one-process pass, Ray start-up included,
   and whether scores.parquet is the same bytes.
2. `--training-pass` (alone): the pass before scoring that picks the k-means training set (the caption
   filter's per-row language id + fastText word count, then the sample), timed with one unit in this
   process vs `--units` units as Ray tasks on an embedded local Ray (start-up timed apart): wall ratio,
   CPU seconds of this process and every process below it (Ray's raylet, GCS and workers), and whether
   the training sets are the same bytes.
3. decision pass: seconds of `decide` for `basic & top(clip_l14, 0.3)` and for `image | clip_b32>=0.3`,
   as a fraction of the score pass (CPU time): "scores are stats, decisions are cheap second passes".

Run: ../shared/tools/offline .venv/bin/python bench/filters.py [--rows 1000000] [--dim 64] [--clusters 256]
     [--kmeans datacomp|spherical] [--units 10] [--training-pass]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from pool_gen import random_uids  # noqa: E402

from reinforge.curation.filters.scores import ScoreOptions, score_metadata  # noqa: E402
from reinforge.curation.filters.text import caption_stats, cld3_languages  # noqa: E402
from reinforge.curation.filters.decide import decide  # noqa: E402

WORDS = {
    "en": "a the photo of dog cat on beach with my new car house garden at sunset in city street old man woman "
          "red blue wooden table kitchen modern design for sale vintage poster summer dress girl boy".split(),
    "de": "ein der die das hund katze am strand mit meinem neuen auto haus garten bei sonnenuntergang".split(),
    "es": "el la un una perro gato en playa con mi nuevo coche casa jardín al atardecer ciudad calle".split(),
    "fr": "le la un une chien chat sur plage avec ma nouvelle voiture maison jardin au coucher de soleil".split(),
    "it": "il la un una cane gatto sulla spiaggia con la mia nuova macchina casa giardino al tramonto".split(),
}


def captions(n: int, rng: np.random.Generator) -> list[str]:
    langs = rng.choice(list(WORDS), size=n, p=[0.6, 0.1, 0.1, 0.1, 0.1])
    lengths = rng.integers(3, 15, size=n)
    picks = rng.integers(0, 1 << 30, size=(n, 14))
    return [" ".join(WORDS[lang][p % len(WORDS[lang])] for p in picks[i, :lengths[i]])
            for i, lang in enumerate(langs.tolist())]


def metadata(rows: int, rng: np.random.Generator) -> pa.Table:
    """DataComp-like metadata: the columns the score pass reads (uid, text, sizes, CLIP scores)."""
    uids, _, _ = random_uids(rows, rng)
    return pa.table({"uid": uids, "text": pa.array(captions(rows, rng), pa.string()),
                     "original_width": rng.integers(64, 2048, rows), "original_height": rng.integers(64, 2048, rows),
                     "clip_b32_similarity_score": rng.random(rows, np.float32) * 0.45,
                     "clip_l14_similarity_score": rng.random(rows, np.float32) * 0.5})


def generate(folder: str, rows: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    table = metadata(rows, rng)
    pq.write_table(table, os.path.join(folder, "00000000.parquet"), row_group_size=max(1, rows // 10))
    centers = rng.normal(size=(512, dim)).astype(np.float32)
    emb = centers[rng.integers(512, size=rows)] + 0.5 * rng.normal(size=(rows, dim)).astype(np.float32)
    np.savez(os.path.join(folder, "00000000.npz"), l14_img=emb.astype(np.float16))
    np.save(os.path.join(folder, "targets.npy"), centers[:100] + 0.5 * rng.normal(size=(100, dim)).astype(np.float32))


def tree_cpu_s() -> float:
    """CPU seconds (user + system) so far of this process and every live process below it."""
    parent, ticks = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(pid)], ticks[int(pid)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(p for p, pp in parent.items() if pp == pid and p not in tree)
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def bench_training_pass(tmp: str, args) -> None:
    """The k-means training-set pass of `filter score --clusters`: one unit inline vs units as Ray tasks."""
    from reinforge.curation.filters.cluster_pass import training_sample
    from reinforge.curation.filters.metadata import plan_units
    from reinforge.runtime.ray_session import ray_session
    files, emb = [os.path.join(tmp, "00000000.parquet")], [os.path.join(tmp, "00000000.npz")]
    options = ScoreOptions(clusters=args.clusters, cluster_targets=os.path.join(tmp, "targets.npy"), kmeans=args.kmeans)
    one, _ = plan_units(files, emb, True, args.rows)
    units, _ = plan_units(files, emb, True, -(-args.rows // args.units))
    started, cpu = time.perf_counter(), tree_cpu_s()
    inline, _, left_out, how = training_sample(one, options, False)
    one_s, one_cpu = time.perf_counter() - started, tree_cpu_s() - cpu
    print(f"[training pass] {args.kmeans}: {len(inline):,} training rows of {args.rows:,} ({how}); "
          f"{left_out:,} left out")
    print(f"[training pass] 1 unit in this process: {one_s:.1f} s wall, {one_cpu:.1f} CPU s")
    started = time.perf_counter()
    with ray_session():
        start_s = time.perf_counter() - started
        started, cpu = time.perf_counter(), tree_cpu_s()
        tasks, _, tasks_left_out, _ = training_sample(units, options, True)
        ray_s, ray_cpu = time.perf_counter() - started, tree_cpu_s() - cpu
    same = inline.tobytes() == tasks.tobytes() and left_out == tasks_left_out
    print(f"[training pass] {len(units)} units as Ray tasks on {os.cpu_count()} cores: {ray_s:.1f} s wall "
          f"(+ {start_s:.1f} s Ray start-up), {ray_cpu:.1f} CPU s (driver + Ray processes) = "
          f"{one_s / ray_s:.2f}x one unit's wall ({one_s / (ray_s + start_s):.2f}x with start-up); "
          f"load {os.getloadavg()[0]:.1f}; same training set: {same}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=256, help="0: no image-based clustering")
    parser.add_argument("--kmeans", choices=["datacomp", "spherical"], default="datacomp")
    parser.add_argument("--units", type=int, default=10, help="units (Ray tasks) of the parallel score pass; 0: skip")
    parser.add_argument("--training-pass", action="store_true",
                        help="only the k-means training-set pass: one unit vs --units Ray tasks")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="reinforge-bench-filters-")
    try:
        started = time.perf_counter()
        generate(tmp, args.rows, args.dim)
        print(f"generated {args.rows:,} rows + {args.dim}-dim npz in {time.perf_counter() - started:.1f} s")
        if args.training_pass:
            bench_training_pass(tmp, args)
            return
        scores = os.path.join(tmp, "scores")
        started, cpu = time.perf_counter(), time.process_time()
        report = score_metadata([os.path.join(tmp, "00000000.parquet")], scores,
                                ScoreOptions(clusters=args.clusters, cluster_targets=os.path.join(tmp, "targets.npy"),
                                             kmeans=args.kmeans))
        score_s, score_cpu = time.perf_counter() - started, time.process_time() - cpu
        clusters = (f"{args.kmeans} k-means k={args.clusters} on {report['clusters']['train_rows']:,} rows, dim "
                    f"{args.dim}" if args.clusters else "no clustering")
        print(f"[score] {report['rows']:,} rows in {score_s:.1f} s = {report['rows'] / score_s:,.0f} rows/s wall, "
              f"{report['rows'] / score_cpu:,.0f} rows per CPU-second ({clusters}; english "
              f"{report['language']['english']:,})")
        if args.units:
            parallel = os.path.join(tmp, "scores_parallel")
            options = ScoreOptions(clusters=args.clusters, cluster_targets=os.path.join(tmp, "targets.npy"),
                                   kmeans=args.kmeans)
            started = time.perf_counter()
            score_metadata([os.path.join(tmp, "00000000.parquet")], parallel, options,
                           unit_rows=-(-args.rows // args.units))
            parallel_s = time.perf_counter() - started
            same = all(open(os.path.join(scores, n), "rb").read() == open(os.path.join(parallel, n), "rb").read()
                       for n in ("scores.parquet", "score_report.json"))
            print(f"[score] {args.units} units as Ray tasks on {os.cpu_count()} cores (Ray start-up included): "
                  f"{report['rows'] / parallel_s:,.0f} rows/s wall = {score_s / parallel_s:.2f}x one process "
                  f"(load {os.getloadavg()[0]:.1f}); same bytes: {same}")
        # CPU time, not wall: the machine is shared, and the ratio should not depend on the neighbours
        texts = pq.read_table(os.path.join(tmp, "00000000.parquet"), columns=["text"]).slice(0, 100_000)
        cpu = time.process_time()
        caption_stats(texts.column("text").to_pylist())
        per_caption = (time.process_time() - cpu) / texts.num_rows
        print(f"[score] per-caption Python (language id + synsets): {1 / per_caption:,.0f} captions per CPU-second "
              f"= {per_caption * report['rows'] / score_cpu:.2f} of the score pass's CPU time")
        cpu = time.process_time()
        cld3_languages(texts.column("text").to_pylist())
        per_cld3 = (time.process_time() - cpu) / texts.num_rows
        print(f"[score] --cld3: {1 / per_cld3:,.0f} captions per CPU-second; it would add "
              f"{per_cld3 * report['rows'] / score_cpu:.2f} of this score pass's CPU time")
        for rule in ("basic & top(clip_l14, 0.3)",) + (("image | clip_b32>=0.3",) if args.clusters else ()):
            started, cpu = time.perf_counter(), time.process_time()
            r = decide(scores, rule, os.path.join(tmp, "subset.npy"))
            decide_s, decide_cpu = time.perf_counter() - started, time.process_time() - cpu
            print(f"[decide] {rule!r}: kept {r['kept']:,} of {r['unique']:,} in {decide_s:.2f} s = "
                  f"{r['unique'] / decide_s:,.0f} rows/s; decision / score CPU time = {decide_cpu / score_cpu:.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
