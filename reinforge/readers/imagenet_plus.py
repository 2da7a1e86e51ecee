"""Training-side reader for ImageNet+ runs (FORMATS §3): replay a stored augmentation, densify its
teacher probabilities. Imports only reinforge.formats and reinforge.io, so a trainer can use it without Ray.

The dataset indexes each shard once (tar member offsets only) and then reads members by seeking,
so it is map-style and random-access without holding image bytes in memory.

A bad item (unsafe key, a member over the bounds the run declares, schema error, wrong sha256, an
undecodable image, a box outside it) never ends an epoch: the next readable item (i+1, i+2, ...) is
returned in its place. The first time a process meets it, it is logged with its key and counted in
`skipped` by reason (shared with DataLoader workers); later it is passed over without being read.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tarfile

import fsspec
import torch
import torch.nn.functional as F

from reinforge.formats.augment import replay_augmenter
from reinforge.formats.image import IMAGE_EXTENSIONS, decode_rgb
from reinforge.formats.imagenet_plus import (META_MEMBER, ReinforcedSample, SchemaError, decode_sample, densify,
                                             sha256_hex)
from reinforge.formats.limits import Limits, declared_limits, too_large
from reinforge.formats.seeds import entry_seed
from reinforge.formats.wds import split_member_name, unsafe_name
from reinforge.io.runs import committed_shards, dr_config, is_run_dir
from reinforge.readers.skips import SkipCounters

log = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "bad_key", "member_too_large", "unreadable_member", "schema", "sha256_mismatch", "missing_partner",
    "empty_image", "corrupt_image", "image_too_large", "replay_error",
)
MAX_CONSECUTIVE_SKIPS = 64  # then the shards are broken, not a sample: raise


RANDOM_READ_BLOCK = 1 << 20


def shard_urls(run_dir: str) -> list[str]:
    """Shards of a finished run (io.runs: a shard without a readable manifest is not done)."""
    return [shard.url for shard in committed_shards(run_dir)]


def _num_classes_from(config: dict) -> int | None:
    value = config.get("num_classes", config.get("reinforce", {}).get("num_classes"))
    return int(value) if value is not None else None


def index_shard(url: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (data offset, size)})] in shard order; contiguous members with one key form a sample."""
    samples: list[tuple[str, dict]] = []
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:  # "r:" = seekable, uncompressed
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if not ext:
                continue
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = (member.offset_data, member.size)
    return samples


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(student)), summed over classes, mean over the batch; no temperature (ML-DR).
    xlogy makes 0·log 0 = 0, so sparse targets are safe."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    target = target_probs.float()
    return (torch.xlogy(target, target) - target * log_q).sum(-1).mean()


class ReinforcedImageNet(torch.utils.data.Dataset):
    """Map-style ImageNet+ dataset: item i -> (replayed view float32 CHW, dense target float32 [C]).

    mode "random": the stored augmentation j is drawn uniformly by a generator seeded with
    (seed, sample key, epoch), as the MobileCLIP reader keys by uid: a sample's choice does not depend
    on shard order or on which shards are loaded; mode "epoch": j = epoch mod N. With probability p_plain (same generator) the
    plain view and a one-hot target are returned instead. Call set_epoch before each epoch (with
    DataLoader workers that are not persistent, the copy made at iterator creation sees it).
    backend: how views are rendered; default: the run's recorded `reinforce.replay_backend` (the
    view its teachers scored), "pil" (Apple's ml-dr) when there is no run config.
    limits: byte bounds on what a sample's members may read or inflate to (formats.limits); default:
    from the run config's num_samples and topk, else formats.limits' defaults.
    A bad item is skipped and counted (module docstring): `skipped` {reason: count}.
    """

    def __init__(self, shards: str | list[str], mode: str = "random", p_plain: float = 0.0, seed: int = 0,
                 num_classes: int | None = None, image_augmentation: dict | None = None,
                 backend: str | None = None, limits: Limits | None = None):
        if mode not in ("random", "epoch"):
            raise ValueError(f"mode must be 'random' or 'epoch', not {mode!r}")
        if not 0.0 <= p_plain <= 1.0:
            raise ValueError(f"p_plain must be in [0, 1], not {p_plain}")
        self.mode, self.p_plain, self.seed, self.epoch = mode, float(p_plain), int(seed), 0
        config: dict = {}
        if isinstance(shards, str) and is_run_dir(shards):
            config = dr_config(shards) or {}
            shards = shard_urls(shards)
        elif isinstance(shards, str):
            shards = [shards]
        self.shards = list(shards)
        self.config = config
        self.num_classes = num_classes if num_classes is not None else _num_classes_from(config)
        self.augmenter = replay_augmenter(config.get("reinforce"), image_augmentation, backend)
        self.limits = limits or declared_limits(config)
        self._skipped = SkipCounters(SKIP_REASONS)
        self._bad: set[int] = set()  # items this process found unreadable

        # key -> (shard number, {ext: (offset, size)}); only offsets are kept
        self._index: list[tuple[int, dict]] = []
        self.keys: list[str] = []
        self._position: dict[str, int] = {}
        for s, url in enumerate(self.shards):
            for key, members in index_shard(url):
                if key in self._position:
                    raise SchemaError(f"sample key {key!r} appears twice ({url})")
                self._position[key] = len(self.keys)
                self.keys.append(key)
                self._index.append((s, members))
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    # --- file handles: opened lazily, per process, never pickled ---------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked worker: the parent's handles share a file position
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            # small read blocks: a sample's members are one short range (object stores would read 50 MiB ahead)
            fs, path = fsspec.core.url_to_fs(self.shards[shard])
            self._files[shard] = fs.open(path, "rb", block_size=RANDOM_READ_BLOCK)
        return self._files[shard]

    def _members(self, i: int, only: tuple[str, ...] | None = None) -> dict:
        """The members of item i, each size checked against its bound before it is read."""
        key = self.keys[i]
        problem = unsafe_name(key)
        if problem:
            raise SchemaError(f"sample key {key!r} {problem}", "bad_key")
        shard, offsets = self._index[i]
        wanted = {ext: where for ext, where in offsets.items() if only is None or ext in only}
        for ext, (_, size) in wanted.items():
            if size > self.limits.bound(ext):
                raise too_large(f"sample {key}: {ext}", size, self.limits.bound(ext))
        total = sum(size for _, size in wanted.values())
        if total > self.limits.sample:
            raise too_large(f"sample {key}: its members", total, self.limits.sample)
        f = self._file(shard)
        members = {"__key__": key}
        for ext, (offset, size) in wanted.items():
            f.seek(offset)
            members[ext] = f.read(size)
        return members

    # --- public API --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def index_of(self, key: str) -> int:
        return self._position[key]

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} of items skipped so far, all DataLoader workers together."""
        return self._skipped.as_dict()

    def reset_skipped(self) -> None:
        self._skipped.reset()

    def sample(self, i: int) -> ReinforcedSample:
        """Item i's stored sample; raises SchemaError (with a reason) instead of skipping it."""
        return decode_sample(self._members(i), self.limits)

    def _checked_image(self, sample: ReinforcedSample) -> torch.Tensor:
        # crop boxes refer to exactly these bytes; anything else would replay a different picture
        if sample.meta.get("sha256") != sha256_hex(sample.image):
            raise SchemaError(f"sample {sample.key}: sha256 in {META_MEMBER!r} does not match the image bytes",
                              "sha256_mismatch")
        return decode_rgb(sample.image)

    def _partner_image(self, partner: str | int) -> torch.Tensor:
        # our shards name partners by key; an int is a dataset index (ML-DR's convention)
        position = self._position.get(partner) if isinstance(partner, str) else partner
        if not isinstance(position, int) or not 0 <= position < len(self.keys):
            raise SchemaError(f"mixing partner {partner!r} is not in these shards", "missing_partner")
        key = self.keys[position]
        members = self._members(position, only=(META_MEMBER, *IMAGE_EXTENSIONS))
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None or META_MEMBER not in members:
            raise SchemaError(f"mixing partner {key}: no image or no {META_MEMBER!r} member", "missing_partner")
        try:
            meta = json.loads(members[META_MEMBER])
        except (ValueError, RecursionError) as exc:
            raise SchemaError(f"mixing partner {key}: {META_MEMBER!r} is not JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("sha256") != sha256_hex(image):
            raise SchemaError(f"mixing partner {key}: sha256 in {META_MEMBER!r} does not match the image bytes",
                              "sha256_mismatch")
        return decode_rgb(image)

    def choose(self, i: int, num_augmentations: int) -> int | None:
        """The stored augmentation used for item i this epoch, or None for the plain view."""
        rng = random.Random(entry_seed(self.seed, self.keys[i], self.epoch, "imagenet_plus"))
        plain = rng.random() < self.p_plain
        j = rng.randrange(num_augmentations) if self.mode == "random" else self.epoch % num_augmentations
        return None if plain else j

    def _require_classes(self) -> int:
        if self.num_classes is None:
            raise ValueError("num_classes is not in dr_config.json: pass num_classes=")
        return self.num_classes

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_classes = self._require_classes()
        i = range(len(self))[i]  # IndexError as usual; negative indices count from the end
        for step in range(MAX_CONSECUTIVE_SKIPS):
            j = (i + step) % len(self)
            if j in self._bad:
                continue
            try:
                return self._item(j, num_classes)
            except (ValueError, OSError) as exc:  # SchemaError and ImageDecodeError are ValueErrors
                self._skip(j, exc)
        raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} items in a row from index {i} could not be read "
                           f"(skipped: {self.skipped}): are these the run's shards?")

    def _skip(self, i: int, exc: Exception) -> None:
        self._bad.add(i)
        reason = getattr(exc, "reason", "unreadable_member" if isinstance(exc, OSError) else "replay_error")
        self._skipped.add(reason if reason in SKIP_REASONS else "schema")
        log.warning("skipping sample %s (%s): %s", self.keys[i], reason, exc)

    def _item(self, i: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.sample(i)
        ids_ok = sample.ids.size == 0 or 0 <= sample.ids.min() <= sample.ids.max() < num_classes
        if not (0 <= sample.label < num_classes and ids_ok):  # one_hot / densify would raise otherwise
            raise SchemaError(f"sample {sample.key}: label or class ids outside [0, {num_classes})")
        image = self._checked_image(sample)
        j = self.choose(i, sample.num_augmentations)
        if j is None:
            return self.augmenter.plain(image).float(), F.one_hot(torch.tensor(sample.label), num_classes).float()
        entry = sample.entries[j]
        partner_id = entry[0] if self.augmenter.uses_partner and isinstance(entry, list) else None
        partner = self._partner_image(partner_id) if partner_id is not None else None
        try:
            view = self.augmenter.apply(entry, image, partner)
        except (ValueError, TypeError, IndexError, KeyError) as exc:  # a box outside the image, a malformed slot
            raise SchemaError(f"sample {sample.key}, augmentation {j}: cannot replay: {exc}", "replay_error") from exc
        return view, densify(sample.values[j], sample.ids[j], num_classes)
