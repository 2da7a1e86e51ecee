"""The command line: one clear line and exit code 2 for user errors; the run-directory commands."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import jpeg_bytes, make_input_shards, photo, tiny_recipe, tree_state, write_shard

from reinforge.cli.main import cli
from reinforge.cli.ops import watch_status

pytestmark = pytest.mark.ray


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_local):
    import ray

    from reinforge.runtime.ray_session import start_local_ray
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
    assert "2/2 tasks done, 0 pending, 0 failed" in status.output and status.exit_code == 0
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
    status = CliRunner().invoke(cli, ["status", str(run)])
    assert "1/2 tasks done, 1 pending" in status.output and status.exit_code == 3  # the runner would redo it
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


def test_status_help_documents_exit_codes():
    text = invoke("status", "--help").output
    assert all(line in text for line in ("0  every task done", "1  some task failed", "3  incomplete"))


@pytest.mark.parametrize("state, failed, code", [("finished", 0, 0), ("finished", 1, 1), ("interrupted", 0, 3),
                                                 ("interrupted", 2, 1), ("starting", 0, 3), ("running", 0, 3)])
def test_watch_exit_codes_and_a_stale_start(finished_run, tmp_path, state, failed, code):
    """A driver killed while starting leaves "starting" for good: --watch gives up on it as on "running"."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text((finished_run / "run" / "run.json").read_text())
    status = json.loads((finished_run / "run" / "status.json").read_text())
    status["state"] = state
    status["tasks"]["failed"] = failed
    (run / "status.json").write_text(json.dumps(status))
    lines: list[str] = []
    assert watch_status(str(run), 0.05, lines.append, stale_after=0.3) == code
    assert ("no update" in lines[-1]) == (state in ("starting", "running"))


def test_live_status_is_what_the_runner_wrote_or_a_named_refusal(finished_run, tmp_path):
    """status.json has one reader (report and --watch use it): the runner's record as written, None before
    there is one, ValueError naming the file for a foreign one (a field missing, not a number)."""
    from reinforge.io.runs import live_status
    run = finished_run / "run"
    assert live_status(str(run)) == json.loads((run / "status.json").read_text())
    assert live_status(str(tmp_path)) is None
    written = json.loads((run / "status.json").read_text())
    for foreign in ({"state": "running"}, {**written, "tasks": {"total": 2}}, {**written, "samples_per_second": "x"}):
        (tmp_path / "status.json").write_text(json.dumps(foreign))
        with pytest.raises(ValueError, match=r"status\.json: not a run status"):
            live_status(str(tmp_path))


def bad_sample_shard(path, **members) -> str:
    write_shard(path, [("k0", {"jpg": jpeg_bytes(photo(0)), "cls": b"1", "json": b"{}",
                               "paug.json": b'{"param_aug": [{}]}', **members})])
    return str(path)


@pytest.mark.parametrize("members, message", [
    ({"prob.npz": b"not an npz"}, "sample k0: unreadable: BadZipFile"),
    ({"prob.npz": b"x", "paug.json": b"{"}, "sample k0: Expecting property name"),
])
def test_inspect_reports_a_bad_sample_in_one_line(tmp_path, members, message):
    """A sample that fails its schema is refused in one line with its reason (exit 1), as validate lists it."""
    shard = bad_sample_shard(tmp_path / "bad.tar", **members)
    result = subprocess.run([sys.executable, "-m", "reinforge.cli.main", "inspect", shard],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"refused: schema: {message}") and len(result.stderr.splitlines()) == 1
    assert result.stdout.startswith("key: k0")  # what could be read is still shown


def test_inspect_reports_a_truncated_shard_in_one_line(tmp_path):
    shard = tmp_path / "cut.tar"
    bad_sample_shard(shard)
    shard.write_bytes(shard.read_bytes()[:700])
    result = subprocess.run([sys.executable, "-m", "reinforge.cli.main", "inspect", str(shard)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {shard}: unreadable tar: ReadError: " \
                                                               "unexpected end of data"


def good_samples(first: int, n: int) -> list:
    return [(f"img{i:05d}", {"jpg": jpeg_bytes(photo(i, 48)), "cls": str(i % 10).encode()})
            for i in range(first, first + n)]


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory, ray_local):
    """Two good shards and one whose bad samples pass the error budget (3 of 5 > 0.5): run exits 1."""
    import ray

    from reinforge.runtime.ray_session import start_local_ray
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory_mb=256)
    return make_failing_run(tmp_path_factory.mktemp("failing"))


def make_failing_run(root):
    """In root: in/ (two good shards, one with 3 bad of 5 samples), recipe.yaml, run/; the CLI's result."""
    (root / "in").mkdir()
    write_shard(root / "in" / "a-0.tar", good_samples(0, 2))
    write_shard(root / "in" / "a-1.tar", good_samples(2, 2))
    bad = [(f"bad{i}", {"jpg": b"not a jpeg", "cls": b"1"}) for i in range(3)]
    write_shard(root / "in" / "b-0.tar", good_samples(4, 2) + bad)
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe(str(root / "in" / "*.tar"), root / "run")))
    return root, CliRunner().invoke(cli, ["run", str(config), "--no-progress"], catch_exceptions=False)


def test_run_summary_counts_the_samples_of_failed_tasks(failing_run):
    _, result = failing_run
    assert result.exit_code == 1, result.output
    assert "tasks: 3 (0 already done, 2 run, 1 failed)" in result.output
    assert "samples written: 4, skipped with errors in finished tasks: 0" in result.output
    assert "failed tasks: 1, nothing written for them: 5 samples read before they failed (3 with errors)" \
        in result.output
    assert "FAILED b-0: error budget exceeded: 3/5 samples skipped (max_error_fraction=0.5): " \
           "decode/corrupt_image=3" in result.output


def test_status_of_failed_tasks_exits_1_and_says_why(failing_run):
    root, _ = failing_run
    before = tree_state(root / "run")
    status = CliRunner().invoke(cli, ["status", str(root / "run")])
    assert status.exit_code == 1
    assert "2/3 tasks done, 0 pending, 1 failed" in status.output
    assert "failed  b-0: error budget exceeded: 3/5 samples skipped" in status.output
    assert "[5 samples read, 3 with errors]" in status.output
    assert "errors  b-0: 3 skipped samples in errors/b-0.jsonl" in status.output
    assert tree_state(root / "run") == before, "status must not write into the run directory"


def test_changed_inputs_are_reported_refused_then_redone(local_ray, tmp_path):
    """A shard replaced under its name: status/validate report it, a rerun refuses it unless told to redo
    it. A manifest without a fingerprint (older reinforge) is not checked, so never reported as changed."""
    root = tmp_path  # a run of its own: this test rewrites inputs and reruns, the shared fixture stays as it is
    assert make_failing_run(root)[1].exit_code == 1
    run, config = root / "run", str(root / "recipe.yaml")
    old = json.loads((run / "manifests" / "a-0.json").read_text())
    del old["input_fingerprint"]
    (run / "manifests" / "a-0.json").write_text(json.dumps(old))
    for name, first in (("a-0", 10), ("a-1", 12)):
        write_shard(root / "in" / f"{name}.tar", good_samples(first, 3))
    (root / "in" / "b-0.tar").unlink()  # fixed by removing it: no longer planned

    before = tree_state(run)
    status = CliRunner().invoke(cli, ["status", str(run)])
    assert status.exit_code == 3, status.output
    assert "1/2 tasks done, 0 pending, 0 failed, 0 from an older recipe, 1 with changed inputs" in status.output
    assert "changed a-1: input size=" in status.output and "changed a-0" not in status.output
    assert "1 done task(s) have no input fingerprint" in status.output
    validate = CliRunner().invoke(cli, ["validate", str(run)])
    assert validate.exit_code == 1 and "INVALID a-1: input changed since the task ran" in validate.output
    assert "a-0: input" not in validate.output
    assert tree_state(run) == before, "status and validate must not write into the run directory"

    refused = CliRunner().invoke(cli, ["run", config, "--no-progress"])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "inputs of 1 finished task(s) changed" in refused.output and "a-1: size=" in refused.output
    assert "--redo-changed-inputs" in refused.output
    redo = CliRunner().invoke(cli, ["run", config, "--no-progress", "--redo-changed-inputs"])
    assert redo.exit_code == 0, redo.output
    assert "tasks: 2 (1 already done, 1 run, 0 failed)" in redo.output
    assert "redone because their inputs changed: a-1" in redo.output
    assert CliRunner().invoke(cli, ["status", str(run)]).exit_code == 0
    assert CliRunner().invoke(cli, ["validate", str(run)]).exit_code == 0


def test_a_failed_start_leaves_the_run_interrupted_not_starting(local_ray, tmp_path):
    """Actors that cannot load their models: status.json must not claim "starting" for ever."""
    import ray

    from reinforge.runtime.runner import run_recipe
    from reinforge.products.registry import parse_recipe
    write_shard(tmp_path / "a-0.tar", good_samples(0, 1))
    recipe = tiny_recipe(str(tmp_path / "a-0.tar"), tmp_path / "run")
    recipe["teachers"][0]["checkpoint"] = str(tmp_path / "missing.pth")
    with pytest.raises(ray.exceptions.RayActorError):
        run_recipe(parse_recipe(recipe), progress=False)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "interrupted"
    assert watch_status(str(tmp_path / "run"), 0.05, lambda line: None) == 3
