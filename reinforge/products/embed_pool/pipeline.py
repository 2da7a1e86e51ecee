"""Embed a DataComp-style pool: decode -> uid -> (caption) -> view -> encoder, one Parquet sidecar
`embeddings/<task>.parquet` per pool shard (formats/embeddings.py), committed exactly once like a
shard (temp name -> rename -> manifest last, with the file's size, sha256 and rows)."""
from __future__ import annotations

import numpy as np

from reinforge.formats.embeddings import IMAGE_KEY, TEXT_KEY, embeddings_table, table_bytes
from reinforge.formats.limits import Limits
from reinforge.formats.sources import WebDatasetSource
from reinforge.io.manifest import RunLayout, Task
from reinforge.products.embed_pool.recipe import EmbedPoolRecipe
from reinforge.runtime.pipeline import Pipeline
from reinforge.stages.base import Stage
from reinforge.stages.decode import DecodeImage
from reinforge.stages.embed import Encoder, ImageView
from reinforge.stages.text import ParseCaption, ParseUID


class EmbeddingWriter:
    """Collects one task's rows and writes them as one Parquet file when the task completes."""

    def __init__(self, fileobj, encoder: dict):
        self.fileobj = fileobj
        self.encoder = encoder
        self.uids: list[str] = []
        self.sha256: list[str] = []
        self.rows: dict[str, list[np.ndarray]] = {IMAGE_KEY: [], TEXT_KEY: []}

    @property
    def samples(self) -> int:
        return len(self.uids)

    def write(self, key: str, members: dict) -> None:
        self.uids.append(key)
        self.sha256.append(members["sha256"])
        for name in (IMAGE_KEY, TEXT_KEY):
            if name in members:
                self.rows[name].append(members[name])

    def __enter__(self) -> "EmbeddingWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # the temporary file is discarded anyway
            return
        dim = self.encoder["dim"]
        image = np.stack(self.rows[IMAGE_KEY]) if self.uids else np.zeros((0, dim), np.float16)
        text = np.stack(self.rows[TEXT_KEY]) if self.rows[TEXT_KEY] else None
        if text is None and self.encoder.get("text"):
            text = np.zeros((0, dim), np.float16)
        self.fileobj.write(table_bytes(embeddings_table(self.uids, self.sha256, image, text, self.encoder)))


class EmbedPoolPipeline(Pipeline):
    def __init__(self, recipe: EmbedPoolRecipe):
        self.recipe = recipe
        self.source = WebDatasetSource(recipe.input.path, Limits.for_images(recipe.input.max_image_pixels))
        self.encoder: Encoder | None = None

    def samples_per_batch(self) -> int:
        return self.recipe.samples_per_batch

    def build_stages(self) -> list[Stage]:
        r = self.recipe
        threads = max(1, int(r.resources.cpus_per_actor))
        self.encoder = Encoder(r.encoder)
        self.encoder.setup()  # the view size comes from the loaded model
        stages: list[Stage] = [DecodeImage(r.input.max_image_pixels, threads), ParseUID()]
        if r.encoder.text:
            stages.append(ParseCaption(r.caption_member, threads))
        return stages + [ImageView(self.encoder.size, threads), self.encoder]

    def output_url(self, layout: RunLayout, task: Task) -> str:
        return layout.embeddings(task.id)

    def task_writer(self, fileobj) -> EmbeddingWriter:
        return EmbeddingWriter(fileobj, {**self.encoder.version, "text": self.recipe.encoder.text})
