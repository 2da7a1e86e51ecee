"""Join: reinforcement-only DataCompDR shards (no images, like Apple's release) + the DataComp image
shards they came from, matched by uid, into trainable DataCompDR shards (FORMATS §2).

prepare() (once per run; plan.py, in passes of tasks over uid buckets): index both sides with uid_index.py
(tar headers and json members only; the shared index cache, else <run>/index/{reinforcement,images}/),
locate every reinforcement uid in the pool, and write each reinforcement shard's pool locations to
<run>/plan/<task>.parquet, with the counts in <run>/plan/plan.json, and the trainer config to
<run>/dr_config.json. Tasks are the
reinforcement shards (an output shard keeps its input's name; tasks() lists them and writes nothing);
read(task) streams its shard and fetches only the pool samples it needs, by byte range.

Per sample (JoinDR) the reinforcement members must decode, the pool sample must carry the same uid,
an image and (unless the reinforcement sample has its own) a usable caption, and the image must be
the one the crop boxes were drawn on: sha256 equal to the recorded one and every box inside it
(check_replayable). Anything else is a refusal counted by reason in errors/<task>.jsonl:
missing_image (uid not in the pool, or no image member), sha256_mismatch, crop_out_of_bounds,
corrupt_image, bad_params, missing_sha256, uid_mismatch, schema, missing_caption, ...
Output members are url.txt, image, txt, then the reinforcement members byte for byte: exactly what
a keep_images run of the same recipe writes.
"""
from __future__ import annotations

import json
from typing import Iterator

import pyarrow.parquet as pq

from reinforge.formats.augment import Augmenter
from reinforge.formats.datacomp_dr import CAPTION_MEMBER, META_MEMBER, URL_MEMBER, decode_dr_sample
from reinforge.formats.datacomp_dr_replay import check_replayable
from reinforge.formats.image import IMAGE_EXTENSIONS, find_image
from reinforge.formats.imagenet_plus import SchemaError
from reinforge.formats.limits import Limits
from reinforge.formats.pool_reader import PoolReader
from reinforge.formats.sources import InputError, WebDatasetSource
from reinforge.io.fingerprint import file_versions, plan_digest, planned_already
from reinforge.io.manifest import RunLayout, Task
from reinforge.io.storage import exists, filesystem, read_text, remove_tree, write_bytes
from reinforge.products.join import plan
from reinforge.products.join.recipe import JoinRecipe
from reinforge.readers.mobileclip import augmentation_from_config
from reinforge.runtime.pipeline import Pipeline
from reinforge.stages.base import MapStage, SkipSample, Stage
from reinforge.stages.text import ParseCaption


class JoinError(InputError):
    """The join cannot be prepared as asked (no trainer config, no uid in common with the pool)."""


def _uid_of(members: dict, field: str = "uid") -> str | None:
    try:
        uid = json.loads(members[META_MEMBER]).get(field)
    except (KeyError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return uid if isinstance(uid, str) else None


class JoinDR(MapStage):
    """Verifies that a pool sample is the image a reinforcement sample was made from, and merges them."""

    name = "join"

    def __init__(self, image_augmentation: dict, caption_member: str, uid_field: str, threads: int = 1,
                 limits: Limits | None = None):
        self.augmenter = Augmenter(image_augmentation)
        self.limits = limits
        self.caption = ParseCaption(caption_member)
        self.uid_field = uid_field
        self.threads = threads

    def process(self, sample: dict) -> dict:
        reinforcement, pool = sample["__reinforcement__"], sample["__pool__"]
        if "__error__" in reinforcement:
            raise SkipSample(*reinforcement["__error__"])
        try:
            record = decode_dr_sample({"__key__": sample["__key__"], **reinforcement}, self.limits)
        except SchemaError as exc:  # reason schema, or member_too_large
            raise SkipSample(exc.reason, str(exc)) from None
        if pool is None:
            raise SkipSample("missing_image", f"uid {record.uid} is not in the image pool")
        if "__error__" in pool:
            raise SkipSample(*pool["__error__"])
        pool_uid = _uid_of(pool, self.uid_field)
        if (pool_uid or "").lower() != record.uid:
            raise SkipSample("uid_mismatch", f"pool sample has uid {pool_uid!r}, the index said {record.uid}")
        found = find_image(pool)
        if found is None:
            raise SkipSample("missing_image", f"the pool sample of uid {record.uid} has no image member")
        caption = (reinforcement[CAPTION_MEMBER] if CAPTION_MEMBER in reinforcement
                   else self.caption.process(dict(pool))["caption"].encode())
        check_replayable(record, found[1], self.augmenter)  # ReplayError: sha256_mismatch, crop_out_of_bounds, ...
        members = {URL_MEMBER: reinforcement[URL_MEMBER]} if URL_MEMBER in reinforcement else {}
        members[found[0]] = found[1]
        members[CAPTION_MEMBER] = caption
        members.update((ext, data) for ext, data in reinforcement.items()
                       if ext not in members and ext not in IMAGE_EXTENSIONS)
        return {"__key__": sample["__key__"], "members": members}


class JoinPipeline(Pipeline):
    def __init__(self, recipe: JoinRecipe):
        self.recipe = recipe
        self.layout = RunLayout(recipe.output.rstrip("/"))
        self.source = WebDatasetSource(recipe.input.path)

    def dr_config_url(self) -> str:
        if self.recipe.input.dr_config:
            return self.recipe.input.dr_config
        run = RunLayout.holding(self.recipe.input.path)
        if run is None:
            raise JoinError(f"input.dr_config: not given, and {self.recipe.input.path} is not in a run's shards/ "
                            f"folder; pass the reinforcement shards' trainer config (dr_config.json)")
        return run.dr_config

    @staticmethod
    def load_dr_config(url: str) -> tuple[dict, dict]:
        """(config, image_augmentation), or JoinError naming the file."""
        if not exists(url):
            raise JoinError(f"input.dr_config: {url} not found")
        try:
            config = json.loads(read_text(url))
            augmentation = augmentation_from_config(config)
            Augmenter(augmentation)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JoinError(f"input.dr_config: {url}: {exc}") from None
        return config, augmentation

    def probe_recipe(self, raw: dict, chosen: list[dict], folder: str) -> dict:
        raw = super().probe_recipe(raw, chosen, folder)  # the probe shards are not in this run's shards/
        return {**raw, "input": {**raw["input"], "dr_config": self.dr_config_url()}}

    def tasks(self) -> list[Task]:
        return self.source.tasks()  # the reinforcement shards

    def prepare(self, layout: RunLayout) -> None:
        """Where each task's pool samples are (plan/, join/plan.py), and the trainer config of the
        reinforcement shards, byte for byte: it describes the joined shards too. Nothing is planned when
        the committed plan was made from the same inputs."""
        r = self.recipe
        config_url = self.dr_config_url()
        self.load_dr_config(config_url)
        tasks = self.source.tasks()
        try:
            pool = WebDatasetSource(r.images.path).tasks()
        except InputError as exc:
            raise JoinError(str(exc).replace("input.path", "images.path", 1)) from None
        files = [t.inputs[0] for t in tasks + pool] + [config_url]
        versions = file_versions(files)  # once: the digest records the versions the plan is made from
        inputs = plan_digest("reinforge.join/1", r.model_dump(mode="json", exclude={"resources", "output"}), files,
                             versions)
        if planned_already(layout, inputs):
            return
        work = layout.plan_work
        try:
            made = plan.plan_join(tasks, pool, layout, work, r.images.uid_field, versions)
            try:
                found = made.summary
                if found["uids"] and not found["uids_in_pool"]:
                    raise JoinError(f"images.path: none of the {found['uids']} reinforcement uids is in the image "
                                    f"pool ({len(pool)} shards, {found['pool']['samples_indexed']} samples): wrong pool?")
                plan.commit_plan(layout, tasks, made)
            finally:
                made.tasks.close()
        finally:
            remove_tree(work)
        fs, path = filesystem(config_url)
        write_bytes(layout.dr_config, fs.cat_file(path))
        write_bytes(layout.plan_inputs, json.dumps({"inputs": inputs}).encode())

    def read(self, task: Task) -> Iterator[dict]:
        fs, path = filesystem(plan.locations_url(self.layout, task.id))
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).read().to_pydict()  # not read_table: it imports pandas (~0.4 s)
        where = {uid: (url, offset, length) for uid, url, offset, length in
                 zip(rows["uid"], rows["shard"], rows["offset"], rows["length"])}
        pool = PoolReader()
        source = WebDatasetSource(self.recipe.input.path, self.output_limits(self.layout))  # the run's dr_config
        try:
            for members in source.read(task):
                key = members.pop("__key__")
                found = where.get(_uid_of(members))
                yield {"__key__": key, "__reinforcement__": members, "__pool__": pool.fetch(*found) if found else None}
        finally:
            pool.close()

    def build_stages(self) -> list[Stage]:
        r = self.recipe
        _, augmentation = self.load_dr_config(self.layout.dr_config)  # the run's copy (prepare)
        return [JoinDR(augmentation, r.caption_member, r.images.uid_field, max(1, int(r.resources.cpus_per_actor)),
                       self.output_limits(self.layout))]

    def samples_per_batch(self) -> int:
        return 64

    def sample_checker(self, layout: RunLayout):
        """validate: schema, N and D as the trainer config says, sha256 and crop bounds on the joined image."""
        config, augmentation = self.load_dr_config(layout.dr_config)
        augmenter = Augmenter(augmentation)
        n, dims = config["reinforce"].get("num_samples"), config.get("teacher_dims")
        limits = self.output_limits(layout)

        def check(members: dict) -> None:
            sample = decode_dr_sample(members, limits)
            if n is not None and len(sample.entries) != n:
                raise ValueError(f"{len(sample.entries)} stored augmentations, the trainer config says {n}")
            if dims and sample.dim != sum(dims):
                raise ValueError(f"embedding dim {sample.dim}, the trainer config says {sum(dims)} ({dims})")
            check_replayable(sample, sample.image, augmenter)

        return check
