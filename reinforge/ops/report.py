"""`reinforge report`: one self-contained HTML page about a run, built from its plain files (read-only).

Sources: the per-task manifests (started_at, seconds, per-stage counters and timings), errors/ and
failed/, status.json, a bounded sample of the shards that the product's own section reads
(products/<name>/report.py), and the sizes.json of resharded runs and time-split folders. Plots are matplotlib PNGs (Agg, no display),
written beside the page and inlined as data: URIs, so index.html alone is the whole report.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from reinforge.formats.wds import ShardReadError, iter_samples
from reinforge.io.manifest import RunLayout, TaskManifest
from reinforge.io.runs import NotARunError, live_status
from reinforge.io.storage import exists, filesystem, list_files, read_text, write_bytes
from reinforge.ops.rundir import load_run, manifests
from reinforge.products.registry import product_part

MAX_SAMPLES = 512  # samples decoded from the shards for the product plots
EXAMPLE_KEYS = 5


@dataclass
class Page:
    """Sections of HTML and the PNGs they show, in order."""
    title: str
    parts: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str] | None, rows: list[list]) -> None:
        head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.parts.append(f"<table>{head}{body}</table>")

    @staticmethod
    def subplots(width: float = 10, height: float = 3.6, ncols: int = 1):
        """A new figure and its row of `ncols` axes, for figure()."""
        from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot state, no display
        fig = Figure(figsize=(width, height), layout="constrained")
        return fig, fig.subplots(1, ncols, squeeze=False)[0]

    def figure(self, name: str, fig, caption: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})  # no version stamp: same bytes
        png = buf.getvalue()
        self.images[f"{name}.png"] = png
        data = base64.b64encode(png).decode()
        self.parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def html(self) -> str:
        style = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}"
                 "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
                 "font-size:13px;text-align:left}figure{margin:1em 0}img{max-width:100%}"
                 "figcaption{font-size:13px;color:#555}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.parts) + "</body></html>\n")


def build_report(root: str, out: str, max_samples: int = MAX_SAMPLES) -> str:
    """Write `out`/index.html (plots inlined) and the PNGs beside it; returns the page's URL."""
    root = root.rstrip("/")
    try:
        layout, run = load_run(root)
    except NotARunError:
        if not _sizes_file(root):
            raise NotARunError(f"{root} is neither a reinforge run directory (no run.json) nor a folder "
                               f"with sizes.json") from None
        layout, run = None, None
    page = Page(f"reinforge report: {root}")
    if layout is not None:
        done = manifests(layout)
        _overview(page, layout, run, done)
        _throughput(page, done)
        _tasks(page, done)
        _errors(page, layout)
        _product(page, layout, run, done, max_samples)
    _sizes(page, root)
    out = out.rstrip("/")
    for name, png in page.images.items():
        write_bytes(f"{out}/{name}", png)
    write_bytes(f"{out}/index.html", page.html().encode())
    return f"{out}/index.html"


def _overview(page: Page, layout: RunLayout, run: dict, done: list[TaskManifest]) -> None:
    page.heading("Run")
    current = [m for m in done if m.config_digest == run["config_digest"]]
    failed = list_files(layout.failed_dir, ".json")
    rows = [["product", run.get("product", "?")], ["config digest", run["config_digest"]],
            ["tasks done", len(current)], ["tasks from an older recipe", len(done) - len(current)],
            ["tasks failed", len(failed)],
            ["samples in / out", f"{sum(m.samples_in for m in current)} / {sum(m.samples_out for m in current)}"],
            ["skipped samples", sum(m.errors for m in current)],
            ["output bytes", f"{sum(o.bytes for m in current for o in m.outputs):,}"]]
    try:
        status = live_status(layout.root)
    except ValueError as exc:
        rows.append(["live status", f"unreadable status.json ({type(exc).__name__})"])
    else:
        if status is not None:
            rows.append(["live status", f"{status['state']}: {status['tasks']['done']}/{status['tasks']['total']} "
                                        f"tasks done, {status['samples_per_second']:.2f} samples/s"])
    if current:
        span = max(m.started_at + m.seconds for m in current) - min(m.started_at for m in current)
        rows.append(["task wall span", f"{span:.1f} s ({sum(m.samples_out for m in current) / max(span, 1e-9):.2f} "
                                       f"samples/s)"])
        workers = {_worker(m) for m in current}
        rows.append(["workers", len(workers)])
    page.table(None, rows)


def _worker(m: TaskManifest) -> str:
    return f"{m.worker.get('host', '?')}:{m.worker.get('pid', '?')}"


def _throughput(page: Page, done: list[TaskManifest]) -> None:
    """Run throughput over time (each task's output spread over its own interval) and each stage's
    own rate per task (samples in / seconds spent in the stage), at the task's end."""
    if not done:
        return
    page.heading("Throughput")
    t0 = min(m.started_at for m in done)
    end = max(m.started_at + m.seconds for m in done) - t0
    edges = np.linspace(0, max(end, 1e-3), min(60, max(2, len(done) * 4)) + 1)
    rate = np.zeros(len(edges) - 1)
    for m in done:
        start, stop = m.started_at - t0, m.started_at - t0 + max(m.seconds, 1e-9)
        overlap = np.clip(np.minimum(edges[1:], stop) - np.maximum(edges[:-1], start), 0, None)
        rate += m.samples_out * overlap / (stop - start)
    rate /= np.diff(edges)
    fig, (ax_run, ax_stage) = page.subplots(ncols=2)
    ax_run.step(edges[:-1], rate, where="post")
    ax_run.set(title="run: samples/s over time", xlabel="seconds since the first task started", ylabel="samples/s")
    rows = []
    for name in done[0].stages:
        points = sorted((m.started_at - t0 + m.seconds, m.stages[name].samples_in / m.stages[name].seconds)
                        for m in done if name in m.stages and m.stages[name].seconds > 0)
        if points:
            ax_stage.plot(*zip(*points), marker="o", label=name)
        seconds = sum(m.stages[name].seconds for m in done if name in m.stages)
        samples = sum(m.stages[name].samples_in for m in done if name in m.stages)
        rows.append([name, samples, f"{seconds:.2f}", f"{samples / seconds:.1f}" if seconds else "-"])
    ax_stage.set(title="per stage: samples/s while in the stage", xlabel="task end (s)", ylabel="samples/s",
                 yscale="log")
    ax_stage.legend(fontsize=8)
    page.figure("throughput", fig, "Left: samples written per second over the run. Right: each stage's own "
                                   "processing rate per task; the lowest line is the bottleneck.")
    page.table(["stage", "samples in", "seconds", "samples/s"], rows)


def _tasks(page: Page, done: list[TaskManifest]) -> None:
    if not done:
        return
    page.heading("Tasks")
    t0 = min(m.started_at for m in done)
    workers = sorted({_worker(m) for m in done})
    fig, (ax_gantt, ax_hist) = page.subplots(height=max(3.0, 0.35 * len(workers) + 1.5), ncols=2)
    for m in done:
        ax_gantt.barh(workers.index(_worker(m)), m.seconds, left=m.started_at - t0, height=0.6, edgecolor="k")
    ax_gantt.set_yticks(range(len(workers)), workers, fontsize=7)
    ax_gantt.set(title="tasks per worker", xlabel="seconds since the first task started")
    ax_hist.hist([m.seconds for m in done], bins=min(30, max(5, len(done))))
    ax_hist.set(title="task durations", xlabel="seconds", ylabel="tasks")
    page.figure("tasks", fig, "Left: when each task ran, per worker (host:pid). Right: task durations.")
    slowest = sorted(done, key=lambda m: -m.seconds)[:10]
    page.table(["slowest tasks", "seconds", "samples out", "worker"],
               [[m.task_id, f"{m.seconds:.2f}", m.samples_out, _worker(m)] for m in slowest])


def _errors(page: Page, layout: RunLayout) -> None:
    page.heading("Errors")
    counts: Counter = Counter()
    examples: dict[tuple, list[str]] = {}
    messages: dict[tuple, str] = {}
    unreadable = 0
    for url in list_files(layout.errors_dir, ".jsonl"):
        for line in read_text(url).splitlines():
            try:
                error = json.loads(line)
                where = (str(error["stage"]), str(error["reason"]))
            except (ValueError, KeyError, TypeError):
                unreadable += 1
                continue
            counts[where] += 1
            keys = examples.setdefault(where, [])
            if len(keys) < EXAMPLE_KEYS:
                keys.append(str(error.get("key", "?")))
            messages.setdefault(where, str(error.get("message", ""))[:160])
    if counts:
        fig, (ax,) = page.subplots(height=max(2.5, 0.35 * len(counts) + 1))
        labels = [f"{s}/{r}" for s, r in counts]
        ax.barh(range(len(counts)), list(counts.values()))
        ax.set_yticks(range(len(counts)), labels, fontsize=8)
        ax.set(title="skipped samples by stage/reason", xlabel="samples")
        page.figure("errors", fig, "Skipped samples counted per stage and reason (errors/<task>.jsonl).")
        page.table(["stage", "reason", "samples", "example keys", "example message"],
                   [[s, r, n, ", ".join(examples[(s, r)]), messages[(s, r)]] for (s, r), n in counts.most_common()])
    else:
        page.text("No skipped samples.")
    if unreadable:
        page.text(f"{unreadable} lines of the errors files are not valid error records.")
    failed = []
    for url in list_files(layout.failed_dir, ".json"):
        try:
            reason = json.loads(read_text(url)).get("reason", "?")
        except ValueError:
            reason = "unreadable failure record"
        failed.append([url.rpartition("/")[2].removesuffix(".json"), reason])
    if failed:
        page.table(["failed task", "reason"], failed)


def _shard_samples(layout: RunLayout, done: list[TaskManifest], limit: int):
    """Raw samples of the run's shards, in task order, at most `limit`; an unreadable shard is reported."""
    seen = 0
    for m in done:
        for out in m.outputs:
            if not out.path.endswith(".tar"):
                continue
            fs, path = filesystem(layout.file(out.path))
            try:
                with fs.open(path, "rb") as f:
                    for members in iter_samples(f):
                        yield members
                        seen += 1
                        if seen >= limit:
                            return
            except (OSError, ShardReadError) as exc:
                yield {"__key__": out.path, "__error__": f"{type(exc).__name__}: {exc}"}


def _product(page: Page, layout: RunLayout, run: dict, done: list[TaskManifest], limit: int) -> None:
    """The product's own section (products/<name>/report.py: sample_stats and section), over a bounded
    sample of the shards; a product without one has none."""
    product = run.get("product")
    part = product_part(product, "report")
    if part is None or not done:
        return
    decode = part.sample_stats(layout)
    stats: dict[str, list] = {}
    bad: list[str] = []
    n = 0
    for members in _shard_samples(layout, done, limit):
        if "__error__" in members:
            bad.append(f"{members['__key__']}: {members['__error__']}")
            continue
        n += 1
        try:
            for name, values in decode(members).items():
                stats.setdefault(name, []).extend(values)
        except Exception as exc:  # noqa: BLE001 - a bad sample is reported, never fatal to the report
            bad.append(f"{members.get('__key__', '?')}: {type(exc).__name__}: {str(exc)[:160]}")
    page.heading(f"Samples ({product})")
    page.text(f"{n} samples read from the first shards (at most {limit}); {len(bad)} could not be decoded.")
    if bad:
        page.table(["undecodable sample"], [[b] for b in bad[:EXAMPLE_KEYS]])
    part.section(page, stats)


def _sizes_file(root: str) -> str | None:
    # a time-split folder has it at its top, a run beside its shards
    return next((u for u in (f"{root}/sizes.json", RunLayout(root).shards_file("sizes.json")) if exists(u)), None)


def _sizes(page: Page, root: str) -> None:
    """sizes.json of a resharded run (samples per shard) or a time-split folder (uids per split)."""
    url = _sizes_file(root)
    if url is None:
        return
    page.heading("Sizes")
    try:
        sizes = {str(k): int(v) for k, v in json.loads(read_text(url)).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
    except (ValueError, AttributeError) as exc:
        page.text(f"{url[len(root) + 1:]} is not a mapping of counts ({type(exc).__name__}).")
        return
    page.text(f"{url[len(root) + 1:]}: {len(sizes)} entries, {sum(sizes.values()):,} in total.")
    if not sizes:
        return
    fig, (ax,) = page.subplots(height=3.2)
    if len(sizes) <= 40:  # splits, or a small reshard: one bar each
        ax.bar(range(len(sizes)), list(sizes.values()))
        ax.set_xticks(range(len(sizes)), list(sizes), rotation=60 if len(sizes) > 8 else 0, fontsize=7)
        ax.set(title="sizes", ylabel="samples")
    else:  # thousands of shards: their distribution
        ax.hist(list(sizes.values()), bins=30, edgecolor="k")
        ax.set(title="sizes", xlabel="samples per entry", ylabel="entries")
    page.figure("sizes", fig, f"Counts from {url[len(root) + 1:]}.")
