"""A parallel index build's parts on storage, and the merged index.faiss / uids.npy streamed from them.

Each shard group writes one part file (`write_part`) into a work folder of the output: its ids in global
row order, its vectors' codes laid out as faiss keeps them:
    sizes    int64[nlist]        entries per inverted list (IVF kinds)
    codes    uint8[n, code_size] the inverted lists' codes, list after list
    ids      int64[n]            the lists' ids (global rows), list after list
    vectors  uint8[n, vec_size]  flat codes in row order: IndexFlat's floats, IndexRefine's refine codes
    uids     u8,u8[n]
The driver then writes the index a serial build would have serialised (merging parts in group order
keeps every list in id order), holding one slab of lists at a time, never the index:
  * the header bytes are faiss' own serialisation of the trained empty index with ntotal set to the total
    (an empty "ilar" section, an empty code vector or IndexRefine's trailing k_factor are checked, then
    replaced by the merged payload);
  * "ilar" (faiss ArrayInvertedLists): nlist, code_size, "full" sizes (more than half of the lists used)
    or "sprs" (list, size) pairs, then per list its codes and its ids; `_write_lists` gathers a slab of
    lists from every part, each part's entries put in place list-major as it is read;
  * flat codes: a size (floats for IndexFlat, bytes for IndexScalarQuantizer), then the parts in order.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from reinforge.formats.subset import SUBSET_DTYPE
from reinforge.io.storage import filesystem

COPY_BYTES = 2 << 20  # a streamed copy's read size
SLAB_BYTES = 2 << 20  # inverted-list bytes gathered per merge step (at least 64 KiB per part: few reads)


@dataclass
class Layout:
    """What a part holds per vector (from the trained empty index)."""
    nlist: int  # 0: no inverted lists (flat)
    code_size: int  # bytes per vector in the inverted lists
    vec_size: int  # bytes per vector of flat codes (IndexFlat or the refine index); 0: none

    def offsets(self, n: int) -> dict:
        sizes = 8 * self.nlist
        codes = sizes + n * self.code_size
        ids = codes + (n * 8 if self.nlist else 0)
        vectors = ids + n * self.vec_size
        return {"sizes": 0, "codes": sizes, "ids": codes, "vectors": ids, "uids": vectors,
                "end": vectors + n * SUBSET_DTYPE.itemsize}


def _ivf(index):
    import faiss
    return faiss.extract_index_ivf(index) if isinstance(index, faiss.IndexIVF) else None


def _flat_codes(index):
    """The index holding flat codes in row order: the IndexFlat itself, or IndexRefine's refine index."""
    import faiss
    if isinstance(index, faiss.IndexRefine):
        return faiss.downcast_index(index.refine_index)
    return index if isinstance(index, faiss.IndexFlatCodes) else None


def _parts(index) -> tuple:
    """(IVF index or None, flat-codes index or None) of a flat, IVF or IndexRefine(IVF, codes) index."""
    import faiss
    base = faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index
    flat = _flat_codes(index)
    return (base if isinstance(base, faiss.IndexIVF) else None), flat


def layout_of(index) -> Layout:
    ivf, flat = _parts(index)
    if ivf is None and flat is None:
        raise ValueError(f"cannot merge a {type(index).__name__} by streaming")
    return Layout(ivf.nlist if ivf is not None else 0, ivf.code_size if ivf is not None else 0,
                  flat.code_size if flat is not None else 0)


def write_part(url: str, index, first_row: int, uids: np.ndarray) -> None:
    """A group's populated index and uids as one part file (see the module doc)."""
    import faiss

    from reinforge.io.storage import atomic_open
    ivf, flat = _parts(index)
    with atomic_open(url) as f:
        if ivf is not None:
            lists = ivf.invlists
            sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], np.int64)
            f.write(sizes.tobytes())
            for i in np.flatnonzero(sizes).tolist():
                f.write(faiss.rev_swig_ptr(lists.get_codes(i), int(sizes[i]) * ivf.code_size).tobytes())
            for i in np.flatnonzero(sizes).tolist():
                f.write((faiss.rev_swig_ptr(lists.get_ids(i), int(sizes[i])) + first_row).tobytes())
        if flat is not None:
            f.write(faiss.vector_to_array(flat.codes).tobytes())
        f.write(np.ascontiguousarray(uids, SUBSET_DTYPE).tobytes())


def _read(fs, path: str, start: int, length: int) -> bytes:
    with fs.open(path, "rb") as f:
        f.seek(start)
        data = f.read(length)
    if len(data) != length:
        raise RuntimeError(f"{path}: {len(data)} bytes at {start}, expected {length} (part file truncated?)")
    return data


def _copy(out, fs, path: str, start: int, length: int) -> None:
    """`length` bytes of a file from `start` on, through one reused buffer of at most COPY_BYTES."""
    buf = memoryview(bytearray(min(COPY_BYTES, length)))
    with fs.open(path, "rb") as f:
        f.seek(start)
        for at in range(0, length, COPY_BYTES):
            piece = buf[:min(COPY_BYTES, length - at)]
            got = 0
            while got < len(piece):
                n = f.readinto(piece[got:])
                if not n:
                    raise RuntimeError(f"{path}: {got} bytes at {start + at}, expected {len(piece)} "
                                       "(part file truncated?)")
                got += n
            out.write(piece)


class PartFiles:
    """The groups' part files (in group order) and their vector counts."""

    def __init__(self, urls: list[str], rows: list[int], layout: Layout):
        self.urls, self.rows, self.layout = urls, rows, layout
        self.fs = [filesystem(u) for u in urls]
        self.at = [layout.offsets(n) for n in rows]

    def section(self, g: int, name: str, start: int, length: int) -> bytes:
        fs, path = self.fs[g]
        return _read(fs, path, self.at[g][name] + start, length)

    def copy(self, out, name: str, per_row: int) -> None:
        """Section `name` of every part, in group order."""
        for g, n in enumerate(self.rows):
            fs, path = self.fs[g]
            _copy(out, fs, path, self.at[g][name], n * per_row)


def _header(empty, n: int) -> bytes:
    """faiss' serialisation of the trained empty index with ntotal = n (and its parts' ntotal)."""
    import faiss
    for part in (empty, *filter(None, _parts(empty))):
        part.ntotal = n
    try:
        return faiss.serialize_index(empty).tobytes()
    finally:
        for part in (empty, *filter(None, _parts(empty))):
            part.ntotal = 0


def _cut(data: bytes, tail: bytes, what: str) -> bytes:
    if not data.endswith(tail):
        raise RuntimeError(f"faiss wrote an unexpected {what} (the streaming merge knows faiss 1.x's layout)")
    return data[:len(data) - len(tail)]


def _write_lists(out, parts: PartFiles, ivf) -> None:
    """The merged "ilar" section: per list, every part's codes then every part's ids, in group order."""
    nlist, code_size = ivf.nlist, ivf.code_size
    total = np.zeros(nlist, np.int64)
    for g in range(len(parts.urls)):
        total += np.frombuffer(parts.section(g, "sizes", 0, 8 * nlist), np.int64)
    out.write(b"ilar" + struct.pack("<QQ", nlist, code_size))
    used = np.flatnonzero(total)
    if len(used) > nlist // 2:
        out.write(b"full" + struct.pack("<Q", nlist) + total.astype("<u8").tobytes())
    else:
        pairs = np.stack([used, total[used]], axis=1).astype("<u8").ravel()
        out.write(b"sprs" + struct.pack("<Q", len(pairs)) + pairs.tobytes())
    slabs = _slabs(total, code_size + 8, max(SLAB_BYTES, len(parts.urls) * (64 << 10)))
    most = max(int(total[first:last].sum()) for first, last in slabs)
    codes, ids = np.empty((most, code_size), np.uint8), np.empty(most, np.int64)  # reused by every slab
    done = np.zeros(len(parts.urls), np.int64)  # per part: entries of the lists already merged
    for first, last in slabs:
        sizes = np.stack([np.frombuffer(parts.section(g, "sizes", 8 * first, 8 * (last - first)), np.int64)
                          for g in range(len(parts.urls))])  # [part, list]
        bounds = _gather_slab(parts, sizes, done, codes, ids)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                out.write(_raw(codes[a:b]))
                out.write(_raw(ids[a:b]))


def _slabs(total: np.ndarray, entry_bytes: int, budget: int) -> list[tuple[int, int]]:
    """Runs of lists [first, last) of about `budget` bytes each (a longer list alone)."""
    ends, out, first = np.cumsum(total * entry_bytes), [], 0
    while first < len(total):
        last = max(first + 1, int(np.searchsorted(ends, (ends[first - 1] if first else 0) + budget, "right")))
        out.append((first, min(last, len(total))))
        first = out[-1][1]
    return out


def _gather_slab(parts: PartFiles, sizes: np.ndarray, done: np.ndarray, codes: np.ndarray, ids: np.ndarray) -> list:
    """A slab of lists (sizes: [part, list]) read part after part into `codes` and `ids` in list-major order
    (each list: the parts' entries in group order); returns the lists' bounds there, and advances `done`."""
    code_size = codes.shape[1]
    bounds = np.concatenate([[0], np.cumsum(sizes.sum(axis=0))])
    at = bounds[:-1] + np.cumsum(sizes, axis=0) - sizes  # [part, list]: where the part's entries of a list go
    for g, s in enumerate(sizes):
        k = int(s.sum())
        if not k:
            continue
        starts = np.cumsum(s) - s  # the lists' first entries within this part's slab
        dest = np.repeat(at[g] - starts, s) + np.arange(k)
        codes[dest] = np.frombuffer(parts.section(g, "codes", int(done[g]) * code_size, k * code_size),
                                    np.uint8).reshape(k, code_size)
        ids[dest] = np.frombuffer(parts.section(g, "ids", int(done[g]) * 8, k * 8), np.int64)
        done[g] += k
    return bounds.tolist()


def _raw(array: np.ndarray) -> memoryview:
    """A contiguous array's bytes, without a copy."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _write_index(out, empty, parts: PartFiles, n: int) -> None:
    import faiss
    if isinstance(empty, faiss.IndexRefine):  # header, base index, refine index, k_factor
        base, refine = faiss.downcast_index(empty.base_index), faiss.downcast_index(empty.refine_index)
        whole, b, r = _header(empty, n), _header(base, n), _header(refine, n)
        head, tail = whole[:len(whole) - len(b) - len(r) - 4], whole[-4:]
        if whole[len(head):len(head) + len(b) + len(r)] != b + r:
            raise RuntimeError("faiss wrote an unexpected IndexRefine (the streaming merge knows faiss 1.x's layout)")
        del whole, b, r  # the base index's header (its coarse quantizer) is written again below
        out.write(head)
        _write_index(out, base, parts, n)
        _write_index(out, refine, parts, n)
        out.write(tail)
    elif isinstance(empty, faiss.IndexIVF):
        tail = b"ilar" + struct.pack("<QQ", empty.nlist, empty.code_size) + b"sprs" + struct.pack("<Q", 0)
        out.write(_cut(_header(empty, n), tail, "empty IVF index"))
        _write_lists(out, parts, empty)
    else:  # IndexFlat (size in floats) or IndexScalarQuantizer (size in bytes): codes in row order
        out.write(_cut(_header(empty, n), struct.pack("<Q", 0), "empty flat index"))
        size = n * empty.code_size
        out.write(struct.pack("<Q", size // 4 if isinstance(empty, faiss.IndexFlat) else size))
        parts.copy(out, "vectors", empty.code_size)


def write_merged_index(url: str, empty, parts: PartFiles) -> int:
    """index.faiss of the parts merged in group order (the bytes of a serial build); returns its size."""
    from reinforge.io.storage import atomic_open
    with atomic_open(url) as out:
        _write_index(out, empty, parts, sum(parts.rows))
        return out.bytes


def write_merged_uids(url: str, parts: PartFiles) -> None:
    """uids.npy as np.save writes it: the .npy header for all rows, then each part's uids."""
    from reinforge.io.storage import atomic_open
    header = {"descr": np.lib.format.dtype_to_descr(SUBSET_DTYPE), "fortran_order": False,
              "shape": (sum(parts.rows),)}
    with atomic_open(url) as out:
        np.lib.format.write_array_header_1_0(out, header)
        parts.copy(out, "uids", SUBSET_DTYPE.itemsize)
