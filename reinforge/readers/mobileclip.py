"""Training-side reader for DataCompDR / DFNDR shards (FORMATS §2), for open_clip-style trainers.

Per sample and epoch it picks one stored augmentation j and one synthetic caption c, replays
param_aug[j] on the stored image bytes and returns the view with the matching teacher rows:
image_emb[j], the ground-truth text_emb row and <syn_key>_emb[c]. Imports reinforge.formats and reinforge.io, torch
and webdataset only (no Ray), so a trainer can use it as is.

Bad samples (wrong sha256, crop boxes outside the stored image, schema errors, unsafe keys, members
that would inflate past the bounds the run declares, unreadable shards) are skipped, logged with their
uid and counted in `skipped`, whichever DataLoader worker saw them; an epoch never stops on them.
"""
from __future__ import annotations

import copy
import logging
import multiprocessing
import random
from typing import Callable, Iterator
from urllib.parse import urlparse

import fsspec
import torch
from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls

from reinforge.formats.augment import replay_augmenter
from reinforge.formats.datacomp_dr import decode_dr_sample
from reinforge.formats.datacomp_dr_replay import ReplayError, replayable_image
from reinforge.formats.imagenet_plus import SchemaError
from reinforge.formats.limits import Limits, declared_limits
from reinforge.formats.seeds import entry_seed
from reinforge.formats.wds import ShardReadError, iter_samples
from reinforge.io.runs import committed_shards, dr_config, is_run_dir
from reinforge.readers.skips import SkipCounters, spawning

log = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "unreadable_shard", "unreadable_member", "bad_key", "member_too_large", "schema", "missing_image",
    "missing_caption", "missing_syn_captions", "missing_augmentations", "missing_sha256", "sha256_mismatch",
    "corrupt_image", "bad_params", "crop_out_of_bounds", "replay_error",
)
# Keys of Apple's configs that torchvision-free replay does not need (their trainer ignores them too).
_IGNORED_TRANSFORMS = ("to_rgb",)


def _fsspec_url(url: str) -> bool:
    """Read through fsspec (s3://, memory://, ...) rather than webdataset's gopen, which keeps local
    paths and the schemes it has a handler for (pipe:, http(s) with curl, gs with gsutil, ...)."""
    scheme = urlparse(url).scheme
    return scheme not in ("", "file") and scheme not in gopen_schemes


def open_shard(url: str):
    """A shard's byte stream: gopen for local paths and its own schemes, fsspec for the rest."""
    if not _fsspec_url(url):
        return gopen(url, "rb")
    fs, path = fsspec.core.url_to_fs(url)
    return fs.open(path, "rb")


def augmentation_from_config(config: dict, overrides: dict | None = None) -> dict:
    """reinforce.image_augmentation of a trainer config, with per-transform field overrides merged in
    (the trainer's own crop size / interpolation / normalisation, as the reference trainer does)."""
    try:
        augmentation = copy.deepcopy(config["reinforce"]["image_augmentation"])
    except (KeyError, TypeError):
        raise ValueError("the config has no reinforce.image_augmentation") from None
    for name in _IGNORED_TRANSFORMS:
        augmentation.pop(name, None)
    for name, fields in (overrides or {}).items():
        augmentation[name] = {**(augmentation.get(name) or {}), **fields}
    return augmentation


class MobileCLIPDRDataset(torch.utils.data.IterableDataset):
    """Iterable DataCompDR / DFNDR dataset yielding, per sample, a dict of

      image      float32 [3, H, W]: param_aug[j] replayed (Augmenter.apply, bit-identical)
      text       int64 [context_length]: the ground-truth caption's tokens
      syn_text   int64 [context_length]: synthetic caption c of `syn_key`
      image_emb  float32 [D]: image_emb[j]
      text_emb   float32 [D]: the ground-truth row (row 0 of text_emb)
      syn_emb    float32 [D]: <syn_key>_emb[c]
      uid (str), aug_index (int j), syn_index (int c)

    which torch's default collate batches. mode "random": j and c are drawn uniformly by a generator
    seeded with (seed, epoch, uid), so a sample's choice does not depend on worker or shard order;
    mode "epoch": j = epoch mod N and c = epoch mod S (the reference trainer's sequential mode).

    urls_or_run_dir: a finished run directory, local or an fsspec URL such as s3://bucket/run (shards
    from its manifests; augmentation from its dr_config.json), or shard URLs / a brace pattern: local
    paths and what webdataset's gopen opens (pipe:, http(s)), else fsspec URLs (s3://bucket/{000..009}.tar).
    overrides: per-transform fields merged into the augmentation, e.g. the student's
    {"random_resized_crop": {"size": 256}, "normalize": {"mean": ..., "std": ...}}.
    backend: how views are rendered; default: the run's recorded `reinforce.replay_backend` (the
    view its teachers scored), "pil" (Apple's trainers) when there is no run config.
    limits: byte bounds on what a sample's members may read or inflate to (formats.limits); default:
    from the run config's num_samples, teacher dims and captioners, else formats.limits' defaults.
    Shards are split over distributed ranks and DataLoader workers. Call set_epoch(e) before each
    epoch; it is shared with worker processes, persistent ones included.
    """

    def __init__(self, urls_or_run_dir: str | list[str], tokenizer: Callable, image_augmentation: dict | None = None,
                 mode: str = "random", seed: int = 0, syn_key: str = "syn_text", overrides: dict | None = None,
                 shuffle_shards: bool = False, backend: str | None = None, limits: Limits | None = None):
        if mode not in ("random", "epoch"):
            raise ValueError(f"mode must be 'random' or 'epoch', not {mode!r}")
        self.mode, self.seed, self.syn_key, self.shuffle_shards = mode, int(seed), syn_key, shuffle_shards
        self.tokenizer = tokenizer
        self.config: dict = {}
        self.num_samples: int | None = None  # known for run directories (from the manifests)
        if isinstance(urls_or_run_dir, str) and is_run_dir(urls_or_run_dir):
            self.config = dr_config(urls_or_run_dir) or {}
            shards = committed_shards(urls_or_run_dir)
            self.urls, self.num_samples = [s.url for s in shards], sum(s.samples for s in shards)
        elif isinstance(urls_or_run_dir, str):
            self.urls = list(expand_urls(urls_or_run_dir))
        else:
            self.urls = [u for url in urls_or_run_dir for u in expand_urls(url)]
        if not self.urls:
            raise ValueError(f"no shards found in {urls_or_run_dir!r}")
        if image_augmentation is not None:
            augmentation = augmentation_from_config({"reinforce": {"image_augmentation": image_augmentation}},
                                                    overrides)
        elif self.config:
            augmentation = augmentation_from_config(self.config, overrides)
        else:
            raise ValueError("no augmentation config: pass a run directory with dr_config.json, or image_augmentation")
        self.augmenter = replay_augmenter(self.config.get("reinforce"), augmentation, backend)
        if self.augmenter.uses_partner:  # contrastive targets are per image-text pair; nothing to mix with
            raise ValueError("mixup/cutmix entries are not supported for image-text shards")
        self.teacher_dims: list[int] | None = self.config.get("teacher_dims")
        self.teacher_logit_scales: list[float] | None = self.config.get("teacher_logit_scales")
        # [contrastive, distillation] for readers.losses.mobileclip_distill_loss(loss_weights=...)
        self.distill_loss_weights: list[float] | None = self.config.get("distill_loss_weights")
        self.limits = limits or declared_limits(self.config)
        self._epoch = multiprocessing.Value("q", 0)
        self._skipped = SkipCounters(SKIP_REASONS)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if not spawning():  # shared memory travels only to worker processes; elsewhere copy the value
            state["_epoch"] = int(self._epoch.value)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_epoch"], int):
            state["_epoch"] = multiprocessing.Value("q", state["_epoch"])
        self.__dict__.update(state)

    # --- epoch and counters ---------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} of samples (or shards, for unreadable_shard) skipped so far, all workers."""
        return self._skipped.as_dict()

    def reset_skipped(self) -> None:
        self._skipped.reset()

    # --- choices --------------------------------------------------------------------------------
    def choose(self, uid: str, num_augmentations: int, num_captions: int, epoch: int | None = None) -> tuple[int, int]:
        """(augmentation index j, synthetic caption index c) of sample `uid` in `epoch`."""
        epoch = self.epoch if epoch is None else epoch
        if self.mode == "epoch":
            return epoch % num_augmentations, epoch % num_captions
        rng = random.Random(entry_seed(self.seed, uid, epoch, "mobileclip_dr"))
        return rng.randrange(num_augmentations), rng.randrange(num_captions)

    # --- iteration ------------------------------------------------------------------------------
    def shards_for_this_worker(self, epoch: int) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(entry_seed(self.seed, "shards", epoch)).shuffle(urls)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return urls[rank * workers + worker::world * workers]

    def _skip(self, reason: str, uid: str, url: str, message: str) -> None:
        self._skipped.add(reason)
        log.warning("skipping sample %s of %s (%s): %s", uid, url, reason, message)

    def _item(self, members: dict, url: str, epoch: int) -> dict | None:
        uid = str(members.get("__key__", "?")).rpartition("/")[2]
        if "__error__" in members:  # unreadable_member, bad_key, member_too_large
            reason, message = members["__error__"]
            self._skip(reason, uid, url, message)
            return None
        try:
            sample = decode_dr_sample(members, self.limits)
        except SchemaError as exc:  # schema, or member_too_large
            self._skip(exc.reason, uid, url, str(exc))
            return None
        captions = sample.syn.get(self.syn_key) or []
        problem = ("missing_caption" if sample.caption is None else
                   "missing_syn_captions" if not captions else
                   "missing_augmentations" if not sample.entries else None)
        if problem:
            self._skip(problem, uid, url, f"a trainable sample needs txt, {self.syn_key} captions and param_aug")
            return None
        try:
            image = replayable_image(sample, sample.image, self.augmenter)  # sha256 and crop bounds first
            j, c = self.choose(sample.uid, len(sample.entries), len(captions), epoch)
            view = self.augmenter.apply(sample.entries[j], image)
        except ReplayError as exc:
            self._skip(exc.reason, uid, url, str(exc))
            return None
        except (ValueError, TypeError, IndexError, KeyError) as exc:  # a slot the bounds check does not cover
            self._skip("replay_error", uid, url, str(exc))
            return None
        return {
            "image": view.float(),
            "text": self.tokenizer(sample.caption)[0],
            "syn_text": self.tokenizer(captions[c])[0],
            "image_emb": torch.from_numpy(sample.image_emb[j].copy()),
            "text_emb": torch.from_numpy(sample.text_emb[0].copy()),
            "syn_emb": torch.from_numpy(sample.syn_emb[self.syn_key][c].copy()),
            "uid": sample.uid, "aug_index": j, "syn_index": c,
        }

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        for url in self.shards_for_this_worker(epoch):
            try:
                with open_shard(url) as stream:
                    for members in iter_samples(stream, self.limits):
                        item = self._item(members, url, epoch)
                        if item is not None:
                            yield item
            except (ShardReadError, OSError) as exc:  # samples read before the damage were yielded
                self._skipped.add("unreadable_shard")
                log.warning("skipping the rest of shard %s: %s", url, exc)
