"""Losing workers mid-run. A real multi-process Ray cluster (a head and two worker nodes started with
`ray start` as separate processes; the head has no CPUs, so tasks run on the workers only) runs a recipe
through the CLI with `--address` while one worker node is SIGKILLed, raylet first, and finishes without
a rerun; on the embedded Ray, one actor process is SIGKILLed mid-task. Either way the output equals a
single-node run byte for byte, with no task lost or duplicated."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_input_shards, shard_bytes, tiny_recipe

from reinforge.runtime.ray_session import offline_ray_env
from reinforge.runtime.runner import run_recipe
from reinforge.products.registry import parse_recipe
from reinforge.io.manifest import TMP_MARKER
from reinforge.formats.wds import iter_samples

pytestmark = pytest.mark.ray

SHARDS, PER_SHARD = 10, 4  # tasks long enough (about a second each) to kill a node mid-task
RAY = str(Path(sys.executable).parent / "ray")
REINFORGE = str(Path(sys.executable).parent / "reinforge")
# Node death is noticed by the GCS health check; the defaults (about 15 s) only make the test slower.
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000",
                "RAY_health_check_failure_threshold": "5"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_table() -> dict[tuple[int, str], tuple[int, str]]:
    """(pid, start time) -> (parent pid, command line) of every process; the start time tells a reused pid apart."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rpartition(")")[2].split()
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            table[(int(entry), fields[19])] = (int(fields[1]), cmd)
    return table


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RayNodes:
    """Ray nodes on this machine, each with its own --temp-dir (Ray allows one per node). A node's daemons
    name that dir on their command line; its workers and agents retitle themselves (ray::IDLE), so they are
    found as descendants of those daemons and remembered, since they outlive a killed raylet for a while.
    Stopping kills only these: `ray stop` would kill every Ray on the machine, other test runs included."""

    def __init__(self):
        # short: Ray's unix socket paths live under the temp dir and must stay below ~107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="rf-cluster-"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray >= 2.59 turns token auth on for local clusters: every node and the driver share one token
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.seen: dict[tuple[int, str], str] = {}  # (pid, start time) -> node

    def start(self, name: str, num_cpus: int = 1) -> None:
        head = name == "head"
        args = [RAY, "start", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
                "--disable-usage-stats", "--object-store-memory", str(100 * 2**20), "--temp-dir", str(self.root / name)]
        if head:
            args += ["--head", "--port", str(self.port), "--include-dashboard=false"]
        else:  # nodes on one machine need their own agent port (the default, 52365, is per machine)
            args += ["--address", self.address, "--dashboard-agent-listen-port", str(_free_port())]
        with offline_ray_env():
            env = {**os.environ, **self.env, **HEALTH_CHECK}
        started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
        self.pids()
        assert started.returncode == 0, f"ray start {name} failed:\n{started.stdout}\n{started.stderr}"

    def pids(self, name: str = "", program: str = "") -> list[int]:
        """Live processes of node `name` (all nodes if empty), optionally only those running `program`."""
        table = _process_table()
        children: dict[int, list[tuple[int, str]]] = {}
        for proc, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(proc)
        nodes = [str(d) for d in self.root.iterdir()]
        roots = [(p, Path(n).name) for p, (_, cmd) in table.items() for n in nodes if n + "/" in cmd]
        todo = roots + [(p, n) for p, n in self.seen.items() if p in table]
        while todo:
            proc, node = todo.pop()
            self.seen.setdefault(proc, node)
            todo.extend((child, node) for child in children.get(proc[0], []) if child not in self.seen)
        live = [(proc, node) for proc, node in self.seen.items() if proc in table and (not name or node == name)]
        return [proc[0] for proc, _ in live if not program or Path(table[proc][1].split(" ", 1)[0]).name == program]

    def stop(self) -> None:
        """`ray stop --force`, scoped to this cluster's processes."""
        for _ in range(3):  # a dying raylet may still spawn a worker
            _kill(self.pids())
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_input_shards(tmp_path_factory.mktemp("inputs"), shards=SHARDS, per_shard=PER_SHARD)


def _recipe(inputs, out) -> dict:
    return tiny_recipe(inputs, out, augmentation__num_samples=24)


@pytest.fixture(scope="module")
def single_node_run(inputs, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("single") / "run"
    summary = run_recipe(parse_recipe(_recipe(inputs, out)), progress=False)
    assert summary.ok and summary.done == SHARDS and summary.samples == SHARDS * PER_SHARD
    return out


@pytest.fixture(scope="module")
def cluster():
    import ray
    ray.shutdown()  # the two cores are the cluster's now
    nodes = RayNodes()
    try:
        nodes.start("head", num_cpus=0)  # no actor can land on the head: losing w1 leaves w2 alone to finish
        for name in ("w1", "w2"):
            nodes.start(name)
        yield nodes
    finally:
        nodes.stop()


def _cli(*args: str) -> list[str]:
    return [REINFORGE, *args]


def _keys(run_dir: Path) -> dict[str, list[str]]:
    keys = {}
    for name in sorted(n for n in os.listdir(run_dir / "shards") if n.endswith(".tar")):  # not the loader files
        with open(run_dir / "shards" / name, "rb") as f:
            keys[name] = [s["__key__"] for s in iter_samples(f)]
    return keys


def _writers(out: Path) -> dict[int, str]:
    """Once some task is done: pid -> task of the actors writing a shard now (temp files carry both)."""
    if not (out / "manifests").exists() or not os.listdir(out / "manifests"):
        return {}
    temps = [n.removeprefix(TMP_MARKER).rsplit(".", 2) for n in os.listdir(out / "shards") if n.startswith(TMP_MARKER)]
    return {int(pid): shard.removesuffix(".tar") for shard, pid, _ in temps}


def _worker(out: Path, task: str) -> dict:
    return json.loads((out / "manifests" / f"{task}.json").read_text())["worker"]


def _finished_by(out: Path, pids: set[int]) -> bool:
    """Whether one of `pids` has finished a task (its manifest names the worker's pid)."""
    names = os.listdir(out / "manifests") if (out / "manifests").exists() else []
    return any(_worker(out, n.removesuffix(".json"))["pid"] in pids for n in names
               if n.endswith(".json") and not n.startswith(TMP_MARKER))


def test_killed_actor_process_mid_task_is_replaced(inputs, single_node_run, local_ray, tmp_path):
    """A worker process dies (OOM killer, segfault): its tasks go to the live actor, Ray restarts it."""
    out = tmp_path / "run"
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(
        summary=run_recipe(parse_recipe(_recipe(inputs, out)), progress=False)))
    run.start()
    deadline = time.time() + 150
    while time.time() < deadline and run.is_alive() and not _writers(out):
        time.sleep(0.02)
    victim, lost_task = min(_writers(out).items(), default=(None, None))
    assert victim is not None, "the kill should land mid-task"
    os.kill(victim, signal.SIGKILL)
    run.join(timeout=150)
    assert not run.is_alive(), "the run hangs after losing a worker process"
    summary = result["summary"]
    assert summary.ok and summary.done == SHARDS and summary.samples == SHARDS * PER_SHARD
    assert _worker(out, lost_task)["pid"] != victim, "the lost task was redone by another worker"
    assert subprocess.run(_cli("gc", str(out)), capture_output=True).returncode == 0
    assert shard_bytes(out) == shard_bytes(single_node_run)


def test_embedded_ray_stays_its_own_on_a_cluster_node(cluster, monkeypatch):
    """Where `ray start` ran (a launcher node, the compose head), ray.init() would join that cluster and
    refuse the embedded Ray's sizes; a run without --address must still get a Ray of its own."""
    import ray

    from reinforge.runtime.ray_session import start_local_ray
    tmp = Path(tempfile.mkdtemp(prefix="rf-tmp-"))  # short: Ray's socket paths live under it
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text(cluster.address)  # what `ray start` leaves behind
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    try:
        start_local_ray(num_cpus=1, object_store_memory_mb=100)
        assert ray.get_runtime_context().gcs_address != cluster.address
        assert len(ray.nodes()) == 1
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_kill_a_worker_nodes_raylet_mid_run(inputs, single_node_run, cluster, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(_recipe(inputs, out)))
    command = _cli("run", str(config), "--address", cluster.address, "--no-progress")
    env = {**os.environ, **cluster.env, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifests = out / "manifests"
    deadline = time.time() + 150
    def w1_busy() -> bool:  # w1 finished a task and is writing the next: the kill lands mid-task, after w1 did work
        w1 = set(cluster.pids("w1"))
        return bool(_writers(out).keys() & w1) and _finished_by(out, w1)

    while time.time() < deadline and driver.poll() is None and not w1_busy():
        time.sleep(0.02)
    w1 = set(cluster.pids("w1"))
    lost = {task for pid, task in _writers(out).items() if pid in w1}
    assert driver.poll() is None, f"the run should still be going:\n{driver.communicate()[0][-3000:]}"
    raylets = cluster.pids("w1", "raylet")
    assert len(raylets) == 1, f"w1's raylet not found: {raylets}"
    # the node is lost with the tasks its actor holds: its raylet first, then the rest of it, as when the
    # machine goes away (a worker outlives its raylet long enough to finish its task on its own)
    os.kill(raylets[0], signal.SIGKILL)
    _kill(w1 - set(raylets))
    done_at_kill = len(os.listdir(manifests))
    assert done_at_kill < SHARDS, "the kill should land mid-run"
    try:
        log, _ = driver.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail(f"the run hangs after losing a node:\n{driver.communicate()[0][-3000:]}")
    # the tasks lost with w1 go back to the queue and w2's actor finishes them: no failed task, no rerun
    assert driver.returncode == 0, log[-4000:]
    assert f"tasks: {SHARDS} (0 already done, {SHARDS} run, 0 failed)" in log, log[-4000:]
    assert subprocess.run(_cli("gc", str(out)), env=env, capture_output=True).returncode == 0

    assert sorted(os.listdir(manifests)) == sorted(os.listdir(single_node_run / "manifests"))
    assert _keys(out) == _keys(single_node_run)
    assert shard_bytes(out) == shard_bytes(single_node_run)
    assert lost and all(_worker(out, task)["pid"] not in w1 for task in lost), "w1's task was redone elsewhere"
    workers = {json.loads((manifests / n).read_text())["worker"]["node_id"] for n in os.listdir(manifests)}
    assert len(workers) >= 2, "tasks should have run on more than one node"


def test_curation_passes_run_on_a_cluster_by_address(cluster, single_node_run, tmp_path):
    """`filter score`, `filter apply`, `splits` and `validate` given `--address` run their passes as Ray tasks
    on that cluster (here: processes of their own, started with `ray start`) and write what they write
    inline, byte for byte (validate: the same problems, found on the cluster's nodes)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pool_gen import random_uids, skewed_epochs
    from test_filter_stream import _pool
    from test_filters import make_pool, score_files

    from reinforge.curation.filters.decide import decide
    from reinforge.curation.filters.scores import ScoreOptions, score_metadata
    from reinforge.curation.time_splits import SplitOptions, build_splits
    from reinforge.ops.rundir import validate_run
    env = {**os.environ, **cluster.env, "HF_HUB_OFFLINE": "1"}

    def on_cluster(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(_cli(*args, "--address", cluster.address), env=env, capture_output=True, text=True,
                              timeout=300)

    make_pool(str(tmp_path / "meta"))
    score_metadata([str(tmp_path / "meta")], str(tmp_path / "scores-inline"), ScoreOptions(), 1, where="inline")
    done = on_cluster("filter", "score", str(tmp_path / "meta"), "--out", str(tmp_path / "scores"), "--unit-rows", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert score_files(tmp_path / "scores") == score_files(tmp_path / "scores-inline")

    (tmp_path / "stream").mkdir()
    _pool(tmp_path / "stream")
    rule = "top(clip_l14, 0.3) & words>=2"
    decide(str(tmp_path / "stream"), rule, str(tmp_path / "inline.npy"), unit_rows=1000, where="inline")
    done = on_cluster("filter", "apply", str(tmp_path / "stream"), "--rule", rule, "--out", str(tmp_path / "ray.npy"),
                      "--unit-rows", "1000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ray.npy").read_bytes() == (tmp_path / "inline.npy").read_bytes()

    rng = np.random.default_rng(0)
    strings, _, _ = random_uids(3000, rng)
    (tmp_path / "timed").mkdir()
    pq.write_table(pa.table({"uid": strings, "timestamp": skewed_epochs(3000, rng)}),
                   tmp_path / "timed" / "00000.parquet", row_group_size=500)
    build_splits([str(tmp_path / "timed")], str(tmp_path / "splits-inline"), SplitOptions(unit_rows=1000),
                 where="inline")
    done = on_cluster("splits", str(tmp_path / "timed"), "--out", str(tmp_path / "splits"), "--unit-rows", "1000")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in os.listdir(tmp_path / "splits-inline"):
        if name != "splits.json":  # it records the seconds taken
            assert (tmp_path / "splits" / name).read_bytes() == (tmp_path / "splits-inline" / name).read_bytes(), name

    run = tmp_path / "run"
    shutil.copytree(single_node_run, run)
    shard = sorted((run / "shards").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed: a sha256 problem
    shard.write_bytes(bytes(data))
    _, problems = validate_run(str(run), workers=1)
    done = on_cluster("validate", str(run))
    assert done.returncode == 1 and problems and all(p in done.stderr for p in problems), done.stderr[-3000:]
