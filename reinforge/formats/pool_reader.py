"""Reading pool samples back from the byte ranges the uid index recorded (reshard and join tasks).

One sample: PoolReader.fetch. Many samples of one pool shard in a row (a reshard task's assignment is
grouped by pool shard): PoolReader.fetch_many reads ranges that lie close together with one read and
parses the plain ustar headers of the whole read at once (samples_in_block); anything unusual in a
sample (another header type, a damaged or truncated header, a zero block) is parsed by the one-sample
path, so both give exactly the same samples.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from typing import Iterator

import numpy as np

from reinforge.formats import tarscan
from reinforge.formats.limits import Limits
from reinforge.formats.shard_spans import checksums_ok
from reinforge.formats.wds import ShardReadError, iter_samples, split_member_name, unsafe_name
from reinforge.io.storage import filesystem

MERGE_GAP = 64 << 10  # read over a gap this small between two ranges rather than start another read
MAX_READ = 16 << 20  # bytes of one read at most (what a task holds of a pool shard at a time)


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
    return _one_key(keys, sample, where)


def _one_key(keys: set, sample: dict, where: str) -> dict:
    if len(keys) != 1:
        return {"__error__": ("bad_range", f"{where} does not hold one sample (pool shard changed since indexing?)")}
    problem = unsafe_name(next(iter(keys)))
    return {"__error__": ("bad_key", f"{where}: sample key {next(iter(keys))!r} {problem}")} if problem else sample


def samples_in_blocks(blocks: list[tuple[bytes, int]], spans: list[tuple[int, int, int]], url: str) -> list[dict]:
    """sample_from_range of each (block, offset, length) of `spans`, a block being a pool shard's bytes
    from `start` on: (data, start). The members of every sample are found in one loop over the headers,
    whose checksums and types are then checked all at once; a sample with anything else in its range
    goes through sample_from_range."""
    headers, members, plain = [], [], []  # per sample: its members' (header row, data offset, size)
    for b, offset, length in spans:
        block, start = blocks[b]
        pos, end, mine = offset - start, offset - start + length, []
        while pos < end:
            header = block[pos:pos + 512]
            if len(header) < 512 or header[135] != 0:  # truncated, or a size field not as tarfile writes it
                break
            try:
                size = int(header[124:135], 8)
            except ValueError:
                break
            if size < 0 or pos + 512 + size > end:
                break
            mine.append((len(headers), pos + 512, size))
            headers.append(header)
            pos += 512 + ((size + 511) & -512)
        plain.append(pos == end <= len(block) and bool(mine))
        members.append(mine)
    if headers:
        h = np.frombuffer(b"".join(headers), np.uint8).reshape(-1, 512)
        ok = checksums_ok(h) & ((h[:, 156] == 48) | (h[:, 156] == 0))  # regular files only
        ok &= (h[:, 345] == 0) | (h[:, 257:262] != np.frombuffer(b"ustar", np.uint8)).any(axis=1)  # no name prefix
        ok = ok.tolist()
    samples = []
    for (b, offset, length), mine, fast in zip(spans, members, plain):
        block, start = blocks[b]
        where = f"{url}@{offset}+{length}"
        if not (fast and all(ok[row] for row, _, _ in mine)):
            samples.append(sample_from_range(block[offset - start:offset - start + length], length, where))
            continue
        keys, sample = set(), {}
        for row, data, size in mine:
            key, ext = split_member_name(headers[row][:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
            keys.add(key)
            sample[ext] = block[data:data + size]
        samples.append(_one_key(keys, sample, where))
    return samples


class PoolReader:
    """Pool samples by byte range, keeping the last few pool shards open. A range over limits.sample
    (default Limits.for_images()) is refused unread (`member_too_large`)."""

    def __init__(self, open_limit: int = 4, limits: Limits | None = None):
        self.open_limit = open_limit
        self.limits = limits or Limits.for_images()
        self.handles: OrderedDict = OrderedDict()

    def _handle(self, url: str):
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
        return handle

    def _too_large(self, url: str, offset: int, length: int) -> dict | None:
        if length > self.limits.sample:  # the index took the size from tar headers: not read yet
            return {"__error__": ("member_too_large", f"{url}@{offset}: sample of {length} bytes, over the "
                                                      f"sample bound of {self.limits.sample}")}
        return None

    def fetch(self, url: str, offset: int, length: int) -> dict:
        refused = self._too_large(url, offset, length)
        if refused:
            return refused
        handle = self._handle(url)
        handle.seek(offset)
        return sample_from_range(handle.read(length), length, f"{url}@{offset}+{length}")

    def fetch_many(self, url: str, spans: list[tuple[int, int]]) -> Iterator[dict]:
        """fetch(url, offset, length) of each span, in order. Spans that follow each other in the shard
        within MERGE_GAP bytes are read together, and the samples of about MAX_READ bytes of reads are
        parsed together (samples_in_blocks)."""
        reads: list[list[int]] = []  # [start, end) of each read of this group
        group: list[tuple] = []  # (read, offset, length) of each span of this group; read None: refused
        size = 0
        for offset, length in spans:
            if length > self.limits.sample:
                group.append((None, offset, length))
                continue
            if reads and reads[-1][1] <= offset <= reads[-1][1] + MERGE_GAP and offset + length - reads[-1][0] <= MAX_READ:
                size += offset + length - reads[-1][1]
                reads[-1][1] = offset + length
            else:
                if size >= MAX_READ:
                    yield from self._read_group(url, reads, group)
                    reads, group, size = [], [], 0
                reads.append([offset, offset + length])
                size += length
            group.append((len(reads) - 1, offset, length))
        yield from self._read_group(url, reads, group)

    def _read_group(self, url: str, reads: list[list[int]], group: list[tuple]) -> list[dict]:
        blocks = []
        for start, end in reads:
            handle = self._handle(url)
            handle.seek(start)
            blocks.append((handle.read(end - start), start))
        parsed = iter(samples_in_blocks(blocks, [span for span in group if span[0] is not None], url))
        return [next(parsed) if read is not None else self._too_large(url, offset, length)
                for read, offset, length in group]

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()
