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
    lists from every part and reorders it list-major with one stable sort;
  * flat codes: a size (floats for IndexFlat, bytes for IndexScalarQuantizer), then the parts in order.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from reinforge.formats.subset import SUBSET_DTYPE
from reinforge.io.storage import filesystem

COPY_BYTES = 16 << 20  # a streamed copy's read size
SLAB_BYTES = 16 << 20  # inverted-list bytes gathered per merge step (at least 64 KiB per part: few reads)


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
    for at in range(start, start + length, COPY_BYTES):
        out.write(_read(fs, path, at, min(COPY_BYTES, start + length - at)))


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
    budget = max(SLAB_BYTES, len(parts.urls) * (64 << 10))
    ends = np.cumsum(total * (code_size + 8))
    done = np.zeros(len(parts.urls), np.int64)  # per part: entries of the lists already merged
    first = 0
    while first < nlist:
        last = max(first + 1, int(np.searchsorted(ends, (ends[first - 1] if first else 0) + budget, "right")))
        last = min(last, nlist)
        sizes, codes, ids = [], [], []
        for g in range(len(parts.urls)):
            s = np.frombuffer(parts.section(g, "sizes", 8 * first, 8 * (last - first)), np.int64)
            k = int(s.sum())
            codes.append(np.frombuffer(parts.section(g, "codes", int(done[g]) * code_size, k * code_size), np.uint8))
            ids.append(np.frombuffer(parts.section(g, "ids", int(done[g]) * 8, k * 8), np.int64))
            sizes.append(s)
            done[g] += k
        sizes = np.stack(sizes)  # [group, list]
        order = np.argsort(np.repeat(np.tile(np.arange(last - first), len(sizes)), sizes.ravel()), kind="stable")
        codes = np.concatenate(codes).reshape(-1, code_size)[order]
        ids = np.concatenate(ids)[order]
        bounds = np.concatenate([[0], np.cumsum(sizes.sum(axis=0))]).tolist()
        out.write(b"".join(piece for a, b in zip(bounds[:-1], bounds[1:]) if b > a
                           for piece in (codes[a:b].tobytes(), ids[a:b].tobytes())))
        first = last


def _write_index(out, empty, parts: PartFiles, n: int) -> None:
    import faiss
    if isinstance(empty, faiss.IndexRefine):  # header, base index, refine index, k_factor
        base, refine = faiss.downcast_index(empty.base_index), faiss.downcast_index(empty.refine_index)
        whole, b, r = _header(empty, n), _header(base, n), _header(refine, n)
        head = whole[:len(whole) - len(b) - len(r) - 4]
        if whole[len(head):len(head) + len(b) + len(r)] != b + r:
            raise RuntimeError("faiss wrote an unexpected IndexRefine (the streaming merge knows faiss 1.x's layout)")
        out.write(head)
        _write_index(out, base, parts, n)
        _write_index(out, refine, parts, n)
        out.write(whole[-4:])
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
