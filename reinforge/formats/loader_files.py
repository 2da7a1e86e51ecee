"""What standard loaders look for, written beside a run's shards at the end of every run:

  shards/sizes.json   {shard name: samples}: open_clip's get_wds_dataset (and DataComp's trainer) count
                      samples from it, so training needs no --train-num-samples
  shards/_info.json   timm's wds reader: split "train" = the shards, their lengths and total
  shards/README.md    a Hugging Face dataset card: `configs` points the webdataset builder at the tars,
  README.md           `features` say how each member decodes (the builder's own inference fails on
                      param_aug's mixed lists); the run root's card points at shards/*.tar

Only committed shards (those with a manifest of this run's recipe) are listed. Member types come
from the first sample of the first shard: one small read, whatever the run's size.
"""
from __future__ import annotations

import json
import posixpath

from reinforge.formats.hf_card import dataset_card, hf_features
from reinforge.formats.wds import iter_samples
from reinforge.io.manifest import RunLayout, join
from reinforge.io.runs import scan_manifests
from reinforge.io.storage import filesystem, list_files, write_bytes


def committed_shards(layout: RunLayout, digest: str | None) -> dict[str, int]:
    """{path relative to the run: samples} of every tar a finished task of this recipe wrote, in name order."""
    shards = {}
    for manifest in scan_manifests(layout.root)[0]:
        if digest is None or manifest.config_digest == digest:
            shards.update({o.path: o.samples for o in manifest.outputs if o.path.endswith(".tar")})
    return dict(sorted(shards.items()))


def first_sample(url: str) -> dict | None:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return next(iter_samples(f), None)


def write_loader_files(layout: RunLayout, digest: str | None = None) -> None:
    """Write sizes.json, _info.json and the dataset cards for the run's committed shards (none: nothing)."""
    committed = committed_shards(layout, digest)
    if not committed:
        return
    folder = posixpath.dirname(next(iter(committed)))
    names = {posixpath.basename(p): n for p, n in committed.items() if posixpath.dirname(p) == folder}
    sizes = {name: names[name] for name in sorted(names)}
    shards_url = layout.file(folder)
    write_bytes(join(shards_url, "sizes.json"), json.dumps(sizes, indent=1).encode())
    total = sum(sizes.values())
    # nothing here names the run's folder or product: equal shards get equal loader files (reruns, joins)
    info = {"name": "reinforge", "splits": {"train": {"name": "train", "num_samples": total, "filenames": list(sizes),
                                               "shard_lengths": list(sizes.values())}}}
    write_bytes(join(shards_url, "_info.json"), json.dumps(info, indent=1).encode())

    try:
        sample = first_sample(join(shards_url, next(iter(sizes))))
        features = hf_features(sample) if sample else None
    except Exception:  # noqa: BLE001 - a card without features still names the tars; never fail a finished run
        features = None
    # a glob when every tar there is committed; else the committed ones by name (a half-written one stays out)
    present = {u.rpartition("/")[2] for u in list_files(shards_url, ".tar")}
    files = "*.tar" if present == set(sizes) else list(sizes)
    write_bytes(join(shards_url, "README.md"), dataset_card(files, features, total))
    root_files = f"{folder}/*.tar" if isinstance(files, str) else [f"{folder}/{n}" for n in files]
    write_bytes(layout.file("README.md"), dataset_card(root_files, features, total))
