"""What every product writes, as a fingerprint that survives moving code around (issue #12).

`build_outputs(root)` runs every config in configs/ (and the driver tools: splits, schedule, filter)
through the CLI, the way users run them, on small fixed inputs with tiny real models.
`fingerprint(folder)` digests what they wrote: tar members one by one, Parquet tables by column,
JSON with the run's own paths and timings taken out. Floating-point arrays are kept as values and
compared with a tolerance, because model outputs may differ in the last bits between CPUs; every
other byte is compared exactly.

Regenerate the golden file after an intended change of behaviour:
    REINFORGE_UPDATE_GOLDEN=1 ../shared/tools/offline .venv/bin/python -m pytest tests/test_output_digests.py
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from conftest import jpeg_bytes, make_input_shards, photo, teacher_checkpoint, tiny_open_clip, write_shard

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
CAPTIONS = ["a cat sitting on a sofa", "a cup of coffee", "an astronaut in a suit", "a rocket on a launch pad"]
# Files about how a run went or how it was planned (internal, free to change), not what it wrote;
# index.faiss of a flat index is a copy of the embeddings, which are compared with a tolerance.
VOLATILE_FILES = {"status.json", "plan.json", "report.html", "run.log", "index.faiss"}
VOLATILE_DIRS = {"manifests", "logs", "errors", "tmp", "uid_index", "index", "plan", "cache", "spill"}
VOLATILE_KEYS = {"seconds", "elapsed", "elapsed_s", "wall_s", "started", "finished", "created", "created_at",
                 "time", "timestamp", "hostname", "host", "node_id", "pid", "worker", "duration_s",
                 "rows_per_s", "samples_per_s", "reinforge_version", "version", "python", "torch", "ray",
                 "config_digest", "written_at"}  # a digest of the recipe, whose paths differ per run: the recipe itself is kept
FLOAT_MEMBERS = ("npz", "npy", "pth.gz")  # whole member names (DataCompDR's `npz`) or their endings


def _is_float_member(member: str) -> bool:
    return any(member == m or member.endswith("." + m) for m in FLOAT_MEMBERS)


def _uid(i: int) -> str:
    return uuid.UUID(int=1000 + i).hex


def datacomp_pool(folder, shards: int = 2, per_shard: int = 4) -> str:
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        write_shard(os.path.join(folder, f"{s:08d}.tar"), [
            (f"{i:09d}", {"jpg": jpeg_bytes(photo(i, 48)), "txt": CAPTIONS[i % 4].encode(),
                          "json": json.dumps({"uid": _uid(i)}).encode()})
            for i in range(per_shard * s, per_shard * s + per_shard)])
    return os.path.join(str(folder), f"{{00000000..{shards - 1:08d}}}.tar")


def cli(*args: str) -> None:
    from click.testing import CliRunner

    from reinforge.cli.main import cli as main
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)


def _sets(**values) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set", f"{key.replace('__', '.')}={json.dumps(value)}"]
    return out


def build_outputs(root: str) -> dict[str, str]:
    """Run every config and driver tool once under root; returns {name: folder it wrote}."""
    from reinforge.formats.subset import make_subset, write_subset
    root = str(root)
    images = make_input_shards(os.path.join(root, "images"), shards=2, per_shard=4)
    pool = datacomp_pool(os.path.join(root, "pool"))
    small = {"resources": {"cpus_per_actor": 1, "object_store_memory_mb": 256}}
    timm_teachers = [{"model": m, "num_classes": 10, "batch_size": 8, "checkpoint": teacher_checkpoint(m)}
                     for m in ("resnet10t", "mobilenetv3_small_050")]
    coca = [{"model": tiny_open_clip("coca"), "num_captions": 2, "max_length": 8, "batch_size": 4}]
    clips = [{"model": tiny_open_clip("clip", 32, seed=s), "batch_size": 8} for s in (1, 2)]
    out = {name: os.path.join(root, name) for name in (
        "demo", "imagenet_plus", "mobileclip_dr", "reinforcement_only", "embed_pool", "index", "join", "reshard",
        "transfer_set", "splits", "schedule", "filter_scores", "filter_apply")}

    cli("run", os.path.join(CONFIGS, "demo.yaml"), "--no-progress", *_sets(
        input__path=images, output=out["demo"], augmentation__num_samples=2, resources=small["resources"]))
    cli("run", os.path.join(CONFIGS, "imagenet_plus.yaml"), "--no-progress", *_sets(
        input__path=images, output=out["imagenet_plus"], augmentation__num_samples=3,
        augmentation__image_augmentation__random_resized_crop__size=32, teachers=timm_teachers, precision="float32",
        max_error_fraction=0.5, resources=small["resources"]))
    dr = dict(input__path=pool, augmentation__num_samples=2, augmentation__samples_per_batch=4,
              augmentation__image_augmentation__random_resized_crop__size=32, captioners=coca, teachers=clips,
              max_error_fraction=0.5, resources=small["resources"])
    cli("run", os.path.join(CONFIGS, "mobileclip_dr.yaml"), "--no-progress",
        *_sets(output=out["mobileclip_dr"], **dr))
    cli("run", os.path.join(CONFIGS, "mobileclip_dr.yaml"), "--no-progress",
        *_sets(output=out["reinforcement_only"], keep_images=False, storage={"format": "pth.gz", "dtype": "bfloat16"},
               **dr))
    cli("run", os.path.join(CONFIGS, "join.yaml"), "--no-progress", *_sets(
        output=out["join"], input__path=os.path.join(out["reinforcement_only"], "shards", "*.tar"),
        images__path=pool, resources=small["resources"]))
    cli("embed", os.path.join(CONFIGS, "embed_pool.yaml"), "--no-progress", *_sets(
        input__path=pool, output=out["embed_pool"], encoder__model=tiny_open_clip("clip", 32, seed=1),
        encoder__pretrained=None, encoder__text=True, encoder__precision="float32", resources=small["resources"]))
    cli("index", out["embed_pool"], "--out", out["index"], *_sets(kind="flat"))

    queries, evals = os.path.join(root, "queries"), os.path.join(root, "eval")
    for folder, first in ((queries, 20), (evals, 0)):
        for c in ("cats", "cups"):
            os.makedirs(os.path.join(folder, c))
            for i in range(first, first + 2):
                photo(i + (0 if c == "cats" else 1), 48).save(os.path.join(folder, c, f"{i}.png"))
    cli("transfer-set", os.path.join(CONFIGS, "transfer_set.yaml"), *_sets(
        index=out["index"], output=out["transfer_set"], queries__path=queries, selection__k=4,
        selection__budget=5, selection__per_class=3, selection__min_similarity=-1.0,
        decontaminate__images__path=evals))

    subset = make_subset(*np.array([divmod(uuid.UUID(_uid(i)).int, 2**64) for i in (0, 1, 2, 4, 5, 7)], np.uint64).T)
    write_subset(os.path.join(root, "subset.npy"), np.sort(subset, order=["f0", "f1"]))
    np.save(os.path.join(root, "subset.counts.npy"), np.array([1, 2, 1, 3, 1, 1], np.uint32))
    cli("run", os.path.join(CONFIGS, "reshard.yaml"), "--no-progress", *_sets(
        output=out["reshard"], subset=os.path.join(root, "subset.npy"), input__path=pool, samples_per_shard=4,
        resources=small["resources"]))

    _driver_tools(root, out)
    return out


def _driver_tools(root: str, out: dict) -> None:
    from pool_gen import metadata_table, write_metadata
    from test_filters import make_pool
    write_metadata(os.path.join(root, "meta.parquet"), metadata_table(6000, seed=5), row_group_size=2000)
    cli("splits", os.path.join(root, "meta.parquet"), "--out", out["splits"])
    cli("schedule", out["splits"], "--policy", "cumulative-exp", "--budget", 500, "--out", out["schedule"], "--seed", 2)
    meta = os.path.join(root, "filter_meta")
    make_pool(meta)
    cli("filter", "score", meta, "--out", out["filter_scores"], "--clusters", 4, "--cluster-targets",
        os.path.join(meta, "targets.npy"), "--seed", 3)
    cli("filter", "apply", out["filter_scores"], "--rule", "basic & clip_l14 >= 0.25", "--out",
        os.path.join(out["filter_apply"], "subset.npy"))


# ---------------------------------------------------------------- fingerprints

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _float_arrays(name: str, data: bytes) -> dict[str, np.ndarray]:
    if name.endswith("pth.gz"):
        state = torch.load(io.BytesIO(gzip.decompress(data)), weights_only=True)
        return {k: v.float().numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in _flat(state).items()}
    if name.endswith("npz"):
        with np.load(io.BytesIO(data)) as z:
            return {k: z[k] for k in z.files}
    return {"": np.load(io.BytesIO(data))}


def _flat(state, prefix: str = "") -> dict:
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            out.update(_flat(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): state}


def placeholders(*folders: str) -> list[tuple[str, str]]:
    """(path, name) pairs to replace in what a run records: the run's own folders, and the model
    files this test session wrote into temp folders (conftest), named by what they are."""
    import conftest
    pairs = [(path.removeprefix("local-dir:"), f"<clip:{'-'.join(map(str, key))}>")
             for key, path in conftest._OPEN_CLIP_DIRS.items()]
    pairs += [(path, f"<checkpoint:{model}>") for model, path in conftest._CHECKPOINTS.items()]
    return pairs + [(folder, f"<root{i}>") for i, folder in enumerate(folders)]


def _clean_json(value, roots: list[tuple[str, str]]):
    if isinstance(value, dict):
        return {k: _clean_json(v, roots) for k, v in sorted(value.items()) if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_clean_json(v, roots) for v in value]
    if isinstance(value, str):
        for path, name in roots:
            value = value.replace(path, name)
        return value
    if isinstance(value, float) and np.isfinite(value):
        return float(np.float32(value))  # computed figures: compared as float32 values
    return value


class Fingerprint:
    """digests: {item: sha256 or canonical text}; arrays: {item: float array} (compared with a tolerance)."""

    def __init__(self):
        self.digests: dict[str, str] = {}
        self.arrays: dict[str, np.ndarray] = {}

    def add_bytes(self, item: str, data: bytes, roots: list[tuple[str, str]] = ()) -> None:
        """Text has the run's paths replaced by their names first (README cards, url.txt)."""
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.digests[item] = _sha(data)
            return
        for path, name in roots:
            text = text.replace(path, name)
        self.digests[item] = _sha(text.encode())

    def add_array(self, item: str, array: np.ndarray) -> None:
        if array.dtype.kind == "f" or array.dtype == np.dtype("V2"):
            self.arrays[item] = np.asarray(array, np.float32)
            self.digests[item] = f"float{array.shape}"
        else:
            self.digests[item] = f"{array.dtype}{array.shape}:{_sha(np.ascontiguousarray(array).tobytes())}"


def fingerprint_into(fp: Fingerprint, name: str, folder: str, roots: list[tuple[str, str]]) -> None:
    from reinforge.formats.wds import iter_samples
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in VOLATILE_DIRS)
        for file in sorted(files):
            path = os.path.join(here, file)
            item = f"{name}/{os.path.relpath(path, folder)}"
            if file in VOLATILE_FILES or file.startswith(".") or ".tmp" in file:
                continue
            with open(path, "rb") as f:
                data = f.read()
            if file.endswith(".tar"):
                for sample in iter_samples(io.BytesIO(data)):
                    key = sample["__key__"]
                    for member, value in sorted(sample.items()):
                        if member.startswith("__"):
                            continue
                        if _is_float_member(member):
                            for array_name, array in _float_arrays(member, value).items():
                                fp.add_array(f"{item}/{key}.{member}/{array_name}", array)
                        elif member.endswith("json"):
                            fp.digests[f"{item}/{key}.{member}"] = json.dumps(
                                _clean_json(json.loads(value), roots), sort_keys=True)
                        else:
                            fp.add_bytes(f"{item}/{key}.{member}", value, roots)
            elif file.endswith(".parquet"):
                table = pq.read_table(io.BytesIO(data))
                for column in table.column_names:
                    _add_column(fp, f"{item}/{column}", table.column(column), roots)
            elif file.endswith(".json"):
                fp.digests[item] = json.dumps(_clean_json(json.loads(data), roots), sort_keys=True)
            elif file.endswith(".npy"):
                fp.add_array(item, np.load(io.BytesIO(data)))
            else:
                fp.add_bytes(item, data, roots)


def _add_column(fp: Fingerprint, item: str, column: pa.ChunkedArray, roots: list[tuple[str, str]]) -> None:
    kind = column.type
    if pa.types.is_floating(kind):
        fp.add_array(item, column.to_numpy())
    elif pa.types.is_fixed_size_binary(kind) and kind.byte_width % 2 == 0 and "emb" in item:
        buf = b"".join(v.as_py() for v in column)
        fp.add_array(item, np.frombuffer(buf, np.float16).reshape(len(column), -1))
    elif pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type):
        fp.add_array(item, np.asarray(column.to_pylist(), np.float32))
    else:
        fp.digests[item] = _sha(json.dumps(_clean_json(column.to_pylist(), roots), default=str).encode())


def fingerprint(outputs: dict[str, str], *folders: str) -> Fingerprint:
    """The fingerprint of every output folder; `folders` (the run's roots) are replaced by names."""
    roots = placeholders(*folders)
    fp = Fingerprint()
    for name, folder in sorted(outputs.items()):
        fingerprint_into(fp, name, folder, roots)
    return fp


def save(fp: Fingerprint, path: str) -> None:
    with open(path + ".json", "w") as f:
        json.dump(fp.digests, f, indent=0, sort_keys=True)
    np.savez_compressed(path + ".npz", **fp.arrays)


def load(path: str) -> Fingerprint:
    fp = Fingerprint()
    with open(path + ".json") as f:
        fp.digests = json.load(f)
    with np.load(path + ".npz") as z:
        fp.arrays = {k: z[k] for k in z.files}
    return fp
