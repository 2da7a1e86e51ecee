"""DataComp-style filters: the score pass over generated DataComp-like metadata (+ paired npz
embeddings), then every decision checked against a direct numpy computation of the same rule."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from reinforge.curation.filters.clusters import FilterError
from reinforge.curation.filters.scores import ScoreOptions, score_metadata
from reinforge.curation.filters.decide import decide
from reinforge.formats.subset import SUBSET_DTYPE, read_subset

ROWS_PER_FILE, FILES, DIM, CENTERS = 1500, 2, 32, 8
SYNSET_NOUNS = ["dog", "cat", "beach", "piano", "guitar", "castle", "tree", "bicycle"]
EN_WITH_NOUN = ["a photo of the {} during the weekend", "look at this {} again", "what a day for the {}",
                "we went there with the {}"]
EN_PLAIN = ["look at this, so happy about it", "we went there again during the weekend", "what a day it was"]
FOREIGN = ["wir fahren morgen nach hause", "ich liebe dich so sehr", "el perro come en la mañana",
           "nous allons au marché demain"]
MALFORMED = {"not_hex": 2, "wrong_length": 2, "null": 1}  # per file
DUPLICATES = 3  # per file: later rows repeating an earlier uid of the same file


def _uid_strings(rng, n):
    raw = rng.integers(0, 2**64 - 1, size=(n, 2), dtype=np.uint64, endpoint=True)
    return [f"{h:016x}{l:016x}" for h, l in raw.tolist()]


def make_pool(folder, seed: int = 0) -> dict:
    """FILES metadata parquet files (2 row groups each) + paired npz, and a targets .npy; returns the
    raw columns concatenated over files plus the generator's ground truth."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    centers = rng.normal(size=(CENTERS, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = {k: [] for k in ("uid", "text", "width", "height", "b32", "l14", "emb", "has_noun")}
    for f in range(FILES):
        n = ROWS_PER_FILE
        uids = _uid_strings(rng, n)
        bad = rng.choice(np.arange(10, n), sum(MALFORMED.values()) + 2 * DUPLICATES, replace=False)
        bad_kinds = [k for k, c in MALFORMED.items() for _ in range(c)]
        for i, kind in zip(bad, bad_kinds):
            uids[i] = {"not_hex": "z" * 32, "wrong_length": uids[i][:30], "null": None}[kind]
        dup = bad[len(bad_kinds):]
        for later, earlier in zip(dup[:DUPLICATES], sorted(dup[DUPLICATES:])):
            earlier, later = sorted((earlier, later))
            uids[later] = uids[earlier]
        kind = rng.random(n)
        texts, has_noun = [], []
        for i in range(n):
            noun = SYNSET_NOUNS[rng.integers(len(SYNSET_NOUNS))]
            if kind[i] < 0.5:
                texts.append(EN_WITH_NOUN[rng.integers(len(EN_WITH_NOUN))].format(noun + ("s" if i % 7 == 0 else "")))
            elif kind[i] < 0.65:
                texts.append(EN_PLAIN[rng.integers(len(EN_PLAIN))])
            elif kind[i] < 0.8:
                texts.append(FOREIGN[rng.integers(len(FOREIGN))])
            elif kind[i] < 0.9:
                texts.append(["the {}", "{}", "a {} x"][i % 3].format(noun))  # short: 2, 1, 3 words
            elif kind[i] < 0.97:
                texts.append("")
            else:
                texts.append(None)
            has_noun.append(kind[i] < 0.5 or 0.8 <= kind[i] < 0.9)
        width = rng.integers(50, 1500, n).astype(float)
        height = rng.integers(50, 1500, n).astype(float)
        width[:6], height[:6] = [200, 600, 199, 601, 0, 300], [600, 200, 600, 200, 400, 300]  # boundaries
        width[rng.random(n) < 0.01] = np.nan
        b32 = np.round(rng.random(n) * 0.4, 2)  # 41 distinct values: many exact ties
        l14 = np.round(rng.random(n) * 0.5, 3)
        l14[rng.choice(n, 6, replace=False)] = [np.nan, np.inf, -np.inf, np.nan, np.nan, np.inf]
        which = rng.integers(CENTERS, size=n)
        emb = (centers[which] + 0.2 * rng.normal(size=(n, DIM)) / np.sqrt(DIM)).astype(np.float16)
        emb[rng.choice(n, 4, replace=False)] = np.nan
        emb[rng.choice(n, 2, replace=False)] = 0
        table = pa.table({"uid": pa.array(uids, pa.string()), "url": [f"http://x/{i}.jpg" for i in range(n)],
                          "text": pa.array(texts, pa.string()),
                          "original_width": pa.array(width, pa.float64(), mask=np.isnan(width)).cast(pa.int64()),
                          "original_height": pa.array(height.astype(np.int64)),
                          "clip_b32_similarity_score": pa.array(b32, pa.float32()),
                          "clip_l14_similarity_score": pa.array(l14, pa.float32()),
                          "sha256": ["0" * 64] * n})
        pq.write_table(table, os.path.join(folder, f"{f:08d}.parquet"), row_group_size=n // 2 + 1)
        np.savez(os.path.join(folder, f"{f:08d}.npz"), l14_img=emb, b32_img=emb[:, :16])
        for key, value in (("uid", uids), ("text", texts), ("width", width), ("height", height), ("b32", b32),
                           ("l14", l14), ("emb", emb), ("has_noun", has_noun)):
            truth[key].append(np.asarray(value, object if key in ("uid", "text") else None))
    targets = centers[:3].repeat(10, axis=0) + 0.2 * rng.normal(size=(30, DIM)) / np.sqrt(DIM)
    targets = np.concatenate([targets, np.full((2, DIM), np.nan)]).astype(np.float32)
    np.save(os.path.join(folder, "targets.npy"), targets)
    truth = {k: np.concatenate(v) for k, v in truth.items()}
    truth["targets"] = targets
    return truth


# ---------------------------------------------------------------- direct computations (the oracle)

def unique_rows(uids) -> np.ndarray:
    """Row indices of the first occurrence of every well-formed uid, in input order."""
    seen, out = set(), []
    for i, u in enumerate(uids):
        if u is None or len(u) != 32 or any(c not in "0123456789abcdef" for c in u) or u in seen:
            continue
        seen.add(u)
        out.append(i)
    return np.array(out)


def english(texts) -> np.ndarray:
    import py3langid
    return np.array([t is not None and py3langid.classify(t.replace("\n", " "))[0] == "en" for t in texts])


def basic(t) -> np.ndarray:
    words = np.array([len(x.split()) if x is not None else 0 for x in t["text"]])
    chars = np.array([len(x) if x is not None else 0 for x in t["text"]])
    with np.errstate(invalid="ignore", divide="ignore"):
        short = np.minimum(t["width"], t["height"])
        aspect = np.maximum(t["width"], t["height"]) / short
        return english(t["text"]) & (words > 2) & (chars > 5) & (short >= 200) & (aspect <= 3)


def top_fraction(values, uids, rows, fraction) -> set:
    valid = [i for i in rows if np.isfinite(values[i])]
    ranked = sorted(valid, key=lambda i: (-float(np.float32(values[i])), uids[i]))
    return {uids[i] for i in ranked[:int(np.floor(fraction * len(valid) + 0.5))]}


def uid_set(path) -> set:
    arr = np.load(path)
    return {f"{h:016x}{l:016x}" for h, l in zip(arr["f0"].tolist(), arr["f1"].tolist())}


def score_files(folder) -> dict[str, bytes]:
    """Every file `filter score` wrote under `folder`, by relative path."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def scores_table(folder) -> pa.Table:
    """The scores' parts, in the report's order, as one table."""
    report = json.load(open(os.path.join(folder, "score_report.json")))
    return pa.concat_tables(pq.read_table(os.path.join(folder, p["file"])) for p in report["parts"])


def same_scores(a, b) -> bool:
    """The same rows and report, however the units cut the parts (their files and row groups differ)."""
    def report(folder):
        return {k: v for k, v in json.load(open(os.path.join(folder, "score_report.json"))).items() if k != "parts"}

    def rows(folder):  # NaN as a value that equals itself
        return {name: ["NaN" if v != v else v for v in column.to_pylist()]
                for name, column in zip(scores_table(folder).column_names, scores_table(folder).columns)}
    extra = [n for n in ("centroids.npy", "centroid_targets.npy") if os.path.exists(os.path.join(a, n))]
    return (rows(a) == rows(b) and report(a) == report(b)
            and all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in extra))


def pool_options(folder) -> ScoreOptions:
    """Spherical k-means on every usable pool row (train_size), so the test can check the fixed point
    (DataComp's own k-means is checked against DataComp's code in test_datacomp_image_baselines_golden)."""
    return ScoreOptions(clusters=CENTERS, cluster_targets=str(folder / "targets.npy"),
                        train_size=FILES * ROWS_PER_FILE, seed=3, cluster_train="all", kmeans="spherical")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    truth = make_pool(str(folder))
    scores = str(folder / "scores")
    report = score_metadata([str(folder)], scores, pool_options(folder))
    truth["rows"] = unique_rows(truth["uid"])
    return folder, scores, report, truth


def test_score_report_counts_bad_input(pool):
    _, scores, report, truth = pool
    n = FILES * ROWS_PER_FILE
    assert report["rows"] == n
    bad = {k: v * FILES for k, v in MALFORMED.items()}
    assert report["malformed_uids"]["by_reason"] == bad
    assert report["malformed_uids"]["rows"] == sum(bad.values()) == n - report["scored"]
    assert report["invalid"]["clip_l14"] == 6 * FILES  # NaN and +-inf, as given
    assert report["invalid"]["short_side"] == report["invalid"]["aspect"]
    scored_text = [t for t, u in zip(truth["text"], truth["uid"]) if u is not None and len(u) == 32 and "z" not in u]
    assert report["invalid"]["words"] == report["invalid"]["lang"] == scored_text.count(None) > 0
    targets = report["clusters"]["targets"]
    assert (targets["rows"], targets["invalid"]) == (32, 2) and 1 <= targets["centroids_hit"] <= 3
    table = scores_table(scores)
    assert table.num_rows == report["scored"]
    assert table.column("cluster").null_count == report["invalid"]["cluster"] > 0  # NaN / zero embeddings


def test_basic_filter_matches_direct_computation(pool, tmp_path):
    _, scores, _, truth = pool
    r = decide(scores, "basic", str(tmp_path / "basic.npy"))
    rows = truth["rows"]
    expected = {truth["uid"][i] for i in rows[basic(truth)[rows]]}
    assert uid_set(tmp_path / "basic.npy") == expected
    assert 0 < r["kept"] == len(expected) < r["unique"]
    assert r["duplicate_uids"]["rows"] == DUPLICATES * FILES
    assert r["rows_in"] == r["malformed_uids"] + r["duplicate_uids"]["rows"] + r["kept"] + r["dropped"]
    assert [a["atom"] for a in r["atoms"]] == ["lang==en", "words>2", "chars>5", "short_side>=200", "aspect<=3"]
    assert r["atoms"][3]["invalid"] > 0  # null widths


def test_clip_threshold_and_exact_top_fraction(pool, tmp_path):
    _, scores, _, truth = pool
    rows, uids = truth["rows"], truth["uid"]
    decide(scores, "clip_l14>=0.3", str(tmp_path / "t.npy"))
    l14 = truth["l14"].astype(np.float32)
    assert uid_set(tmp_path / "t.npy") == {uids[i] for i in rows if np.isfinite(l14[i]) and l14[i] >= np.float32(0.3)}
    for fraction in (0.3, 0.1, 0.0, 1.0):
        r = decide(scores, f"top(clip_l14, {fraction})", str(tmp_path / "top.npy"), semantics="exact")
        valid = int(np.isfinite(l14[rows]).sum())
        kept = uid_set(tmp_path / "top.npy")
        assert len(kept) == r["kept"] == int(np.floor(fraction * valid + 0.5))
        assert kept == top_fraction(l14, uids, rows, fraction)
        atom = r["atoms"][0]
        assert atom["valid"] == valid and atom["invalid"] == len(rows) - valid
    r = decide(scores, "top(clip_b32, 0.3)", str(tmp_path / "b.npy"), semantics="exact")
    assert r["atoms"][0]["tied_not_kept"] > 0  # rounded scores: the cut falls inside a tie, broken by uid
    assert uid_set(tmp_path / "b.npy") == top_fraction(truth["b32"].astype(np.float32), uids, rows, 0.3)


def test_text_filter_and_combinations(pool, tmp_path):
    _, scores, _, truth = pool
    rows, uids = truth["rows"], truth["uid"]
    decide(scores, "text", str(tmp_path / "text.npy"), semantics="exact")
    assert uid_set(tmp_path / "text.npy") == {uids[i] for i in rows if truth["has_noun"][i]}
    decide(scores, "basic & top(clip_l14, 0.3)", str(tmp_path / "both.npy"), semantics="exact")
    b = basic(truth)
    top = top_fraction(truth["l14"], uids, rows, 0.3)
    assert uid_set(tmp_path / "both.npy") == {uids[i] for i in rows if b[i]} & top
    # SQL logic: an invalid score passes neither an atom nor its negation
    decide(scores, "!(clip_l14>=0.3) | text", str(tmp_path / "or.npy"), semantics="exact")
    l14 = truth["l14"].astype(np.float32)
    assert uid_set(tmp_path / "or.npy") == {uids[i] for i in rows if (np.isfinite(l14[i]) and l14[i] < np.float32(0.3))
                                            or truth["has_noun"][i]}


def test_image_filter_one_metric(pool, tmp_path):
    _, scores, report, truth = pool
    centroids = np.load(os.path.join(scores, "centroids.npy"))
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, rtol=1e-5)
    x = truth["emb"].astype(np.float32)
    ok = np.isfinite(x).all(axis=1) & (np.linalg.norm(np.nan_to_num(x), axis=1) > 0)
    norms = np.linalg.norm(np.nan_to_num(x), axis=1)
    unit = np.where(ok[:, None], np.nan_to_num(x), 0) / np.where(ok, norms, 1)[:, None]
    by_ip = np.argmax(unit @ centroids.T, axis=1)
    by_l2 = np.argmin(((unit[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(by_ip[ok], by_l2[ok])  # unit vectors: the same assignment either way
    table = scores_table(scores)
    scored_rows = np.flatnonzero([u is not None and len(u) == 32 and "z" not in u for u in truth["uid"]])
    stored = table.column("cluster").to_numpy(zero_copy_only=False)
    assert np.array_equal(stored[ok[scored_rows]], by_ip[scored_rows][ok[scored_rows]])
    # training used the same metric: each centroid is (close to) the normalised mean of its members
    for c in range(CENTERS):
        members = unit[ok & (by_ip == c)]
        mean = members.sum(0) / np.linalg.norm(members.sum(0))
        assert mean @ centroids[c] > 0.999
    t = truth["targets"]
    t_ok = np.isfinite(t).all(axis=1)
    hit = np.unique(np.argmax((t[t_ok] / np.linalg.norm(t[t_ok], axis=1, keepdims=True)) @ centroids.T, axis=1))
    assert np.array_equal(np.flatnonzero(np.load(os.path.join(scores, "centroid_targets.npy"))), hit)
    r = decide(scores, "image", str(tmp_path / "img.npy"))
    rows = truth["rows"]
    assert uid_set(tmp_path / "img.npy") == {truth["uid"][i] for i in rows if ok[i] and by_ip[i] in set(hit)}
    assert r["atoms"][0]["invalid"] == int((~ok[rows]).sum()) > 0


def test_subset_file_round_trip(pool, tmp_path):
    _, scores, _, _ = pool
    out = str(tmp_path / "s.npy")
    decide(scores, "english", out)
    raw = np.load(out)
    assert raw.dtype == SUBSET_DTYPE and raw.dtype == np.dtype("u8,u8")
    order = np.lexsort((raw["f1"], raw["f0"]))
    assert np.array_equal(order, np.arange(len(raw))) and len(np.unique(raw)) == len(raw)
    loaded = read_subset(out)
    assert np.array_equal(loaded.uids, raw) and loaded.total == len(raw) and not loaded.notes
    assert json.load(open(str(tmp_path / "s.report.json")))["kept"] == len(raw)


def test_reruns_are_byte_identical(pool, tmp_path):
    folder, scores, _, _ = pool
    again = str(tmp_path / "again")
    score_metadata([str(folder)], again, pool_options(folder))
    assert score_files(scores) == score_files(again)
    assert sorted(score_files(scores)) == ["centroid_targets.npy", "centroids.npy", "score_report.json",
                                           "scores/000000.parquet", "scores/000001.parquet"]  # a unit per file
    decide(scores, "basic & top(clip_l14,0.3)", str(tmp_path / "a.npy"))
    decide(again, "basic & top(clip_l14,0.3)", str(tmp_path / "b.npy"))
    assert open(tmp_path / "a.npy", "rb").read() == open(tmp_path / "b.npy", "rb").read()


@pytest.mark.parametrize("where", ["processes", "ray"])
def test_score_units_as_tasks_write_the_same_bytes(pool, tmp_path, where):
    """One unit per row group, scored as tasks on worker processes or Ray: the same files as the inline
    pass of the same units, and the same scores as a unit per file; a unit that fails on bad input raises
    the input error itself."""
    folder, scores, _, _ = pool
    inline, parallel = str(tmp_path / "inline"), str(tmp_path / "parallel")
    score_metadata([str(folder)], inline, pool_options(folder), unit_rows=1, where="inline")
    report = score_metadata([str(folder)], parallel, pool_options(folder), unit_rows=1, where=where)
    assert score_files(inline) == score_files(parallel)
    assert len(report["parts"]) == sum(i["row_groups"] for i in report["inputs"]) > 2
    assert same_scores(scores, parallel)
    short = str(tmp_path / "short.npz")
    np.savez(short, l14_img=np.ones((10, DIM), np.float16))
    centroids = str(tmp_path / "centroids.npy")
    np.save(centroids, np.eye(2, DIM, dtype=np.float32))
    with pytest.raises(FilterError, match="10 rows"):  # found by the task that reads the embeddings
        score_metadata([str(folder / "00000000.parquet")], str(tmp_path / "bad"),
                       ScoreOptions(embeddings=[short], clusters=2, cluster_targets=str(folder / "targets.npy"),
                                    centroids=centroids), unit_rows=1, where=where)


def _one_file_pool(folder, out) -> str:
    """The pool's files as one metadata file of 6 row groups (+ its npz): one unit, or six."""
    table = pa.concat_tables(pq.read_table(folder / f"{f:08d}.parquet") for f in range(FILES))
    pq.write_table(table, str(out / "pool.parquet"), row_group_size=500)
    np.savez(str(out / "pool.npz"), l14_img=np.concatenate([np.load(folder / f"{f:08d}.npz")["l14_img"]
                                                            for f in range(FILES)]))
    return str(out / "pool.parquet")


def test_cluster_training_pass_as_units_on_ray_is_the_same(pool, tmp_path):
    """With --clusters, the k-means training pass runs over the score units too (Ray tasks here): the
    centroids, the scores and the report are the same as one unit's, for DataComp's k-means
    (every caption row, in input order) and for the uid-hash sample with a train size that cuts between
    two rows of one uid (the earlier one is kept, however the units fall)."""
    from reinforge.curation.filters.clusters import uid_hash, unit_rows
    from reinforge.formats.subset import UID_OK, parse_hex_uids
    from reinforge.runtime.ray_session import ray_session
    folder = pool[0]
    meta = _one_file_pool(folder, tmp_path)
    hi, lo, status = parse_hex_uids(pq.read_table(meta, columns=["uid"]).column("uid"))
    ok = (status == UID_OK) & unit_rows(np.load(tmp_path / "pool.npz")["l14_img"])[1]
    keys = np.stack([uid_hash(hi[ok], lo[ok], 3), hi[ok], lo[ok]], axis=1)
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
    rows, keys = np.flatnonzero(ok)[order], keys[order]
    # sorted ranks i and i + 1 hold one uid, from rows of two row groups (two units)
    tied = np.flatnonzero((keys[1:] == keys[:-1]).all(axis=1) & (rows[1:] // 500 != rows[:-1] // 500))
    assert len(tied) and tied[-1] > 100
    targets = str(folder / "targets.npy")
    cases = {"datacomp": ScoreOptions(clusters=CENTERS, cluster_targets=targets),
             "spherical": ScoreOptions(clusters=CENTERS, cluster_targets=targets, kmeans="spherical", seed=3,
                                       cluster_train="all", train_size=int(tied[-1]) + 1)}
    with ray_session():  # one Ray for both runs of units
        for name, options in cases.items():
            one, units = str(tmp_path / f"{name}_one"), str(tmp_path / f"{name}_units")
            score_metadata([meta], one, options)
            report = score_metadata([meta], units, options, unit_rows=1)
            assert report["inputs"][0]["row_groups"] == 6
            assert same_scores(one, units), name
    assert report["clusters"]["train_rows"] == int(tied[-1]) + 1


def test_bad_inputs_are_clear_errors(pool, tmp_path):
    folder, scores, _, _ = pool
    meta = str(folder / "00000000.parquet")
    with pytest.raises(FilterError, match="unknown name"):
        decide(scores, "basic & clip_l99>=1", str(tmp_path / "x.npy"))
    wrong_dim = str(tmp_path / "t.npy")
    np.save(wrong_dim, np.ones((3, DIM + 1), np.float32))
    with pytest.raises(FilterError, match="dim 33"):
        score_metadata([meta], str(tmp_path / "s1"), ScoreOptions(clusters=2, cluster_targets=wrong_dim))
    short = str(tmp_path / "short.npz")
    np.savez(short, l14_img=np.ones((10, DIM), np.float16))
    with pytest.raises(FilterError, match="10 rows"):
        score_metadata([meta], str(tmp_path / "s2"), ScoreOptions(embeddings=[short], clusters=2,
                                                                   cluster_targets=str(folder / "targets.npy")))
    other = str(tmp_path / "other.npz")
    np.savez(other, l14_img=np.ones((ROWS_PER_FILE, DIM // 2), np.float16))
    with pytest.raises(FilterError, match="dim 16, earlier files have 32"):
        score_metadata([meta, str(folder / "00000001.parquet")], str(tmp_path / "s6"),
                       ScoreOptions(embeddings=[str(folder / "00000000.npz"), other], clusters=2,
                                    cluster_targets=str(folder / "targets.npy")))
    no_uid = str(tmp_path / "no_uid.parquet")
    pq.write_table(pa.table({"text": ["a b c d"]}), no_uid)
    with pytest.raises(FilterError, match="no column 'uid'"):
        score_metadata([no_uid], str(tmp_path / "s3"), ScoreOptions())
    # missing optional columns: scored as nulls, reported, and a rule on them is refused by name
    no_clip = str(tmp_path / "no_clip.parquet")
    pq.write_table(pq.read_table(meta).drop_columns(["clip_l14_similarity_score"]), no_clip)
    r = score_metadata([no_clip], str(tmp_path / "s4"), ScoreOptions())
    assert r["inputs"][0]["missing_columns"] == ["clip_l14_similarity_score"]
    assert r["invalid"]["clip_l14"] == r["scored"]
    with pytest.raises(FilterError, match="clip_l14_similarity_score"):
        decide(str(tmp_path / "s4"), "top(clip_l14, 0.3)", str(tmp_path / "x.npy"))
    with pytest.raises(FilterError, match="no column cluster_targets"):
        decide(str(tmp_path / "s4"), "image", str(tmp_path / "x.npy"))
    with pytest.raises(FilterError, match=r"no column lang_cld3 \(score with --cld3\)"):
        decide(str(tmp_path / "s4"), "laion2b", str(tmp_path / "x.npy"))
    targets = str(folder / "targets.npy")
    three = str(tmp_path / "three.npy")
    np.save(three, np.ones((3, DIM), np.float32))
    with pytest.raises(FilterError, match="3 rows, --clusters is 2"):
        score_metadata([meta], str(tmp_path / "s7"), ScoreOptions(clusters=2, cluster_targets=targets, centroids=three))
    with pytest.raises(FilterError, match="--kmeans 'l1'"):
        score_metadata([meta], str(tmp_path / "s8"), ScoreOptions(clusters=2, cluster_targets=targets, kmeans="l1"))
    empty = str(tmp_path / "empty.parquet")
    pq.write_table(pq.read_table(meta).slice(0, 0), empty)
    r = score_metadata([empty], str(tmp_path / "s5"), ScoreOptions())
    assert r["rows"] == r["scored"] == 0
    with pytest.raises(FilterError, match="no scored rows"):
        decide(str(tmp_path / "s5"), "basic", str(tmp_path / "x.npy"))


def test_cli_end_to_end(pool, tmp_path):
    from reinforge.cli.main import cli
    folder, _, _, truth = pool
    runner = CliRunner()
    scores = str(tmp_path / "scores")
    res = runner.invoke(cli, ["filter", "score", str(folder / "00000001.parquet"), "--out", scores,
                              "--clusters", "4", "--cluster-targets", str(folder / "targets.npy")])
    assert res.exit_code == 0, res.output
    assert "scored 1,495 of 1,500 rows" in res.output
    out = str(tmp_path / "sub.npy")
    res = runner.invoke(cli, ["filter", "apply", scores, "--rule", "basic", "--top-fraction", "0.3", "--out", out])
    assert res.exit_code == 0, res.output
    report = json.load(open(str(tmp_path / "sub.report.json")))
    assert report["parsed"].endswith("top(clip_l14,0.3))") and len(np.load(out)) == report["kept"] > 0
    res = runner.invoke(cli, ["filter", "apply", scores, "--rule", "basic &", "--out", out])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "rule 'basic &'" in res.output
    # DataComp's baseline names: the same decision as the rule they stand for
    named = str(tmp_path / "named.npy")
    res = runner.invoke(cli, ["filter", "apply", scores, "--baseline", "image_based_intersect_clip_score",
                              "--out", named])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["filter", "apply", scores, "--rule", "caption & image & top(clip_l14, 0.3)",
                              "--out", out])
    assert res.exit_code == 0 and open(named, "rb").read() == open(out, "rb").read()
    assert 0 < json.load(open(str(tmp_path / "named.report.json")))["kept"] < 1495


# ---------------------------------------------------------------- DataComp parity (semantics="datacomp")

PARITY_TEXTS = ["a photo of my dog", "my dog.", "Contact us today", "hot dog stand at the fair", "a hot_dog please",
                "the bank of the river", "DOGS! everywhere", "geese over the lake", "nothing to see in here",
                "orange juice in glass", "sea lion on a rock", "a sea_lion on a rock", "running in the park"]
F32_EDGE = float(np.float32(0.22))  # a b32 score stored exactly at float32(0.22)


def _parity_pool(folder) -> str:
    """Metadata with ties, float32 edge values, punctuation, multi-sense words and multi-word synsets."""
    rng = np.random.default_rng(7)
    n = 260
    uids = _uid_strings(rng, n)
    texts = [PARITY_TEXTS[i % len(PARITY_TEXTS)] for i in range(n)]
    ties = np.float32([0.1, 0.2, F32_EDGE, 0.25, 0.3])  # few distinct values: every cut falls in a tie
    b32 = ties[rng.integers(len(ties), size=n)]
    l14 = np.float32(rng.choice([0.15, 0.28, 0.31, 0.33], size=n))
    table = pa.table({"uid": uids, "text": texts, "original_width": np.full(n, 400), "original_height": np.full(n, 300),
                      "clip_b32_similarity_score": pa.array(b32, pa.float32()),
                      "clip_l14_similarity_score": pa.array(l14, pa.float32())})
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, f"{folder}/00000000.parquet")
    return f"{folder}/00000000.parquet"


def _nltk_wordnet_from_clean_copy(tmp):
    """An unmodified nltk reader (real Synset objects) over an LF copy of the packaged WordNet 3.0 files:
    the reference side, independent of reinforge's offsets-only reader."""
    import warnings

    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    from reinforge.curation.filters.wordnet import wordnet_dir
    src, dst = wordnet_dir(), tmp / "wordnet"
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes(open(os.path.join(src, name), "rb").read().replace(b"\r\n", b"\n"))
    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # WordNet 3.0 itself: nothing to map (needs no OMW corpus)
            return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Reader(str(dst), None)


def test_datacomp_semantics_match_datacomp_code(tmp_path):
    """Each baseline computed the way DataComp's code decides it (pandas, float32 columns, int(f*n) cut,
    first WordNet sense per whitespace token) must give the same uid set as `decide`."""
    import pandas as pd
    from timm.data import ImageNetInfo

    from reinforge.curation.filters.text import _language_identifier
    meta = _parity_pool(tmp_path / "pool")
    scores = str(tmp_path / "scores")
    score_metadata([meta], scores, ScoreOptions())
    df = pd.read_parquet(meta)

    def got(rule):
        decide(scores, rule, str(tmp_path / "x.npy"))
        return uid_set(tmp_path / "x.npy")

    # thresholds: pandas compares the float32 column with the constant
    assert got("clip_b32>=0.22") == set(df.uid[df.clip_b32_similarity_score >= 0.22])
    assert any(df.clip_b32_similarity_score == np.float32(0.22))  # the edge value is present (kept)
    # top fraction: the score at sorted position int(f*n), every row >= it
    for key, col, fraction in (("clip_l14_similarity_score", "clip_l14", 0.3),
                               ("clip_b32_similarity_score", "clip_b32", 0.1)):
        threshold = -np.sort(-df[key].values)[int(len(df) * fraction)]
        want = set(df.uid[df[key] >= threshold])
        assert got(f"top({col}, {fraction})") == want
        assert len(want) > round(fraction * len(df))  # ties kept: more than the exact count
    # text-based: English and a token whose first synset is an ImageNet-21k synset (offset only)
    wordnet = _nltk_wordnet_from_clean_copy(tmp_path)
    info = ImageNetInfo("imagenet-21k")
    entity = {int(info.index_to_label_name(i)[1:]) for i in range(info.num_classes())}

    def has_entity(text):
        return any((s := wordnet.synsets(w)) and s[0].offset() in entity for w in text.split())
    identify = _language_identifier().classify  # fastText lid.176 cannot be had: the same py3langid as ours
    english = df.text.apply(lambda t: identify(t.replace("\n", " "))[0] == "en")
    assert got("english & text") == set(df.uid[english & df.text.apply(has_entity)])
    by_text = {t: has_entity(t) for t in PARITY_TEXTS}
    assert not by_text["my dog."] and not by_text["Contact us today"] and by_text["a photo of my dog"]
    assert by_text["hot dog stand at the fair"] != by_text["nothing to see in here"]
    # exact semantics stays the exact count
    decide(scores, "top(clip_l14, 0.3)", str(tmp_path / "e.npy"), semantics="exact")
    assert len(uid_set(tmp_path / "e.npy")) == round(0.3 * len(df))


# ---------------------------------------------------------------- DataComp's own code, run once (golden data)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "datacomp_filters")
# the golden file (DataComp's baseline function and arguments) -> the same decision in reinforge's rules
GOLDEN_RULES = {"basic_filter": "basic", "text_based": "english & text", "clip_b32_threshold_0.22": "clip_b32>=0.22",
                "clip_l14_threshold_0.3": "clip_l14>=0.3", "clip_l14_fraction_0.3": "top(clip_l14, 0.3)",
                "clip_b32_fraction_0.1": "top(clip_b32, 0.1)", "image_based": "caption & image",
                "image_based_intersect_clip_score_l14_0.3": "caption & image & top(clip_l14, 0.3)",
                "laion2b": "laion2b"}


def _golden_scores(out, **options) -> str:
    info = json.load(open(os.path.join(GOLDEN, "golden.json")))
    score_metadata([os.path.join(GOLDEN, "metadata")], str(out),
                   ScoreOptions(clusters=info["k"], cluster_targets=os.path.join(GOLDEN, "targets.npy"),
                                seed=info["seed"], cld3=True, **options))
    return str(out)


def test_datacomp_baselines_match_datacomp_code_golden(tmp_path):
    """tests/golden/make_datacomp_filters_golden.py ran DataComp's baselines/ functions on generated metadata
    (ties, float32 edge values, NaN scores, punctuation, multi-sense words, multi-word synsets, newlines,
    non-ASCII spaces) and kept their uid sets; with the same language labels (py3langid, as DataComp's
    fastText lid.176 cannot be had) every baseline must keep exactly the same uids, the image-based ones
    from k-means trained here as DataComp trains it."""
    from reinforge.curation.filters.rules import BASELINES, parse_rule
    scores = _golden_scores(tmp_path / "scores")
    kept = {}
    for name, rule in GOLDEN_RULES.items():
        r = decide(scores, rule, str(tmp_path / f"{name}.npy"))
        got, want = uid_set(tmp_path / f"{name}.npy"), uid_set(os.path.join(GOLDEN, f"{name}.npy"))
        assert got ^ want == set(), name
        kept[name] = r["kept"]
    # `--baseline NAME` means these rules
    for name, golden in (("basic_filter", "basic_filter"), ("text_based", "text_based"), ("image_based", "image_based"),
                         ("image_based_intersect_clip_score", "image_based_intersect_clip_score_l14_0.3"),
                         ("laion2b", "laion2b")):
        assert parse_rule(BASELINES[name]) == parse_rule(GOLDEN_RULES[golden])
    # the sets are not trivial: every rule keeps some rows and drops some
    assert all(0 < n < 600 for n in kept.values()), kept
    # the k-means is DataComp's: the centroids its train_kmeans produced (faiss, CPU index)
    np.testing.assert_allclose(np.load(os.path.join(scores, "centroids.npy")),
                               np.load(os.path.join(GOLDEN, "centroids.npy")), atol=1e-5)
    # given centroids (e.g. DataComp's released ones) decide the same without training
    given = _golden_scores(tmp_path / "given", centroids=os.path.join(GOLDEN, "centroids.npy"))
    assert "train_rows" not in json.load(open(os.path.join(given, "score_report.json")))["clusters"]
    for name in ("image_based", "image_based_intersect_clip_score_l14_0.3"):
        decide(given, GOLDEN_RULES[name], str(tmp_path / "g.npy"))
        assert uid_set(tmp_path / "g.npy") == uid_set(os.path.join(GOLDEN, f"{name}.npy"))
