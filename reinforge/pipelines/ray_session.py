"""Connecting to Ray: an existing cluster by address, or an embedded local one started (and stopped) here.

The embedded Ray must not reach the network: usage stats off, no dashboard UI, the node bound to
127.0.0.1, and no cloud-metadata probe. Ray's dashboard process asks 169.254.169.254 which cloud it
runs on unless $HOME/ray_bootstrap_config.yaml declares a local provider, so the Ray processes we
start get a private HOME that holds one (caches stay where they were via XDG_CACHE_HOME).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

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
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved


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
