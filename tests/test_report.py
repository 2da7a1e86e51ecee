"""Run reports (HTML opened in headless Chromium) and the live status file / `status --watch`."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes, make_input_shards, photo, tiny_recipe, write_shard
from test_mobileclip_e2e import datacomp_shards
from test_mobileclip_e2e import recipe as dr_recipe

from reinforge.cli.ops import status_line, watch_status
from reinforge.ops.report import build_report
from reinforge.runtime.runner import run_recipe
from reinforge.products.registry import parse_recipe

pytestmark = pytest.mark.ray
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def cli(*args: str):
    from click.testing import CliRunner

    from reinforge.cli.main import cli as main
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def ip_run(tmp_path_factory, ray_local):
    """ImageNet+ on 2 actors: 3 shards of real photos, one with an undecodable image."""
    folder = tmp_path_factory.mktemp("ip_in")
    make_input_shards(folder, shards=3, per_shard=4)
    write_shard(folder / "train-0003.tar", [("broken", {"jpg": b"not a jpeg", "cls": b"1"}),
                                            ("fine", {"jpg": jpeg_bytes(photo(20)), "cls": b"2"})])
    out = tmp_path_factory.mktemp("ip") / "run"
    summary = run_recipe(parse_recipe(tiny_recipe(str(folder / "train-*.tar"), out)), progress=False)
    assert summary.ok and summary.done == 4 and summary.samples == 13 and summary.errors == 1
    return out


@pytest.fixture(scope="module")
def dr_run(tmp_path_factory, ray_local):
    inputs = datacomp_shards(tmp_path_factory.mktemp("dc") / "in", shards=1, per_shard=4)
    out = tmp_path_factory.mktemp("dr") / "run"
    assert run_recipe(parse_recipe(dr_recipe(inputs, out)), progress=False).ok
    return out


def test_status_json_after_a_run(ip_run):
    status = json.loads((ip_run / "status.json").read_text())
    assert status["state"] == "finished"
    assert status["tasks"] == {"total": 4, "done": 4, "skipped": 0, "failed": 0, "running": 0, "pending": 0}
    assert status["samples"] == 13 and status["errors"] == 1 and status["actors"] == {}
    assert status["samples_per_second"] > 0 and status["updated_at"] >= status["started_at"]


def test_rerun_rewrites_status_as_finished_with_everything_skipped(ip_run, tmp_path):
    run = tmp_path / "run"  # a copy: the rerun rewrites status.json, which other tests read as the first run left it
    shutil.copytree(ip_run, run)
    before = json.loads((run / "status.json").read_text())
    recipe = parse_recipe(json.loads((run / "run.json").read_text())["recipe"] | {"output": str(run)})
    assert run_recipe(recipe, progress=False).skipped == 4
    after = json.loads((run / "status.json").read_text())
    assert after["state"] == "finished" and after["tasks"]["skipped"] == 4 and after["tasks"]["done"] == 4
    assert after["updated_at"] > before["updated_at"]


def test_status_file_while_running_lists_each_actors_tasks_and_is_throttled(tmp_path):
    from reinforge.runtime.runner import Progress
    from reinforge.io.manifest import Task
    url = str(tmp_path / "status.json")
    live = Progress(total=7, initial=1, enabled=False, status_url=url)
    live.update({"status": "done", "samples_out": 7, "errors": 2})
    live.update({"status": "failed", "reason": "x", "samples_out": 0, "errors": 3})
    running = [(Task("t3", ()), 0), (Task("t4", ()), 1), (Task("t5", ()), 0)]
    live.write_status(running)
    status = json.loads(open(url).read())
    assert status["state"] == "running" and status["actors"] == {"0": ["t3", "t5"], "1": ["t4"]}
    assert status["tasks"] == {"total": 7, "done": 2, "skipped": 1, "failed": 1, "running": 3, "pending": 1}
    assert status["samples"] == 7 and status["errors"] == 5
    live.write_status(running[:1])  # within TICK_S of the last write: skipped
    assert json.loads(open(url).read()) == status
    live.write_status([], "finished")  # the final write always happens
    assert json.loads(open(url).read())["state"] == "finished"


def test_watch_returns_at_once_on_a_finished_run(ip_run):
    result = cli("status", str(ip_run), "--watch", "--interval", "30")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert lines == [status_line(json.loads((ip_run / "status.json").read_text()))]
    assert "finished: 4/4 tasks done, 0 running, 0 failed" in lines[0]


def test_watch_gives_up_on_a_status_that_stopped_changing(ip_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ip_run / "run.json", run / "run.json")
    status = json.loads((ip_run / "status.json").read_text())
    status.update(state="running", actors={"0": ["train-0001", "train-0002"]})
    status["tasks"].update(done=1, running=2, pending=1)
    (run / "status.json").write_text(json.dumps(status))
    lines: list[str] = []
    assert watch_status(str(run), 0.05, lines.append, stale_after=0.3) == 3  # incomplete
    assert "running: 1/4 tasks done, 2 running" in lines[0] and "actor 0: train-0001, train-0002" in lines[0]
    assert "no update" in lines[-1] and len(lines) == 2


def render(page: str, tmp_path) -> tuple[list, str]:
    """Open a copy of the page in headless Chromium; report every <img>'s decoded size, and screenshot it."""
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load',()=>{const p=document.createElement('pre');p.id='imgs';"
              "p.textContent=JSON.stringify([...document.images].map(i=>[i.alt,i.naturalWidth,i.naturalHeight]));"
              "document.body.appendChild(p)});</script></body>")
    probe.write_text(open(page).read().replace("</body>", script))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = json.loads(re.search(r'<pre id="imgs">(.*?)</pre>', dom).group(1).replace("&quot;", '"'))
    shot = tmp_path / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,3000", Path(page).as_uri()],
                   capture_output=True, timeout=120)
    return images, str(shot)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium; .ci/run does)")
def test_imagenet_plus_report_renders_in_chromium(ip_run, tmp_path):
    from PIL import Image

    from reinforge.formats.imagenet_plus import decode_sample
    from reinforge.formats.wds import iter_samples
    page = build_report(str(ip_run), str(tmp_path / "report"))
    text = open(page).read()
    for section in ("Throughput", "Tasks", "Errors", "Samples (imagenet_plus)"):
        assert f"<h2>{section}</h2>" in text
    assert "<td>decode</td><td>corrupt_image</td><td>1</td><td>broken</td>" in text  # reason, count, example key
    # sizes.png: every run now has shards/sizes.json (samples per shard, for open_clip)
    assert sorted(os.listdir(tmp_path / "report")) == ["errors.png", "imagenet_plus.png", "index.html", "sizes.png",
                                                      "tasks.png", "throughput.png"]
    confidences = []
    for name in sorted(n for n in os.listdir(ip_run / "shards") if n.endswith(".tar")):
        with open(ip_run / "shards" / name, "rb") as f:
            confidences += [v for s in iter_samples(f) for v in decode_sample(s).values[:, 0]]
    assert len(confidences) == 13 * 4
    assert f"<td>top-1 probability</td><td>{np.mean(confidences):.3f}</td>" in text

    images, shot = render(page, tmp_path)
    assert [alt for alt, _, _ in images] == ["throughput", "tasks", "errors", "imagenet_plus", "sizes"]
    for alt, width, height in images:
        png = Image.open(tmp_path / "report" / f"{alt}.png")
        assert (width, height) == png.size and width > 300, alt  # every plot decoded at its own size
    screenshot = np.asarray(Image.open(shot).convert("L"))
    assert screenshot.shape == (3000, 1200)
    rows_with_ink = (screenshot < 200).any(axis=1).sum()
    assert rows_with_ink > 1000  # plots, not a blank page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium; .ci/run does)")
def test_mobileclip_report_and_sizes(dr_run, tmp_path):
    from reinforge.curation.time_splits import SplitOptions, build_splits
    from reinforge.formats.subset import make_subset, write_subset
    page = build_report(str(dr_run), str(tmp_path / "dr"))
    text = open(page).read()
    assert "Samples (mobileclip_dr)" in text and "distinct-caption ratio (mean)" in text
    assert re.search(r"<td>embedding slice norms</td><td>[0-9.]+ \.\. [0-9.]+; 0 of 48 further than", text)
    # 4 samples x (3 augmentations + 1 caption + 2 synthetic) rows x 2 teachers, each slice unit-norm

    rng = np.random.default_rng(0)
    paths = []
    for year, n in (("2016", 30), ("2017", 50), ("2018", 20)):
        uids = np.sort(make_subset(rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)))
        paths.append(str(tmp_path / f"{year}.npy"))
        write_subset(paths[-1], uids)
    build_splits(paths, str(tmp_path / "splits"), SplitOptions(by="year", range="2016:2018"))
    page = build_report(str(tmp_path / "splits"), str(tmp_path / "sizes"))
    assert "sizes.json: " in open(page).read() and "100 in total" in open(page).read()
    images, _ = render(page, tmp_path)
    assert [alt for alt, w, _ in images if w > 300] == ["sizes"]


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    result = cli("report", str(tmp_path), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "neither a reinforge run directory" in result.output
