"""The deployment files in docker/ (no Docker engine or Kubernetes here): they parse, carry the fields
their tools require, install through docker/install.sh as CI does, and run recipes that exist and load."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from reinforge.products.registry import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _yaml(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _recipe_of(command: str):
    """The recipe a `reinforge run CONFIG [--set k=v ...]` command line runs, loaded as the CLI loads it."""
    args = shlex.split(command)
    assert args[:2] == ["reinforge", "run"], command
    config = ROOT / args[2]
    assert config.is_file() and config.parent == ROOT / "configs", f"{args[2]} is not a recipe in configs/"
    overrides = tuple(args[i + 1] for i, a in enumerate(args) if a == "--set")
    return load_recipe(config.read_text(), overrides)


def _header_command(name: str) -> str:
    """The `reinforge run ...` command a file's header comment tells users to run (continuation lines joined)."""
    header = "\n".join(line for line in (DOCKER / name).read_text().splitlines() if line.startswith("#"))
    joined = re.sub(r"\\\n#\s*", " ", header)
    return " ".join(re.search(r"(reinforge run [^'\n]+)", joined).group(1).split())


def _quantity(value) -> float:
    return float(str(value).removesuffix("m")) / (1000 if str(value).endswith("m") else 1)


def test_rayjob_has_what_kuberay_v1_requires_and_runs_a_real_recipe():
    job = _yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == version("ray"), "rayVersion must match the image's Ray"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        # KubeRay passes rayStartParams as `ray start --key=value`: a map of strings
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group["rayStartParams"]
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] and c["resources"]["limits"] for c in containers)
    workers = cluster["workerGroupSpecs"]
    assert all(w["groupName"] and w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] for w in workers)

    recipe = _recipe_of(spec["entrypoint"])
    assert recipe.output.startswith("s3://")
    assert "--address auto" in spec["entrypoint"]
    # the recipe's actors fit the GPU pods: the pool would otherwise be empty
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert recipe.resources.gpus_per_actor > 0
    assert recipe.resources.gpus_per_actor <= _quantity(limits["nvidia.com/gpu"])
    assert recipe.resources.cpus_per_actor <= _quantity(limits["cpu"])


def test_cluster_launcher_yaml_installs_with_install_sh():
    launcher = _yaml("cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert launcher[key], key
    assert launcher["provider"]["type"] and launcher["head_node_type"] in launcher["available_node_types"]
    for name, node_type in launcher["available_node_types"].items():
        assert "node_config" in node_type and "resources" in node_type, name
    workers = [t for n, t in launcher["available_node_types"].items() if n != launcher["head_node_type"]]
    assert workers and all(t["min_workers"] <= t["max_workers"] <= launcher["max_workers"] for t in workers)
    assert any("docker/install.sh" in c for c in launcher["setup_commands"])
    assert any("ray start --head" in c for c in launcher["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in launcher["worker_start_ray_commands"])
    # the submit command in its header runs a real recipe
    assert _recipe_of(_header_command("cluster.yaml")).resources.gpus_per_actor > 0


def test_compose_runs_a_head_and_two_workers_sharing_runs():
    compose = _yaml("compose.yaml")
    head, worker = compose["services"]["head"], compose["services"]["worker"]
    assert "--head" in head["command"] and "--port=6379" in head["command"]
    assert "--address=head:6379" in worker["command"] and worker["deploy"]["replicas"] == 2
    for service in (head, worker):
        assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["volumes"] == ["../runs:/opt/reinforge/runs"]  # one shared folder, same path everywhere
        assert service["environment"]["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in service["environment"]
    assert worker["depends_on"]["head"]["condition"] == "service_healthy"
    recipe = _recipe_of(_header_command("compose.yaml"))  # its header's run: a CPU recipe, output in the volume
    assert recipe.resources.gpus_per_actor == 0 and recipe.output.startswith("/opt/reinforge/runs/")


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_install_as_ci_does(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} is missing"
    assert "RUN bash docker/install.sh" in text
    # install.sh's own torch pair (the one CI tests) unless a build arg says otherwise
    assert re.search(r"^ARG TORCH_SPEC$", text, re.M) and not re.search(r"TORCH_SPEC=", text.split("ARG TORCH_SPEC")[1])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = re.search(r"EXTRAS=(\S+)", text).group(1).split(",")
    assert set(wanted) <= set(extras), wanted
    # Ray refuses nodes whose Python differs from the head's: both images share one exact base, CI's minor
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+)\.(\d+)\.\d+-\S+$", text, re.M)
    cpu_base = re.search(r"^ARG PYTHON_IMAGE=.*$", (DOCKER / "Dockerfile.cpu").read_text(), re.M)
    assert base and base.group(0) == cpu_base.group(0)
    assert (int(base.group(1)), int(base.group(2))) == sys.version_info[:2]


def test_install_script_is_the_makefiles_and_parses():
    assert "bash docker/install.sh" in (ROOT / "Makefile").read_text()
    assert subprocess.run(["bash", "-n", str(DOCKER / "install.sh")]).returncode == 0
