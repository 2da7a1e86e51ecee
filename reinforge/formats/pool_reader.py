"""Reading single pool samples back from the byte ranges the uid index recorded (reshard and join tasks)."""
from __future__ import annotations

import io
from collections import OrderedDict

from reinforge.formats import tarscan
from reinforge.formats.limits import Limits
from reinforge.formats.wds import ShardReadError, iter_samples, split_member_name, unsafe_name
from reinforge.io.storage import filesystem


def sample_from_range(data: bytes, length: int, where: str) -> dict:
    """The members of one sample from its byte range: the fast header scan, tarfile for unusual tars."""
    bad = {"__error__": ("bad_range", f"{where} does not hold one sample (pool shard changed since indexing?)")}
    if len(data) != length:
        return bad
    try:
        members = tarscan.members_of(data)
        keys = {split_member_name(name)[0] for name, _ in members}
        sample = {split_member_name(name)[1]: payload for name, payload in members}
    except tarscan.Unsupported:
        try:
            samples = list(iter_samples(io.BytesIO(data)))
        except ShardReadError:
            return bad
        keys, sample = {s["__key__"] for s in samples}, (samples[0] if samples else {})
        sample.pop("__key__", None)
    except tarscan.Corrupt:
        return bad
    if len(keys) != 1:
        return bad
    problem = unsafe_name(next(iter(keys)))
    return {"__error__": ("bad_key", f"{where}: sample key {next(iter(keys))!r} {problem}")} if problem else sample


class PoolReader:
    """Single pool samples by byte range, keeping the last few pool shards open. A range over
    limits.sample (default Limits.for_images()) is refused unread (`member_too_large`)."""

    def __init__(self, open_limit: int = 4, limits: Limits | None = None):
        self.open_limit = open_limit
        self.limits = limits or Limits.for_images()
        self.handles: OrderedDict = OrderedDict()

    def fetch(self, url: str, offset: int, length: int) -> dict:
        if length > self.limits.sample:  # the index took the size from tar headers: not read yet
            return {"__error__": ("member_too_large", f"{url}@{offset}: sample of {length} bytes, over the "
                                                      f"sample bound of {self.limits.sample}")}
        handle = self.handles.pop(url, None)
        if handle is None:
            fs, path = filesystem(url)
            try:
                handle = fs.open(path, "rb")
            except OSError as exc:  # a pool shard gone since planning fails the task, loudly
                raise ShardReadError(f"cannot open pool shard {url}: {exc}") from exc
            if len(self.handles) >= self.open_limit:
                self.handles.popitem(last=False)[1].close()
        self.handles[url] = handle
        handle.seek(offset)
        return sample_from_range(handle.read(length), length, f"{url}@{offset}+{length}")

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()
