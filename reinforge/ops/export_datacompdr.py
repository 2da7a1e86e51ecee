"""Re-expand a mobileclip_dr run written with a storage codec (formats.codecs) to the standard DataCompDR
layout (FORMATS §2) that Apple's MobileCLIP trainer reads: every sample's `qemb.npz` member is decoded and
written as `npz` (float32/float16) or `pth.gz` (bfloat16); every other member keeps its bytes and place.

OUT is a run directory of its own: shards/<task>.tar under the source's names, one manifest per shard
(sizes and hashes of the new tars, the source run's config digest), run.json, dr_config.json with the
storage the shards now hold, and the loader files (sizes.json, ...). So reinforge's readers, `validate`
and open_clip's trainer all read it as any other run. A sample that the source's bounds refuse, or
whose codec member does not decode, is skipped and counted by reason; nothing is half-written (every
file is written to a temporary name, then renamed).
"""
from __future__ import annotations

import io
import json
import posixpath

from reinforge.formats.codecs import CODEC_MEMBER, NONE, decode_member
from reinforge.formats.datacomp_dr import StorageSpec, embedding_member
from reinforge.formats.imagenet_plus import SchemaError, sha256_hex
from reinforge.formats.limits import declared_limits
from reinforge.formats.loader_files import write_loader_files
from reinforge.formats.wds import ShardWriter, iter_samples
from reinforge.io.manifest import OutputFile, RunLayout, TaskManifest
from reinforge.io.runs import committed_shards
from reinforge.io.storage import exists, filesystem, read_text, write_bytes


def export_storage(storage: dict, format: str | None = None, dtype: str | None = None) -> StorageSpec:
    """What the exported shards hold: the run's format/dtype/layout (or the given ones), no codec."""
    return StorageSpec(format=format or storage.get("format", "npz"),
                       dtype=dtype or (storage.get("dtype") if not format else None),
                       layout=storage.get("layout", "legacy"))


def _expand(members: dict, storage: StorageSpec, limit: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, data in members.items():
        if name.startswith("__"):
            continue
        if name == CODEC_MEMBER:
            name, data = embedding_member(decode_member(data, limit), storage)
        out[name] = data
    return out


def export_datacompdr(run_dir: str, out_dir: str, format: str | None = None, dtype: str | None = None) -> dict:
    """Write OUT (see the module docstring); returns {"shards", "samples", "skipped": {reason: n}}."""
    source, target = RunLayout(run_dir.rstrip("/")), RunLayout(out_dir.rstrip("/"))
    if not exists(source.dr_config):
        raise SchemaError(f"{run_dir}: no dr_config.json: not a mobileclip_dr run")
    config = json.loads(read_text(source.dr_config))
    run = json.loads(read_text(source.run_file))
    storage = export_storage(config.get("storage") or {}, format, dtype)
    limits = declared_limits(config)
    shards = committed_shards(run_dir)
    if not shards:
        raise SchemaError(f"{run_dir}: no committed shards to export")
    digest = run.get("config_digest")
    skipped: dict[str, int] = {}
    samples = 0
    for shard in shards:
        name = posixpath.basename(shard.url)
        task = name.removesuffix(".tar")
        buf, written = io.BytesIO(), 0
        fs, path = filesystem(shard.url)
        with fs.open(path, "rb") as f, ShardWriter(buf) as writer:
            for members in iter_samples(f, limits):
                if "__error__" in members:
                    reason = members["__error__"][0]
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                try:
                    writer.write(members["__key__"], _expand(members, storage, limits.arrays))
                except SchemaError as exc:
                    skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                    continue
                written += 1
        data = buf.getvalue()
        write_bytes(target.shard(task), data)
        manifest = TaskManifest(task_id=task, inputs=[shard.url], samples_in=shard.samples, samples_out=written,
                                outputs=[OutputFile(target.relative(target.shard(task)), len(data), sha256_hex(data), written)],
                                config_digest=digest, versions={"export": "datacompdr"}, stages={},
                                started_at=0.0, seconds=0.0)
        write_bytes(target.manifest(task), manifest.to_json().encode())
        samples += written
    stored = {"format": storage.format, "dtype": storage.dtype, "layout": storage.layout}
    exported = {**config, "storage": stored}
    if (config.get("storage") or {}).get("codec", NONE) != NONE:
        exported["exported_from"] = {"codec": config["storage"]["codec"],
                                     "codec_params": config["storage"].get("codec_params", {})}
    write_bytes(target.dr_config, json.dumps(exported, indent=1, sort_keys=True).encode())
    write_bytes(target.run_file, json.dumps({**run, "export": {"from": run_dir, "storage": stored}},
                                            indent=1, sort_keys=True).encode())
    write_loader_files(target, digest)
    return {"shards": len(shards), "samples": samples, "skipped": skipped}

