"""Embedding a transfer set's targets (query images or class-name prompts) and evaluation images with the
pool's encoder, in this process."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from reinforge.curation.transfer_spec import ImagesSpec, PromptsSpec
from reinforge.formats.recipe import ConfigError
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import exists, read_text
from reinforge.models.specs import EmbedEncoder


def pool_encoder(meta: dict) -> EmbedEncoder:
    """The encoder recorded in run.json of the embed_pool run that wrote the index's source files."""
    for url in meta["source"]:
        root, sep, _ = url.rpartition("/embeddings/")
        if sep and exists(RunLayout(root).run_file):
            return EmbedEncoder.model_validate(json.loads(read_text(RunLayout(root).run_file))["recipe"]["encoder"])
    raise ConfigError("config error: encoder: the index was not built from an embed_pool run; "
                      "give the encoder that made its embeddings")


@dataclass
class EmbeddedImages:
    vectors: np.ndarray
    ids: list[str]
    classes: list[str]
    skipped: dict = field(default_factory=dict)


def embed_images(spec: ImagesSpec, encoder, batch: int = 64) -> EmbeddedImages:
    """Decode + embed a (small) image set in this process; bad images are counted skips."""
    import torch

    from reinforge.formats.sources import ImageFolderSource, WebDatasetSource
    from reinforge.runtime.executor import batched
    from reinforge.stages.base import Batch
    from reinforge.stages.decode import DecodeImage
    from reinforge.stages.embed import ImageView
    if spec.format == "imagefolder":
        source = ImageFolderSource(spec.path, 1 << 30)
        names = source.listing()[0]
    else:
        source, names = WebDatasetSource(spec.path), None
    stages = [DecodeImage(), ImageView(encoder.size)]
    vectors, ids, classes, skipped = [], [], [], {}
    for task in source.tasks():
        for chunk in batched(source.read(task), batch):
            b = Batch(chunk)
            for stage in stages:
                b = stage(b)
            for error in b.errors:
                skipped[error.reason] = skipped.get(error.reason, 0) + 1
            if not b.samples:
                continue
            vectors.append(encoder.embed_views(torch.stack([s["view"] for s in b.samples])))
            for s in b.samples:
                label = s.get("cls", b"").decode("utf-8", "replace").strip()
                classes.append(names[int(label)] if names else label)
                ids.append(s.get("__source__") or f"{task.id}/{s['__key__']}")
    if not vectors:
        raise ConfigError(f"error: no usable images in {spec.path} (skipped: {skipped or 'none found'})")
    return EmbeddedImages(np.concatenate(vectors), ids, classes, skipped)


def embed_prompts(spec: PromptsSpec, encoder) -> EmbeddedImages:
    """One query per class: the mean of its templates' text embeddings, renormalised (CLIP zero-shot)."""
    rows = []
    for name in spec.classes:
        emb = encoder.embed_texts([t.format(name) for t in spec.templates]).mean(axis=0)
        rows.append(emb / np.linalg.norm(emb))
    return EmbeddedImages(np.stack(rows).astype(np.float32), [f"prompt:{c}" for c in spec.classes], list(spec.classes))
