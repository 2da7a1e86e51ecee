"""`reinforge join`: reinforcement-only shards (keep_images=false) + their image pool -> trainable shards,
on local Ray with tiny real open_clip models; per-sample refusals counted by reason; byte-identical reruns."""
from __future__ import annotations

import json

import pytest
from conftest import jpeg_bytes, photo, shard_bytes, tree_state, write_shard
from test_mobileclip_e2e import datacomp_shards, recipe, uid

from reinforge.runtime.runner import run_recipe
from reinforge.products.registry import parse_recipe
from reinforge.formats.imagenet_plus import sha256_hex
from reinforge.formats.wds import iter_samples

pytestmark = pytest.mark.ray


def read_shard(path) -> list[dict]:
    with open(path, "rb") as f:
        return list(iter_samples(f))


def join_recipe(reinforcement: str, images: str, output, **changes) -> dict:
    return {"product": "join", "output": str(output), "input": {"path": reinforcement}, "images": {"path": images},
            "resources": {"cpus_per_actor": 1, "object_store_memory_mb": 256}, **changes}


def cli(*args):
    from click.testing import CliRunner

    from reinforge.cli.main import cli as main
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """The image pool, a keep_images=true run of it and a reinforcement-only (keep_images=false) run."""
    root = tmp_path_factory.mktemp("join")
    pool = datacomp_shards(root / "pool", shards=2, per_shard=4)
    for name, keep in (("full", True), ("reinforcement", False)):
        summary = run_recipe(parse_recipe(recipe(pool, root / name, keep_images=keep)), progress=False)
        assert summary.ok and summary.samples == 8
    return root, pool


@pytest.fixture(scope="module")
def tampered(runs):
    """The pool and reinforcement shards with four bad samples, one per refusal reason:
    uid 0 image re-encoded (sha256 differs), uid 1 downscaled to 8 px with its recorded sha256 following
    it (the public generator's defect: boxes drawn on another resolution), uid 2 gone from the pool,
    uid 3 undecodable bytes with its sha256 following them."""
    root, _ = runs
    new_image = {uid(1): jpeg_bytes(photo(1, 48).resize((8, 8))), uid(3): b"\xff\xd8 not really a jpeg"}
    pool = root / "pool2"
    pool.mkdir()
    for shard in sorted((root / "pool").glob("*.tar")):
        samples = []
        for s in read_shard(shard):
            u = json.loads(s["json"])["uid"]
            if u == uid(2):
                continue
            if u == uid(0):
                s["jpg"] = jpeg_bytes(photo(0, 48), quality=70)
            s["jpg"] = new_image.get(u, s["jpg"])
            samples.append((s.pop("__key__"), s))
        write_shard(pool / shard.name, samples)
    reinforcement = root / "reinforcement2"
    reinforcement.mkdir()
    for shard in sorted((root / "reinforcement" / "shards").glob("*.tar")):
        samples = []
        for s in read_shard(shard):
            if s["__key__"] in new_image:
                s["json"] = json.dumps({"uid": s["__key__"], "sha256": sha256_hex(new_image[s["__key__"]])},
                                       separators=(",", ":")).encode()
            samples.append((s.pop("__key__"), s))
        write_shard(reinforcement / shard.name, samples)
    return str(reinforcement / "*.tar"), str(pool / "*.tar")


@pytest.fixture(scope="module")
def joined(runs, tmp_path_factory):
    root, pool = runs
    out = tmp_path_factory.mktemp("joined") / "run"
    result = cli("join", str(root / "reinforcement" / "shards" / "*.tar"), "--images", pool, "--output", str(out),
                 "--no-progress")
    assert result.exit_code == 0 and "samples written: 8, skipped with errors: 0" in result.output, result.output
    return out


def test_joined_shards_equal_a_keep_images_run(runs, joined):
    root, _ = runs
    reinforcement = read_shard(root / "reinforcement" / "shards" / "00000000.tar")[0]
    assert [k for k in reinforcement if k != "__key__"] == ["url.txt", "syn.json", "paug.json", "npz", "json"]
    assert shard_bytes(joined) == shard_bytes(root / "full")  # every member, its order and the tar bytes
    assert (joined / "dr_config.json").read_bytes() == (root / "reinforcement" / "dr_config.json").read_bytes()
    plan = json.loads((joined / "plan" / "plan.json").read_text())
    assert plan["uids"] == plan["uids_in_pool"] == 8 and plan["uids_not_in_pool"] == 0


def test_joined_run_validates_and_trains(joined):
    import open_clip

    from reinforge.readers.mobileclip import MobileCLIPDRDataset
    before = tree_state(joined)
    result = cli("validate", str(joined))
    assert result.exit_code == 0 and "ok: 8 samples valid" in result.output, result.output
    assert cli("status", str(joined)).exit_code == 0
    assert tree_state(joined) == before, "status and validate must not re-plan (index, plan/) into the run"
    ds = MobileCLIPDRDataset(str(joined), open_clip.get_tokenizer("ViT-B-32"))
    items = list(ds)
    assert sorted(it["uid"] for it in items) == sorted(uid(i) for i in range(8)) and ds.skipped == {}
    assert items[0]["image"].shape == (3, 32, 32) and items[0]["image_emb"].shape == (64,)


def test_refusals_are_per_sample_and_counted(runs, tampered, tmp_path, local_ray):
    root, _ = runs
    reinforcement, pool = tampered
    config = str(root / "reinforcement" / "dr_config.json")
    summary = run_recipe(parse_recipe(join_recipe(reinforcement, pool, tmp_path / "run",
                                                  input={"path": reinforcement, "dr_config": config},
                                                  resources={"num_actors": 1, "object_store_memory_mb": 256})),
                         progress=False)
    assert summary.ok and summary.samples == 4 and summary.errors == 4
    errors = {e["key"]: e["reason"] for e in
              map(json.loads, (tmp_path / "run" / "errors" / "00000000.jsonl").read_text().splitlines())}
    assert errors == {uid(0): "sha256_mismatch", uid(1): "crop_out_of_bounds", uid(2): "missing_image",
                      uid(3): "corrupt_image"}
    assert not (tmp_path / "run" / "errors" / "00000001.jsonl").exists()
    stats = cli("stats", str(tmp_path / "run")).output
    assert "corrupt_image=1, crop_out_of_bounds=1, missing_image=1, sha256_mismatch=1" in stats, stats
    full = {s["__key__"]: s for shard in sorted((root / "full" / "shards").glob("*.tar")) for s in read_shard(shard)}
    kept = [s for shard in sorted((tmp_path / "run" / "shards").glob("*.tar")) for s in read_shard(shard)]
    assert [s["__key__"] for s in kept] == [uid(i) for i in range(4, 8)]
    assert all(s == full[s["__key__"]] for s in kept)  # the verified samples, member for member

    # a rerun elsewhere, on two actors, is byte-identical, errors included; the same folder skips every task
    again = tmp_path / "again"
    inputs = {"path": reinforcement, "dr_config": config}
    run_recipe(parse_recipe(join_recipe(reinforcement, pool, again, input=inputs,
                                        resources={"num_actors": 2, "object_store_memory_mb": 256})), progress=False)
    assert shard_bytes(again) == shard_bytes(tmp_path / "run")
    errors_file = ("errors", "00000000.jsonl")
    assert again.joinpath(*errors_file).read_bytes() == tmp_path.joinpath("run", *errors_file).read_bytes()
    prepared = tree_state(again / "plan")
    rerun = run_recipe(parse_recipe(join_recipe(reinforcement, pool, again, input=inputs)), progress=False)
    assert rerun.skipped == 2 and rerun.done == 0
    assert tree_state(again / "plan") == prepared, "prepare() of unchanged inputs rewrites no plan file"


def test_prepare_time_errors_name_the_field(runs, tampered, tmp_path):
    root, pool = runs
    reinforcement, _ = tampered
    result = cli("join", reinforcement, "--images", pool, "--output", str(tmp_path / "a"))
    assert result.exit_code == 2 and "input.dr_config: not given" in result.output, result.output
    result = cli("join", reinforcement, "--images", pool, "--output", str(tmp_path / "b"), "--dr-config",
                 str(tmp_path / "nope.json"))
    assert result.exit_code == 2 and "nope.json not found" in result.output, result.output
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    write_shard(stranger / "00000000.tar", [("k", {"jpg": jpeg_bytes(photo(0, 16)), "txt": b"x",
                                                   "json": json.dumps({"uid": "ab" * 16}).encode()})])
    result = cli("join", str(root / "reinforcement" / "shards" / "*.tar"), "--images", str(stranger / "*.tar"),
                 "--output", str(tmp_path / "c"))
    assert result.exit_code == 2 and "images.path: none of the 8 reinforcement uids" in result.output, result.output
    result = cli("join", reinforcement, "--images", str(tmp_path / "missing" / "*.tar"),
                 "--output", str(tmp_path / "d"), "--dr-config", str(root / "reinforcement" / "dr_config.json"))
    assert result.exit_code == 2 and "images.path: no shard matches" in result.output, result.output


def test_plan_probes_a_join(runs, tmp_path):
    """`reinforge plan` on a join recipe: its real run over a few reinforcement samples and the pool."""
    root, pool = runs
    recipe = tmp_path / "join.yaml"
    recipe.write_text(json.dumps(join_recipe(str(root / "reinforcement" / "shards" / "*.tar"), pool, tmp_path / "j")))
    result = cli("plan", str(recipe), "--samples", "100", "--probe-samples", "3", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["probe_samples"] == 3 and plan["yield_fraction"] == 1.0 and plan["tasks"] == 25
    assert not (tmp_path / "j").exists()
