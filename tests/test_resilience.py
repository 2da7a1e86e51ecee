"""Exactly-once under failure: kill the driver mid-run and resume; two Ray nodes vs one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import make_input_shards, manifest_nodes, process_tree, shard_bytes, tiny_recipe, two_node_cluster

from reinforge.runtime.runner import run_recipe
from reinforge.products.registry import parse_recipe
from reinforge.io.manifest import TMP_MARKER

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_input_shards(tmp_path_factory.mktemp("inputs"), shards=8, per_shard=3)


@pytest.fixture(scope="module")
def single_node_run(inputs, tmp_path_factory, ray_local):
    import ray

    from reinforge.runtime.ray_session import start_local_ray
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory_mb=256)
    out = tmp_path_factory.mktemp("single") / "run"
    summary = run_recipe(parse_recipe(tiny_recipe(inputs, out, augmentation__num_samples=6)), progress=False)
    assert summary.ok and summary.samples == 24 and summary.done == 8
    return out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reinforge.cli.main", *args]


def test_kill_driver_mid_run_then_resume_is_byte_identical(inputs, single_node_run, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe(inputs, out, augmentation__num_samples=6)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_cli("run", str(config), "--no-progress"), env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifests = out / "manifests"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if manifests.exists() and any(not n.startswith(TMP_MARKER) for n in os.listdir(manifests)):
            break
        time.sleep(0.01)
    # the driver and everything it started die at once, mid-task, as on a lost machine
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(0.5)
    # committed manifests only: the kill may land while one is being written (its temporary file stays)
    done_before = len([n for n in os.listdir(manifests) if not n.startswith(TMP_MARKER)])
    assert 1 <= done_before < 8, f"the kill should land mid-run, {done_before} of 8 tasks were done"

    rerun = subprocess.run(_cli("run", str(config), "--no-progress"), env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"({done_before} already done, {8 - done_before} run, 0 failed)" in rerun.stdout
    gc = subprocess.run(_cli("gc", str(out)), env=env, capture_output=True, text=True)
    assert gc.returncode == 0
    leftovers = [n for d in ("shards", "manifests", "errors") if (out / d).exists()
                 for n in os.listdir(out / d) if n.startswith(TMP_MARKER)]
    assert leftovers == []
    assert shard_bytes(out) == shard_bytes(single_node_run)


def test_two_node_cluster_is_byte_identical_to_one_node(inputs, single_node_run, tmp_path):
    out = tmp_path / "run"
    with two_node_cluster() as address:
        summary = run_recipe(parse_recipe(tiny_recipe(inputs, out, augmentation__num_samples=6)), address=address,
                             progress=False)
    assert summary.ok and summary.samples == 24 and summary.done == 8
    assert len(manifest_nodes(out)) == 2, "both nodes should have run tasks"
    assert shard_bytes(out) == shard_bytes(single_node_run)
