"""The command line: one clear line and exit code 2 for user errors; the run-directory commands."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_input_shards, tiny_recipe

from reinforge.cli.main import cli

pytestmark = pytest.mark.ray


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_local):
    import ray

    from reinforge.pipelines.ray_session import start_local_ray
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory_mb=256)
    root = tmp_path_factory.mktemp("cli")
    inputs = make_input_shards(root / "in", shards=2, per_shard=5)
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe(inputs, root / "run")))
    result = invoke("run", str(config), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "tasks: 2 (0 already done, 2 run, 0 failed)" in result.output
    return root


@pytest.mark.parametrize("override, message", [
    ("teachers.0.batch_size=0", "config error: teachers.0.batch_size: Input should be greater than or equal to 1"),
    ("augmentation.num_samples=many", "config error: augmentation.num_samples: Input should be a valid integer"),
    ("bogus=1", "config error: bogus: Extra inputs are not permitted"),
])
def test_config_errors_are_one_line_and_exit_2(finished_run, override, message):
    result = subprocess.run([sys.executable, "-m", "reinforge.cli.main", "run", str(finished_run / "recipe.yaml"),
                             "--set", override], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message + result.stderr.strip()[len(message):]]
    assert result.stderr.startswith(message) and "Traceback" not in result.stderr


def test_changed_config_is_refused_with_exit_2(finished_run):
    result = subprocess.run([sys.executable, "-m", "reinforge.cli.main", "run", str(finished_run / "recipe.yaml"),
                             "--set", "seed=99"], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "different recipe" in result.stderr and "changed: seed" in result.stderr and "--force" in result.stderr


def test_missing_config_and_not_a_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "reinforge.cli.main", "run", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not found" in result.stderr
    result = subprocess.run([sys.executable, "-m", "reinforge.cli.main", "status", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not a reinforge run directory" in result.stderr


def test_status_stats_inspect_validate(finished_run):
    run = str(finished_run / "run")
    status = invoke("status", run)
    assert "2/2 tasks done, 0 pending, 0 failed" in status.output
    stats = invoke("stats", run, "--json")
    data = json.loads(stats.output)
    assert data["totals"]["samples_out"] == 10 and data["stages"]["teachers"]["samples_in"] == 10
    table = invoke("stats", run).output
    assert "teachers" in table and "augment" in table
    shown = invoke("inspect", f"{run}/shards/train-0000.tar", "-n", "2").output
    assert "key: img00000" in shown and "stored augmentations: 4, top-k: 3" in shown and "[1] params" in shown
    assert invoke("validate", run).output.startswith("ok: 10 samples valid")


def test_validate_detects_tampering_and_gc_removes_orphans(finished_run, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(finished_run / "run", run)
    (run / "shards" / ".tmp-train-0001.tar.123.abcd").write_bytes(b"partial")
    shard = run / "shards" / "train-0000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["validate", str(run)])
    assert result.exit_code == 1 and "size/sha256 differ" in result.output
    gc = invoke("gc", str(run))
    assert "1 orphaned temporary files removed" in gc.output
    assert not (run / "shards" / ".tmp-train-0001.tar.123.abcd").exists() and shard.exists()
    (run / "manifests" / "train-0001.json").write_text('{"task_id": "train-0001", "outp')  # truncated
    assert "1/2 tasks done, 1 pending" in invoke("status", str(run)).output  # the runner would redo it
    assert json.loads(invoke("stats", str(run), "--json").output)["totals"]["tasks"] == 1
    result = CliRunner().invoke(cli, ["validate", str(run)])
    assert result.exit_code == 1 and "train-0001.json: unreadable manifest" in result.output


def test_export_ml_dr(finished_run, tmp_path):
    out = tmp_path / "mldr"
    result = invoke("export", "ml-dr", str(finished_run / "run"), str(out))
    assert "wrote 10 images, 40 augmentations" in result.output
    config = torch.load(out / "config.pth.tar", weights_only=False)
    assert config["reinforce"]["num_samples"] == 4
    index = json.loads((out / "index.json").read_text())
    i = next(i for i, key in index.items() if key == "img00000")
    record_index, records = torch.load(out / f"{i}.pth.tar", weights_only=False)
    assert record_index == int(i) and len(records) == 4 and len(records[0]["prob"][0]) == 3


def test_demo_runs_the_real_teacher_and_names_the_photos(tmp_path, local_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the demo recipe comes from the package
    result = invoke("demo", "--output", "demo")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ")}
    assert "teacher: tabby" in lines["chelsea_0"] or "teacher: tiger cat" in lines["chelsea_0"]
    assert "teacher: espresso" in lines["coffee_0"]
    assert "teacher: missile" in lines["rocket_0"]
    assert (tmp_path / "demo" / "run" / "shards" / "demo-000000.tar").exists()
