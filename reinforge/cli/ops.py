"""Operations commands: `report` (an HTML page about a run), `plan` (capacity planning from a real probe),
and the `status --watch` loop over RUN/status.json. Registered on the main group by reinforge.cli.main."""
from __future__ import annotations

import json
import time

import click

from reinforge.cli.common import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, load_recipe_file, user_errors

# --watch gives up when a starting or running run's status.json has not changed for this long (the driver
# rewrites it every 2 s in both states, model loading included)
STALE_AFTER_S = 60.0
LIVE_STATES = ("starting", "running")


@click.command()
@click.argument("run_dir")
@click.option("--out", default=None, help="folder for index.html and its PNGs (default: ./<run name>-report)")
@click.option("--max-samples", default=512, show_default=True, help="samples decoded from the shards for the product plots")
@user_errors
def report(run_dir, out, max_samples):
    """Self-contained HTML report of a run: throughput, task durations, errors, product statistics."""
    from reinforge.ops.report import build_report
    out = out or f"{run_dir.rstrip('/').rpartition('/')[2] or 'run'}-report"
    click.echo(f"report: {build_report(run_dir, out, max_samples)}")


@click.command()
@click.argument("config")
@click.option("--samples", "-n", type=int, required=True, help="input samples to plan for")
@click.option("--nodes", type=int, default=1, show_default=True, help="nodes like the one the probe runs on")
@click.option("--probe-samples", type=int, default=None, help="samples the probe runs (default: 2 x augmentation.samples_per_batch)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="dotted override, as for run")
@click.option("--address", default=None, help="Ray cluster address; default RAY_ADDRESS or an embedded local Ray")
@click.option("--workdir", default=None, help="folder for the probe's input and run, kept (default: a local temp "
                                              "folder, removed); with --address, one every node can read")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def plan(config, samples, nodes, probe_samples, overrides, address, workdir, as_json):
    """Measure the recipe on a few samples here, then print wall time, storage and bottleneck for N samples."""
    from dataclasses import asdict

    from reinforge.ops.plan import plan_capacity
    result = plan_capacity(load_recipe_file(config, overrides), samples, nodes, probe_samples, address, workdir)
    if as_json:
        click.echo(json.dumps({**asdict(result), "bottleneck": result.bottleneck, "storage_bytes": result.storage_bytes,
                               "wall_seconds": result.wall_seconds}, indent=1))
        return
    for line in result.lines():
        click.echo(line)


def status_line(status: dict) -> str:
    t = status["tasks"]
    when = time.strftime("%H:%M:%S", time.localtime(status["updated_at"]))
    actors = "; ".join(f"actor {a}: {', '.join(ids)}" for a, ids in sorted(status.get("actors", {}).items()))
    return (f"{when} {status['state']}: {t['done']}/{t['total']} tasks done, {t['running']} running, "
            f"{t['failed']} failed; {status['samples']} samples, {status['samples_per_second']:.2f}/s, "
            f"{status['errors']} errors" + (f"  [{actors}]" if actors else ""))


def final_exit_code(status: dict) -> int:
    if status["tasks"]["failed"]:
        return EXIT_FAILED
    return EXIT_OK if status["state"] == "finished" else EXIT_INCOMPLETE


def watch_status(run_dir: str, interval: float, echo=click.echo, stale_after: float = STALE_AFTER_S) -> int:
    """Print a line per change of RUN/status.json until the run is no longer starting or running. Returns
    the exit code (as `status`): 0 finished with every task done, 1 some task failed, 3 interrupted or gone
    stale (its driver stopped updating it, e.g. killed while starting or running)."""
    from reinforge.io.runs import live_status
    from reinforge.io.storage import exists
    from reinforge.ops.rundir import load_run
    layout, _ = load_run(run_dir)
    url = layout.status
    if not exists(url):
        echo(f"waiting for {url}")
    last, changed = None, time.monotonic()
    while True:
        try:
            status = live_status(layout.root)
        except ValueError:
            status = None  # written atomically, so only a foreign file is unreadable: keep waiting
        if status is not None and status.get("updated_at") != last:
            last, changed = status.get("updated_at"), time.monotonic()
            echo(status_line(status))
        if status is not None and status["state"] not in LIVE_STATES:
            return final_exit_code(status)
        if status is not None and time.monotonic() - changed > stale_after:
            echo(f"no update of {url} for {stale_after:.0f} s while {status['state']}: "
                 f"is the run's driver still alive?")
            return EXIT_INCOMPLETE
        time.sleep(interval)
