"""Hugging Face `datasets` access to a run, for when plain `load_dataset(run)` is not exact enough.

`load_dataset(run)` works on its own: the run's dataset card (formats/hf_card.py) gives the webdataset
builder a feature for every member. Its JSON members go through the `Json` feature, whose parser
(pandas' ujson) may return a float one unit in the last place off, and a replayed augmentation needs
the number exactly as stored. `load_run` gives the same columns from the run's committed shards with
JSON kept as text in Arrow and parsed by Python's json on access: every value exactly as stored.

    from reinforge.readers.hf import load_run
    ds = load_run("runs/demo/run")                   # datasets.Dataset
    ds = load_run("runs/demo/run", streaming=True)   # datasets.IterableDataset (one shard per tar)

`datasets` is imported here only; reinforge itself does not need it.
"""
from __future__ import annotations

import gzip
import json

import fsspec

from reinforge.formats.hf_card import HF_IMAGE_EXTENSIONS, card_features, hf_features
from reinforge.formats.members import decode_member, inner_extension
from reinforge.formats.wds import iter_samples
from reinforge.io.manifest import RunLayout
from reinforge.io.runs import committed_shards


def _yaml_features(run: str) -> list[dict]:
    layout = RunLayout(run.rstrip("/"))
    for card in (layout.shards_file("README.md"), layout.file("README.md")):
        try:
            with fsspec.open(card, "r", encoding="utf-8") as f:
                features = card_features(f.read())
        except FileNotFoundError:
            continue
        if features:
            return features
    shards = committed_shards(run)  # a run written before cards existed: infer as the writer does
    if shards:
        with fsspec.open(shards[0].url, "rb") as f:
            features = hf_features(next(iter_samples(f)))
        if features:
            return features
    raise ValueError(f"{run}: cannot tell the Hugging Face features of its shards")


def features(run: str):
    """The run's `datasets.Features`, e.g. for `load_dataset("webdataset", data_files=..., features=...)`."""
    from datasets import Features
    return Features._from_yaml_list(_yaml_features(run))


def _json_columns(yaml_features: list[dict]) -> list[str]:
    return [f["name"] for f in yaml_features if f.get("dtype") == "json"]


def _value(ext: str, data: bytes, key: str, json_columns: set[str]):
    if ext.rsplit(".", 1)[-1].lower() in HF_IMAGE_EXTENSIONS:
        return {"path": f"{key}.{ext}", "bytes": data}  # as the webdataset builder stores images
    if ext in json_columns:
        return _json_text(ext, data)
    value = decode_member(ext, data)
    if inner_extension(ext) in ("pth", "pt"):
        value = _numpy(value)
    return value


def _json_text(ext: str, data: bytes) -> str:
    return (gzip.decompress(data) if ext.lower().endswith(".gz") else data).decode("utf-8")


def _numpy(value):
    """Tensors to numpy for Arrow; bfloat16 as float32 (every bfloat16 value is exactly a float32)."""
    import torch
    if isinstance(value, dict):
        return {k: _numpy(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return value


def _examples(shards: list[str], json_columns: tuple[str, ...], hashes: tuple = ()):
    """One row per sample, members as the webdataset builder names them; JSON as its exact text.
    `hashes` is not read: it only makes the cache key change when a shard's content does."""
    wanted = set(json_columns)
    for url in shards:
        with fsspec.open(url, "rb") as f:
            for sample in iter_samples(f):
                key = sample.pop("__key__")
                row = {ext: _value(ext, data, key, wanted) for ext, data in sample.items() if not ext.startswith("__")}
                yield {**row, "__key__": key, "__url__": url}


def _parse_json_batch(batch: dict) -> dict:
    return {name: [None if v is None else json.loads(v) for v in values] for name, values in batch.items()}


def _parse_json_row(row: dict, columns: tuple[str, ...]) -> dict:
    return {**row, **{c: json.loads(row[c]) for c in columns if row.get(c) is not None}}


def load_run(run: str, streaming: bool = False, cache_dir: str | None = None):
    """A `datasets.Dataset` (or `IterableDataset` with streaming=True) of the run's committed shards, every
    member decoded as `load_dataset(run)` decodes it, JSON members exactly as stored."""
    import datasets
    yaml_features = _yaml_features(run)
    json_columns = _json_columns(yaml_features)
    stored = datasets.Features._from_yaml_list(
        [{**f, "dtype": "string"} if f["name"] in json_columns else f for f in yaml_features])
    shards = committed_shards(run)
    # datasets splits every list in gen_kwargs into shards: only the tar list is one; the manifests'
    # hashes are in the cache key so that a redone shard is read again, not served from the cache
    kwargs = {"shards": [s.url for s in shards], "json_columns": tuple(json_columns)}
    if streaming:
        ds = datasets.IterableDataset.from_generator(_examples, features=stored, gen_kwargs=kwargs)
        return ds.map(_parse_json_row, fn_kwargs={"columns": tuple(json_columns)})
    ds = datasets.Dataset.from_generator(_examples, features=stored, cache_dir=cache_dir,
                                         gen_kwargs={**kwargs, "hashes": tuple(s.sha256 for s in shards)})
    return ds.with_transform(_parse_json_batch, columns=json_columns, output_all_columns=True)
