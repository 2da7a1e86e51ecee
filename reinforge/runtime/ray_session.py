"""Connecting to Ray: an existing cluster by address, or an embedded local one started (and stopped) here.

The embedded Ray must not reach the network: usage stats off, no dashboard UI, the node bound to
127.0.0.1, and no cloud-metadata probe. Ray's dashboard process asks 169.254.169.254 which cloud it
runs on unless $HOME/ray_bootstrap_config.yaml declares a local provider, so the Ray processes we
start get a private HOME that holds one (caches stay where they were via XDG_CACHE_HOME, and the AWS
credentials/config files and fsspec's config folder via their own variables, HOME_FILES).

Storage settings travel with the work: the driver's FSSPEC_* variables (e.g. FSSPEC_S3_ENDPOINT_URL)
and AWS client settings (WORKER_ENV) are given to every actor and task reinforge starts, as a Ray
runtime_env, so workers on other nodes (or a Ray started before they were set) use the same endpoint
and credentials as the driver. Only variables set on the driver are passed.
"""
from __future__ import annotations

import itertools
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

# AWS SDK settings s3fs/botocore read from the environment (credentials, region, endpoint, profile)
WORKER_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
              "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "AWS_EC2_METADATA_DISABLED")
WORKER_ENV_PREFIXES = ("FSSPEC_",)  # fsspec reads FSSPEC_<PROTOCOL>_<OPTION> as storage options at import


def worker_env() -> dict[str, str]:
    """The driver's storage settings that workers need to see the same storage (see WORKER_ENV)."""
    return {k: v for k, v in sorted(os.environ.items()) if k in WORKER_ENV or k.startswith(WORKER_ENV_PREFIXES)}


def worker_options() -> dict:
    """Options for `.options(...)` of every actor and task reinforge starts: the worker_env() runtime_env."""
    env = worker_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


# where the storage clients look under HOME, given to the Ray processes that get a private HOME
HOME_FILES = {"AWS_SHARED_CREDENTIALS_FILE": ".aws/credentials", "AWS_CONFIG_FILE": ".aws/config",
              "FSSPEC_CONFIG_DIR": ".config/fsspec"}
_BOOTSTRAP = "# written by reinforge: a local cluster, so Ray need not probe cloud metadata\nprovider: {type: local}\n"


@contextmanager
def offline_ray_env() -> Iterator[None]:
    """Environment for Ray processes started inside this block (local Ray, or ray.cluster_utils nodes)."""
    home = Path(tempfile.gettempdir()) / f"reinforge-ray-home-{os.getuid()}"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text(_BOOTSTRAP)
    real_home = os.path.expanduser("~")
    os.environ.setdefault("XDG_CACHE_HOME", os.path.join(real_home, ".cache"))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # the files the storage clients find through HOME stay the user's: ~/.aws, ~/.config/fsspec
    moved = {"HOME": str(home)}
    for name, default in HOME_FILES.items():
        if name not in os.environ:
            moved[name] = os.path.join(real_home, default)
    saved = {name: os.environ.get(name) for name in moved}
    os.environ.update(moved)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_local_ray(num_cpus: Optional[int] = None, object_store_memory_mb: int = 1024) -> None:
    import ray
    with offline_ray_env():
        # "local": a new Ray of our own even where `ray start` ran (a cluster node, a container's head),
        # which ray.init() would otherwise join, refusing the num_cpus/object store sizes given here
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=object_store_memory_mb * 2**20, _node_ip_address="127.0.0.1",
                 logging_level="WARNING", log_to_driver=True)


@contextmanager
def ray_session(address: Optional[str] = None, object_store_memory_mb: int = 1024) -> Iterator[str]:
    """Use the Ray already initialised in this process, else connect to `address`/RAY_ADDRESS, else
    start an embedded local Ray. Only what this function started is shut down on exit."""
    import ray
    if ray.is_initialized():
        yield "existing"
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
        mode = f"cluster {address}"
    else:
        start_local_ray(object_store_memory_mb=object_store_memory_mb)
        mode = "embedded local Ray"
    try:
        yield mode
    finally:
        ray.shutdown()


def map_groups(fn, per_group: Iterable[tuple], shared: tuple, parallel: bool):
    """fn(*group_args, *shared) for each group, in group order: Ray tasks (shared put once) or this process.
    At most twice the cluster's CPUs are in flight, so finished parts do not pile up in the object store
    while the caller consumes them in order. A task that failed on bad input (InputError) raises that
    error, not Ray's wrapper."""
    if not parallel:
        for args in per_group:
            yield fn(*args, *shared)
        return
    import ray
    from ray.exceptions import RayTaskError

    from reinforge.formats.sources import InputError
    remote = ray.remote(num_cpus=1)(fn).options(**worker_options())
    refs = [ray.put(x) for x in shared]
    todo = iter(per_group)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = [remote.remote(*args, *refs) for args in itertools.islice(todo, limit)]
    while pending:  # fixed order, whichever finishes first; a part is freed once merged
        try:
            part = ray.get(pending.pop(0))
        except RayTaskError as exc:
            if isinstance(exc.cause, InputError):
                raise exc.cause from None
            raise
        pending.extend(remote.remote(*args, *refs) for args in itertools.islice(todo, 1))
        yield part


def node_resources(node_id: str | None) -> dict:
    """The resources of the node that ran a task (its manifest says which), else the first alive node."""
    import ray
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive"):
            return dict(node.get("Resources", {}))
    alive = [n for n in ray.nodes() if n.get("Alive")] or [{"Resources": ray.cluster_resources()}]
    return dict(alive[0].get("Resources", {}))


INLINE_ROWS = 1 << 18  # the most rows a pass works on in the driver itself: past it, the driver only coordinates


def where_to_map(work_rows: int, inline_rows: int = INLINE_ROWS) -> str:
    """Where a TaskMap runs a pass over `work_rows` rows: on Ray when this process has one (or RAY_ADDRESS
    names a cluster), else inline when the pass is small enough for the driver to be its worker (`inline_rows`:
    fewer for wide rows), else on this machine's worker processes (the driver then holds what coordinates the
    tasks, not their rows). Results are the same bytes wherever they run."""
    if on_ray():
        return "ray"
    return "inline" if work_rows <= inline_rows else "processes"


def on_ray() -> bool:
    """Ray is up in this process, or RAY_ADDRESS names a cluster to join."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


class TaskMap:
    """map(fn, per_task, shared): fn(*task_args, *shared) for each task, in task order, inline, on Ray
    (map_groups), or on up to os.cpu_count() spawned worker processes of this machine, started at the
    first call and kept for every later one until close() (a pass's tasks wait for the previous pass)."""

    def __init__(self, where: str, width: Optional[int] = None):
        self.where, self._pool, self._ray = where, None, None
        self.width = width  # worker processes (default: one per CPU)

    def __call__(self, fn, per_task: Iterable[tuple], shared: tuple):
        if self.where == "ray" and self._ray is None:
            self._ray = ray_session()
            self._ray.__enter__()
        if self.where != "processes":
            return map_groups(fn, per_task, shared, self.where == "ray")
        return self._on_processes(fn, per_task, shared)

    def _on_processes(self, fn, per_task: Iterable[tuple], shared: tuple):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from reinforge.runtime.local_pool import plain_main
        width = self.width or os.cpu_count() or 1
        if self._pool is None:  # spawned workers start on demand: a pass of one task starts one process
            self._pool = ProcessPoolExecutor(width, multiprocessing.get_context("spawn"))

        def submit(args: tuple):
            with plain_main():  # a submit that finds no idle worker starts one
                return self._pool.submit(fn, *args, *shared)
        todo = iter(per_task)
        pending = [submit(args) for args in itertools.islice(todo, 2 * width)]
        while pending:
            part = pending.pop(0).result()
            pending.extend(submit(args) for args in itertools.islice(todo, 1))
            yield part

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._ray is not None:
            self._ray.__exit__(None, None, None)
            self._ray = None
