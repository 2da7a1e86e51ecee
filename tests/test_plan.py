"""Capacity planning: a real probe of the demo recipe (real efficientnet_lite0 teacher) predicts the
output size of a larger real run within 10 %."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from conftest import jpeg_bytes, photo, write_shard

from reinforge.ops.plan import tar_bytes
from reinforge.ops.rundir import merged_stats
from reinforge.runtime.runner import run_recipe
from reinforge.io.storage import read_text
from reinforge.products.registry import load_recipe
from reinforge.formats.wds import ShardWriter, iter_samples

pytestmark = pytest.mark.ray
DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml")


def cli(*args: str):
    from click.testing import CliRunner

    from reinforge.cli.main import cli as main
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_tar_bytes_is_what_a_sample_takes_in_a_shard():
    members = {"jpg": b"x" * 1000, "cls": b"3", "json": b"{}" * 300}
    buf = io.BytesIO()
    with ShardWriter(buf) as writer:
        writer.write("a", members)
        writer.write("b", members)
    buf.seek(0)
    samples = list(iter_samples(buf))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        end = tar.getmembers()[-1]
        content = end.offset_data + -(-end.size // 512) * 512
    assert sum(tar_bytes(s) for s in samples) == content == 2 * (512 + 1024 + 512 + 512 + 512 + 1024)


def test_plan_storage_within_10_percent_of_the_real_run(tmp_path, local_ray):
    folder = tmp_path / "input"
    folder.mkdir()
    for s in range(4):  # 24 real photos, 6 per shard
        write_shard(folder / f"demo-{s:06d}.tar",
                    [(f"img{i:03d}", {"jpg": jpeg_bytes(photo(i, 160)), "cls": str(281 + i).encode()})
                     for i in range(6 * s, 6 * s + 6)])
    sets = ("--set", f"input.path={folder}/demo-*.tar", "--set", f"output={tmp_path / 'run'}")
    result = cli("plan", DEMO, "--samples", "24", "--probe-samples", "4", "--json", *sets)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["probe_samples"] == 4 and plan["tasks"] == 4 and plan["yield_fraction"] == 1.0
    assert set(plan["stage_rates"]) == {"decode", "label", "augment", "teachers", "encode"}
    assert plan["bottleneck"] == "teachers"  # a 224 px CNN on 8 views per image, on 2 CPU cores
    assert plan["actors_per_node"] == 1 and plan["wall_seconds"] > 0
    assert not (tmp_path / "run").exists()  # the probe ran in a temp folder, not in the recipe's output

    recipe = load_recipe(read_text(DEMO), (sets[1], sets[3]))
    summary = run_recipe(recipe, progress=False)
    assert summary.ok and summary.samples == 24
    actual = merged_stats(str(tmp_path / "run"))[1]["bytes"]
    error = plan["storage_bytes"] / actual - 1
    print(f"plan {plan['storage_bytes']:,.0f} B vs actual {actual:,} B: {error:+.1%}; "
          f"predicted wall {plan['wall_seconds']:.1f} s, run {summary.seconds:.1f} s")
    assert abs(error) < 0.10

    text = cli("plan", DEMO, "--samples", "10000000", "--nodes", "4", "--probe-samples", "2", *sets).output
    assert "imagenet_plus at N=10,000,000 samples → " in text and "bottleneck: teachers" in text
    assert "on 4 node(s) (4 actor(s))" in text


def plan_json(recipe: dict, tmp_path, samples: int = 1000, probe: int = 4) -> dict:
    path = tmp_path / f"{recipe['product']}.yaml"
    path.write_text(json.dumps(recipe))
    result = cli("plan", str(path), "--samples", str(samples), "--probe-samples", str(probe), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_plan_works_for_reshard_and_embed_pool(tmp_path, local_ray):
    """Products without augmentation batches (embed_pool) or without an input format (reshard) are
    planned from their own recipe: the probe is their real run over a few samples."""
    from output_digests import datacomp_pool

    from conftest import tiny_open_clip
    from reinforge.formats.subset import make_subset, write_subset
    pool = datacomp_pool(tmp_path / "pool", shards=2, per_shard=4)
    small = {"cpus_per_actor": 1, "object_store_memory_mb": 256}
    embed = plan_json({"product": "embed_pool", "output": str(tmp_path / "embed"), "resources": small,
                       "input": {"format": "webdataset", "path": pool},
                       "encoder": {"model": tiny_open_clip("clip", 32, seed=1)}}, tmp_path)
    assert embed["probe_samples"] == 4 and embed["yield_fraction"] == 1.0 and 200 <= embed["tasks"] <= 400  # ~4 per shard, from shard sizes

    write_subset(str(tmp_path / "s.npy"), make_subset(np.zeros(1, np.uint64), np.zeros(1, np.uint64)))
    reshard = plan_json({"product": "reshard", "output": str(tmp_path / "re"), "subset": str(tmp_path / "s.npy"),
                         "input": {"path": pool}, "samples_per_shard": 100, "resources": small}, tmp_path)
    assert reshard["probe_samples"] == 4 and reshard["tasks"] == 10 and reshard["samples_per_task"] == 100
    sizes = [tar_bytes(s) for f in sorted((tmp_path / "pool").glob("*.tar")) for s in iter_samples(open(f, "rb"))]
    assert min(sizes) <= reshard["bytes_per_sample"] <= max(sizes)  # a copy of the pool's samples
    assert not (tmp_path / "re").exists() and not (tmp_path / "embed").exists()
