"""Byte-deterministic .npz (numpy's savez stamps the current time into each zip entry), and a bounded
reader: np.load inflates a whole member and allocates whatever shape its header claims."""
from __future__ import annotations

import io
import math
import zipfile
import zlib

import numpy as np

from reinforge.formats.limits import Limits, SchemaError, too_large

_EPOCH = (1980, 1, 1, 0, 0, 0)
MAX_ARRAYS = 64  # our npz members hold 2-4 arrays; a zip of thousands is not one of them
_KINDS = "biuf"  # bool, ints, floats: every array our formats store


def npy_bytes(array: np.ndarray) -> bytes:
    """What numpy.save writes for `array` (no pickled objects), as bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray], compress: bool = True) -> bytes:
    """Equivalent of numpy.savez(_compressed) with fixed zip timestamps; loads with np.load."""
    out = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=method) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy_bytes(array))
    return out.getvalue()


def load_npz(data: bytes, limit: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz, as np.load(allow_pickle=False) gives them, with all arrays together held
    to `limit` bytes (default: Limits.default().arrays): each array's shape and dtype are read from its
    .npy header and checked before it is allocated or inflated. SchemaError if unreadable,
    MemberTooLarge past the bound."""
    left = Limits.default().arrays if limit is None else limit
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARRAYS:
                raise SchemaError(f"npz holds {len(infos)} entries, more than {MAX_ARRAYS}")
            for info in infos:
                with zf.open(info) as f:
                    array = _read_npy(f, info.filename, left)
                left -= array.nbytes
                arrays[info.filename.removesuffix(".npy")] = array
    except SchemaError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError, zlib.error) as exc:  # not a zip, encrypted, unknown compression, bad .npy header
        raise SchemaError(f"unreadable: {type(exc).__name__}: {exc}") from None
    return arrays


def _header(f, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise SchemaError(f"npz entry {name}: .npy format version {version} is not supported")


def _read_npy(f, name: str, limit: int) -> np.ndarray:
    shape, fortran_order, dtype = _header(f, name)
    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise SchemaError(f"npz entry {name}: dtype {dtype} is not a plain number type")
    if any(d < 0 for d in shape):
        raise SchemaError(f"npz entry {name}: negative shape {shape}")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > limit:
        raise too_large(f"npz entry {name} {shape} {dtype}", nbytes, limit)
    array = np.empty(count, dtype)  # allocated only now that its size is known to be in bounds
    view, got = memoryview(array.view(np.uint8)), 0  # any byte order
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise SchemaError(f"npz entry {name}: {got} of {nbytes} bytes")
        got += n
    return array.reshape(shape, order="F" if fortran_order else "C")
