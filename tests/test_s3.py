"""Object storage for real: runs, tools and readers on s3:// against an S3 API on loopback (moto's server
mode over HTTP, as s3fs tests itself), started here; nothing can reach real AWS (run inside
../shared/tools/offline; fake credentials; instance metadata off).

The embedded Ray is started before the endpoint is configured, so the workers see it only through
what reinforge passes them (ray_session.worker_env), as workers on a real cluster would.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import yaml
from conftest import make_input_shards, process_tree, tiny_recipe
from test_mobileclip_e2e import datacomp_shards, recipe as mobileclip_recipe, uid

from reinforge.runtime.runner import run_recipe
from reinforge.products.registry import parse_recipe
from reinforge.io.manifest import TMP_MARKER

pytest.importorskip("moto", reason="moto is not installed: `pip install -e '.[test]'` installs moto[server] and s3fs")

pytestmark = pytest.mark.ray

BUCKET = "reinforge-test"
S3 = f"s3://{BUCKET}"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1, a process of its own (killing a reinforge driver leaves it up)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"moto server did not start on {url}")
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def s3(moto_endpoint, ray_local):
    """The endpoint and fake credentials as a user sets them (environment variables), a fresh bucket, and
    a boto3 client on it. Ray is up first: its workers learn the endpoint only from reinforge."""
    import boto3
    import fsspec.config
    import ray
    import s3fs

    from reinforge.runtime.ray_session import start_local_ray
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory_mb=256)
    env = {**FAKE_AWS, "FSSPEC_S3_ENDPOINT_URL": moto_endpoint}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = json.loads(json.dumps(fsspec.config.conf))
    os.environ.update(env)
    fsspec.config.set_conf_env(fsspec.config.conf)  # what `import fsspec` does in a process started with them
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved_conf)
    s3fs.S3FileSystem.clear_instance_cache()


def keys(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def objects(client, prefix: str) -> dict[str, bytes]:
    """{key relative to prefix: bytes} of every object under prefix."""
    return {k[len(prefix):]: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys(client, prefix)}


def upload(client, folder, prefix: str) -> None:
    for name in sorted(os.listdir(folder)):
        client.upload_file(os.path.join(folder, name), BUCKET, f"{prefix}/{name}")


def client_uploads(client) -> list[str]:
    """Keys of unfinished multipart uploads."""
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]


def assert_no_temp_objects(client) -> None:
    leftovers = [k for k in keys(client) if TMP_MARKER in k.rpartition("/")[2]]
    assert leftovers == [], f"temporary objects left behind: {leftovers}"
    assert client_uploads(client) == [], "unfinished multipart uploads"


def cli(*args):
    from click.testing import CliRunner

    from reinforge.cli.main import cli as main
    return CliRunner().invoke(main, list(args))


ONE_ACTOR = {"num_actors": 1, "cpus_per_actor": 1, "object_store_memory_mb": 256}


def imagenet_recipe(output: str) -> dict:
    # one actor: tasks finish one after another, so the driver can be killed between two of them
    return tiny_recipe(f"{S3}/in/imagenet/train-*.tar", output, augmentation__num_samples=3, resources=ONE_ACTOR)


@pytest.fixture(scope="module")
def imagenet_run(s3, tmp_path_factory):
    """An ImageNet+ run read from and written to s3://, uninterrupted: the reference for the others."""
    local = tmp_path_factory.mktemp("s3-inputs")
    make_input_shards(local / "imagenet", shards=4, per_shard=2)
    upload(s3, local / "imagenet", "in/imagenet")
    out = f"{S3}/runs/imagenet"
    summary = run_recipe(parse_recipe(imagenet_recipe(out)), progress=False)
    assert summary.ok and summary.done == 4 and summary.samples == 8, summary
    return out


def test_imagenet_plus_on_s3_rerun_tools_and_reader(s3, imagenet_run, tmp_path):
    from reinforge.readers import ReinforcedImageNet
    again = run_recipe(parse_recipe(imagenet_recipe(imagenet_run)), progress=False)
    assert again.skipped == again.tasks == 4 and again.done == 0  # the rerun skips everything

    names = keys(s3, "runs/imagenet/")
    assert {f"runs/imagenet/shards/train-000{i}.tar" for i in range(4)} <= set(names)
    assert {f"runs/imagenet/manifests/train-000{i}.json" for i in range(4)} <= set(names)

    status = cli("status", imagenet_run)
    assert status.exit_code == 0 and "4/4 tasks done, 0 pending, 0 failed" in status.output, status.output
    stats = cli("stats", imagenet_run, "--json")
    assert stats.exit_code == 0 and json.loads(stats.output)["totals"]["samples_out"] == 8, stats.output
    valid = cli("validate", imagenet_run)
    assert valid.exit_code == 0 and "ok: 8 samples valid" in valid.output, valid.output
    report = cli("report", imagenet_run, "--out", f"{S3}/reports/imagenet")
    assert report.exit_code == 0, report.output
    assert b"reinforge report" in s3.get_object(Bucket=BUCKET, Key="reports/imagenet/index.html")["Body"].read()
    gc = cli("gc", imagenet_run)
    assert gc.exit_code == 0 and "0 orphaned temporary files removed" in gc.output, gc.output

    # the reader on the s3:// run directory gives what it gives on a local copy of it
    local = tmp_path / "copy"
    for key, data in objects(s3, "runs/imagenet/").items():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)
    remote, here = ReinforcedImageNet(imagenet_run, seed=1), ReinforcedImageNet(str(local), seed=1)
    assert remote.shards[0].startswith(f"{S3}/runs/imagenet/shards/")
    assert len(remote) == len(here) == 8 and remote.keys == here.keys
    for i in range(len(remote)):
        (view, target), (view2, target2) = remote[i], here[i]
        assert view.equal(view2) and target.equal(target2)
    import torch
    loader = torch.utils.data.DataLoader(remote, batch_size=4, num_workers=1)  # a forked worker reads s3:// too
    assert sum(len(target) for _, target in loader) == 8
    assert_no_temp_objects(s3)


def test_sigkilled_driver_then_rerun_is_byte_identical(s3, imagenet_run, moto_endpoint, tmp_path):
    """`reinforge run` as its own process, with credentials in ~/.aws/credentials (not the environment, so
    its Ray workers, which get a private HOME, find them only through ray_session's HOME_FILES): killed
    with SIGKILL (driver, Ray and workers at once) once a task manifest exists; a rerun finishes the rest,
    and every object equals the uninterrupted run's."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_access_key_id = testing\n"
                                               "aws_secret_access_key = testing\n")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", FSSPEC_S3_ENDPOINT_URL=moto_endpoint,
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    out = f"{S3}/runs/killed"
    s3.put_object(Bucket=BUCKET, Key="recipes/killed.yaml", Body=yaml.safe_dump(imagenet_recipe(out)).encode())
    command = [sys.executable, "-m", "reinforge.cli.main", "run", f"{S3}/recipes/killed.yaml", "--no-progress"]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not keys(s3, "runs/killed/manifests/"):
        time.sleep(0.05)
    for pid in process_tree(proc.pid):  # as on a lost machine: everything at once, mid-task
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = proc.communicate()[0].decode(errors="replace")
    done_before = len(keys(s3, "runs/killed/manifests/"))
    assert 1 <= done_before < 4, f"the kill should land mid-run, {done_before} of 4 tasks were done:\n{output}"

    rerun = run_recipe(parse_recipe(imagenet_recipe(out)), progress=False)  # here: saves starting another Ray
    assert rerun.ok and (rerun.skipped, rerun.done) == (done_before, 4 - done_before), rerun

    reference, resumed = objects(s3, "runs/imagenet/"), objects(s3, "runs/killed/")
    data = [k for k in reference if k.startswith(("shards/", "errors/")) or k == "dr_config.json"]
    assert len([k for k in data if k.endswith(".tar")]) == 4
    assert {k: resumed.get(k) for k in data} == {k: reference[k] for k in data}  # byte-identical
    assert sorted(k for k in resumed if k.startswith(("shards/", "errors/"))) == sorted(
        k for k in data if k != "dr_config.json")  # and nothing else there
    for name in (k for k in reference if k.startswith("manifests/")):  # manifests: the same outputs (not timings)
        assert json.loads(resumed[name])["outputs"] == json.loads(reference[name])["outputs"]
    assert_no_temp_objects(s3)


@pytest.fixture(scope="module")
def datacomp_pool(s3, tmp_path_factory):
    local = tmp_path_factory.mktemp("s3-datacomp")
    datacomp_shards(local / "pool", shards=2, per_shard=4)
    upload(s3, local / "pool", "in/pool")
    return f"{S3}/in/pool/*.tar"


def test_mobileclip_join_reshard_and_reader_on_s3(s3, datacomp_pool, tmp_path):
    import open_clip
    import torch

    from reinforge.readers.mobileclip import MobileCLIPDRDataset
    from reinforge.formats.subset import make_subset, write_subset

    # MobileCLIP reinforcement-only shards (keep_images=false, as Apple publishes DataCompDR), s3 -> s3
    dr = f"{S3}/runs/dr"
    dr_recipe = mobileclip_recipe(datacomp_pool, dr, keep_images=False, resources=ONE_ACTOR)
    summary = run_recipe(parse_recipe(dr_recipe), progress=False)
    assert summary.ok and summary.samples == 8, summary
    again = run_recipe(parse_recipe(dr_recipe), progress=False)
    assert again.skipped == again.tasks == 2 and again.done == 0

    # join them with the image pool, all on s3 (`reinforge join` builds this recipe)
    joined = f"{S3}/runs/joined"
    summary = run_recipe(parse_recipe({"product": "join", "output": joined, "input": {"path": f"{dr}/shards/*.tar"},
                                       "images": {"path": datacomp_pool}, "resources": ONE_ACTOR}), progress=False)
    assert summary.ok and summary.samples == 8 and summary.errors == 0, summary

    # reshard a subset (uids 1, 2, 5; uid 2 twice) of the pool, the subset file on s3 too (`reinforge reshard`)
    chosen = sorted(uid(i) for i in (1, 2, 5))
    subset = make_subset(np.array([int(u[:16], 16) for u in chosen], np.uint64),
                         np.array([int(u[16:], 16) for u in chosen], np.uint64))
    write_subset(f"{S3}/subsets/three.npy", subset, np.array([1 if u != uid(2) else 2 for u in chosen], np.uint32))
    resharded = f"{S3}/runs/reshard"
    summary = run_recipe(parse_recipe({"product": "reshard", "output": resharded, "subset": f"{S3}/subsets/three.npy",
                                       "input": {"path": datacomp_pool}, "samples_per_shard": 2,
                                       "resources": ONE_ACTOR}), progress=False)
    assert summary.ok and summary.samples == 4, summary
    assert json.loads(s3.get_object(Bucket=BUCKET, Key="runs/reshard/shards/sizes.json")["Body"].read()) == {
        "00000000.tar": 2, "00000001.tar": 2}

    for run, samples in ((dr, 8), (joined, 8), (resharded, 4)):
        valid = cli("validate", run)
        assert valid.exit_code == 0 and f"ok: {samples} samples valid" in valid.output, (run, valid.output)
        status = cli("status", run)
        assert status.exit_code == 0 and "0 pending, 0 failed" in status.output, status.output
    report = cli("report", joined, "--out", str(tmp_path / "report"))
    assert report.exit_code == 0 and (tmp_path / "report" / "index.html").exists(), report.output

    # the trainer's reader on the s3:// run directory, and on an s3:// brace pattern of its shards
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ds = MobileCLIPDRDataset(joined, tokenizer)
    assert ds.num_samples == 8 and ds.urls[0] == f"{joined}/shards/00000000.tar"
    items = list(ds)
    assert sorted(it["uid"] for it in items) == sorted(uid(i) for i in range(8)) and ds.skipped == {}
    by_pattern = MobileCLIPDRDataset(f"{joined}/shards/{{00000000..00000001}}.tar", tokenizer,
                                     image_augmentation=ds.config["reinforce"]["image_augmentation"])
    for a, b in zip(items, by_pattern):
        assert a["uid"] == b["uid"] and a["image"].equal(b["image"]) and a["image_emb"].equal(b["image_emb"])
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2))
    assert sum(len(b["uid"]) for b in batches) == 8
    assert_no_temp_objects(s3)


def test_failed_writes_leave_nothing_and_missing_buckets_are_not_created(s3, monkeypatch):
    import fsspec.config
    import s3fs

    from reinforge.io.storage import atomic_open, exists, write_bytes
    url = f"{S3}/scratch/partial.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(url) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("boom")
    assert not exists(url) and keys(s3, "scratch/") == []
    write_bytes(url, b"old")
    with pytest.raises(RuntimeError):  # a failed rewrite keeps what was there, as a local rename does
        with atomic_open(url) as f:
            f.write(b"new")
            raise RuntimeError("boom")
    assert s3.get_object(Bucket=BUCKET, Key="scratch/partial.bin")["Body"].read() == b"old"

    # large outputs go up as multipart uploads (S3's smallest part here): aborted on failure, completed on success
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf["s3"], "default_block_size": 5 * 2**20})
    s3fs.S3FileSystem.clear_instance_cache()
    big = bytes(range(256)) * (11 * 2**12)  # 11 MiB: two full parts and a tail
    with pytest.raises(RuntimeError):
        with atomic_open(f"{S3}/scratch/big.bin") as f:
            f.write(big)  # two parts are uploaded here
            raise RuntimeError("boom")
    assert keys(s3, "scratch/big") == []
    with atomic_open(f"{S3}/scratch/big.bin") as f:
        f.write(big)
    assert s3.get_object(Bucket=BUCKET, Key="scratch/big.bin")["Body"].read() == big
    assert client_uploads(s3) == []
    s3fs.S3FileSystem.clear_instance_cache()

    with pytest.raises(FileNotFoundError):
        write_bytes("s3://no-such-bucket-here/run/run.json", b"{}")
    assert "no-such-bucket-here" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    for key in keys(s3, "scratch/"):
        s3.delete_object(Bucket=BUCKET, Key=key)
