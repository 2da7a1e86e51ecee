"""DataCompDR / DFNDR sample layout (FORMATS §2): what MobileCLIP's open_clip trainer reads.

One WebDataset sample per image-text pair, keyed by the DataComp uid (32 lowercase hex). Members,
in this order:
  url.txt    image URL (optional)
  <ext>      image bytes (jpg/jpeg/png/webp); absent in reinforcement-only shards (Apple's release)
  txt        ground-truth caption (absent likewise)
  syn.json   {"syn_text": [S captions], "syn_text_<suffix>": [...]}
  paug.json  {"param_aug": [N entries]} (FORMATS §1), a real JSON list, plain (not gzipped)
  npz        numpy .npz (float32 or float16), byte-deterministic (arrays.npz_bytes)
  pth.gz     gzip(torch.save(dict of tensors)), bfloat16 by default: the alternative to npz
  qemb.npz   instead of both, when a storage codec is chosen (formats.codecs): reinforge's readers only
  json       {"uid", "sha256" (of the image bytes the crop boxes refer to), ...extra meta}

Tensors: image_emb [N, D] (row n = teachers' embedding of param_aug[n]) and then either
  legacy (DataCompDR): text_emb [G+S, D] = ground-truth rows, then syn_text's S rows in order;
  dfndr:               text_emb [G, D] plus <syn_key>_emb [S, D] per synthetic-caption key.
D = the teachers' dims concatenated in teacher order, each slice unit-norm on its own.
Whether a sample replays on its image: datacomp_dr_replay.py; the dr_config.json beside the shards:
dr_trainer_config.py.

Pure code: no Ray, no models.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from reinforge.formats import codecs as _codecs
from reinforge.formats.arrays import load_npz, npz_bytes
from reinforge.formats.image import IMAGE_EXTENSIONS
from reinforge.formats.imagenet_plus import SchemaError, dumps_compact, sha256_hex
from reinforge.formats.limits import SLACK, Limits, MemberTooLarge, gunzip, too_large

UID = re.compile(r"^[0-9a-f]{32}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SYN_KEY = re.compile(r"^syn_text(_[A-Za-z0-9_]+)?$")

URL_MEMBER, CAPTION_MEMBER, SYN_MEMBER = "url.txt", "txt", "syn.json"
PARAMS_MEMBER, NPZ_MEMBER, PTH_MEMBER, META_MEMBER = "paug.json", "npz", "pth.gz", "json"

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StorageSpec:
    """How the embeddings are stored. dtype None = the format's usual one: float32 for npz (DataCompDR),
    bfloat16 for pth.gz (DataCompDR-12M-bf16). codec "none" writes that format; another codec
    (formats.codecs) writes its `qemb.npz` member instead, which only reinforge's readers decode (format and
    dtype then say what `reinforge export datacompdr` re-expands to)."""
    format: str = "npz"  # "npz" | "pth.gz"
    dtype: str | None = None  # npz: "float32" | "float16"; pth.gz: also "bfloat16"
    layout: str = "legacy"  # "legacy" | "dfndr"
    codec: str = _codecs.NONE
    codec_params: dict | None = None

    def encoder(self) -> _codecs.Codec | None:
        """The codec that writes the embeddings, None for the plain npz / pth.gz member."""
        return None if self.codec == _codecs.NONE else _codecs.make_codec(self.codec, self.codec_params)

    def __post_init__(self):
        if self.codec != _codecs.NONE:
            self.encoder()  # ValueError naming a bad codec name or parameter
        elif self.codec_params:
            raise ValueError(f"storage codec_params {self.codec_params!r} given without a codec")
        if self.format not in ("npz", "pth.gz"):
            raise ValueError(f"storage format must be 'npz' or 'pth.gz', not {self.format!r}")
        if self.layout not in ("legacy", "dfndr"):
            raise ValueError(f"storage layout must be 'legacy' or 'dfndr', not {self.layout!r}")
        if self.dtype is None:  # frozen: fill the default through object.__setattr__
            object.__setattr__(self, "dtype", "float32" if self.format == "npz" else "bfloat16")
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(_TORCH_DTYPES)}, not {self.dtype!r}")
        if self.format == "npz" and self.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"npz cannot hold {self.dtype} (numpy has no bfloat16): use float32/float16, "
                             f"or format 'pth.gz'")


@dataclass
class DRSample:
    uid: str  # the WebDataset key: 32 lowercase hex, no dot
    image_ext: str | None
    image: bytes | None  # None in reinforcement-only shards
    caption: str | None  # ground truth, member `txt`
    url: str | None  # member `url.txt`
    syn: dict[str, list[str]]  # {"syn_text": [...], "syn_text_<suffix>": [...]}
    entries: list  # param_aug: N replayable augmentation entries (FORMATS §1)
    image_emb: np.ndarray  # [N, D]
    text_emb: np.ndarray  # [G, D] ground-truth caption rows only (both layouts, once decoded)
    syn_emb: dict[str, np.ndarray]  # {syn_key: [S, D]}, rows in caption order
    meta: dict = field(default_factory=dict)  # extra `json` fields; decoded samples carry "sha256" here

    @property
    def dim(self) -> int:
        return int(self.image_emb.shape[1])


# ---------------------------------------------------------------------------------------------
# Validation shared by encode and decode. `fail(message)` returns the exception to raise, so the
# writer raises ValueError (a caller bug) and the reader SchemaError (bad data), both naming the uid.

def _check_syn(syn: Any, fail) -> None:
    if not isinstance(syn, dict):
        raise fail(f"{SYN_MEMBER} must be an object of caption lists, got {type(syn).__name__}")
    for key, captions in syn.items():
        if not SYN_KEY.match(str(key)):
            raise fail(f"{SYN_MEMBER}: key {key!r} is not 'syn_text' or 'syn_text_<suffix>'")
        if not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
            raise fail(f"{SYN_MEMBER}: {key} must be a list of strings")


def _check_matrix(name: str, array: Any, rows: int | None, dim: int | None, fail) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise fail(f"{name} must be a 2-d array, got {getattr(array, 'shape', type(array).__name__)}")
    if rows is not None and array.shape[0] != rows:
        raise fail(f"{name} has {array.shape[0]} rows, expected {rows}")
    if dim is not None and array.shape[1] != dim:
        raise fail(f"{name} has D={array.shape[1]}, but image_emb has D={dim}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise fail(f"{name} must hold finite floats")
    return array


def _check_embeddings(sample: DRSample, fail) -> None:
    image = _check_matrix("image_emb", sample.image_emb, len(sample.entries), None, fail)
    if image.shape[1] == 0:
        raise fail("image_emb has D=0")
    text = _check_matrix("text_emb", sample.text_emb, None, image.shape[1], fail)
    if text.shape[0] < 1:
        raise fail("text_emb has no ground-truth caption row")
    if set(sample.syn_emb) != set(sample.syn):
        raise fail(f"synthetic embeddings for {sorted(sample.syn_emb)} but captions for {sorted(sample.syn)}")
    for key, captions in sample.syn.items():
        _check_matrix(f"{key}_emb", sample.syn_emb[key], len(captions), image.shape[1], fail)


def _check_uid(uid: Any, fail) -> str:
    if not (isinstance(uid, str) and UID.match(uid)):
        raise fail(f"uid {uid!r} is not 32 lowercase hex characters")
    return uid


# ---------------------------------------------------------------------------------------------
# Writing

def embedding_arrays(sample: DRSample, layout: str) -> dict[str, np.ndarray]:
    """The named arrays of one sample in `layout`, in member order (syn keys sorted as in syn.json)."""
    if layout == "legacy":
        extra = sorted(set(sample.syn) - {"syn_text"})
        if extra:
            raise ValueError(f"sample {sample.uid}: the legacy layout holds one synthetic-caption key "
                             f"'syn_text', not also {extra}: use layout 'dfndr'")
        rows = [sample.text_emb] + ([sample.syn_emb["syn_text"]] if "syn_text" in sample.syn else [])
        return {"image_emb": sample.image_emb, "text_emb": np.concatenate(rows)}
    if layout == "dfndr":
        return {"image_emb": sample.image_emb, "text_emb": sample.text_emb,
                **{f"{key}_emb": sample.syn_emb[key] for key in sorted(sample.syn)}}
    raise ValueError(f"unknown layout {layout!r}")


def _pth_gz(arrays: dict[str, np.ndarray], dtype: str) -> bytes:
    # torch.save's zip records carry no timestamps and its serialization_id is a hash of the content,
    # so equal tensors give equal bytes (checked in the tests; torch 2.14). clone() gives every tensor
    # its own exact-size storage: a view would otherwise save its whole base buffer.
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(_TORCH_DTYPES[dtype]).clone()
               for k, v in arrays.items()}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def embedding_member(arrays: dict[str, np.ndarray], storage: StorageSpec) -> tuple[str, bytes]:
    """(member name, bytes) of a sample's embedding arrays: the codec's qemb.npz, else npz or pth.gz."""
    codec = storage.encoder()
    if codec is not None:
        return _codecs.CODEC_MEMBER, codec.encode({k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    if storage.format == "npz":
        return NPZ_MEMBER, npz_bytes({k: np.asarray(v).astype(_NUMPY_DTYPES[storage.dtype]) for k, v in arrays.items()})
    return PTH_MEMBER, _pth_gz(arrays, storage.dtype)


def _resolve_sha256(sample: DRSample, sha256: str | None) -> str:
    if sample.image is not None:
        actual = sha256_hex(sample.image)
        if sha256 is not None and sha256 != actual:
            raise ValueError(f"sample {sample.uid}: sha256={sha256} given, but the image bytes hash to {actual}")
        return actual
    # reinforcement-only: the caller knows the hash of the image the crop boxes refer to
    known = sha256 if sha256 is not None else sample.meta.get("sha256")
    if not (isinstance(known, str) and SHA256.match(known)):
        raise ValueError(f"sample {sample.uid}: no image stored, so pass sha256= (64 lowercase hex) of the "
                         f"image the crop boxes refer to, got {known!r}")
    return known


def encode_dr_sample(sample: DRSample, storage: StorageSpec, sha256: str | None = None) -> dict[str, bytes]:
    """Members of one sample, in FORMATS §2 order; equal samples give equal bytes."""
    def fail(message: str) -> ValueError:
        return ValueError(f"sample {sample.uid}: {message}")

    _check_uid(sample.uid, fail)
    _check_syn(sample.syn, fail)
    if not isinstance(sample.entries, list) or not all(isinstance(e, list) for e in sample.entries):
        raise fail("entries must be a list of augmentation entries (lists)")
    _check_embeddings(sample, fail)
    digest = _resolve_sha256(sample, sha256)
    arrays = embedding_arrays(sample, storage.layout)
    try:
        params = dumps_compact({"param_aug": sample.entries})
    except (TypeError, ValueError) as exc:  # numpy scalars, NaN: FORMATS §1 wants plain JSON numbers
        raise fail(f"param_aug must hold plain JSON values: {exc}") from None

    members: dict[str, bytes] = {}
    if sample.url:
        members[URL_MEMBER] = sample.url.encode("utf-8")
    if sample.image is not None:
        if sample.image_ext not in IMAGE_EXTENSIONS:
            raise fail(f"image_ext must be one of {list(IMAGE_EXTENSIONS)}, got {sample.image_ext!r}")
        members[sample.image_ext] = sample.image
    if sample.caption is not None:
        members[CAPTION_MEMBER] = sample.caption.encode("utf-8")
    members[SYN_MEMBER] = dumps_compact(sample.syn)
    members[PARAMS_MEMBER] = params
    name, data = embedding_member(arrays, storage)
    members[name] = data
    members[META_MEMBER] = dumps_compact({**sample.meta, "uid": sample.uid, "sha256": digest})
    return members


# ---------------------------------------------------------------------------------------------
# Reading

def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _json(value: Any) -> Any:
    """A JSON member as bytes/str, or already decoded by a webdataset decoder."""
    return json.loads(value) if isinstance(value, (bytes, bytearray, str)) else value


def _load_arrays(members: dict, fail, limits: Limits) -> dict[str, np.ndarray]:
    if NPZ_MEMBER in members:  # FORMATS: a trainer prefers npz (float32) when both exist
        try:
            arrays = load_npz(members[NPZ_MEMBER], limits.arrays)
        except SchemaError as exc:  # MemberTooLarge stays itself: readers count it apart
            raise fail(f"{NPZ_MEMBER}: {exc}", type(exc)) from None
        return {k: v.astype(np.float32) for k, v in arrays.items()}
    if PTH_MEMBER in members:
        tensors = _load_pth_gz(members[PTH_MEMBER], fail, limits.arrays + SLACK)  # + torch.save's own records
        if not (isinstance(tensors, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values())):
            raise fail(f"{PTH_MEMBER} must hold a dict of tensors")
        return {str(k): v.float().numpy() for k, v in tensors.items()}
    if _codecs.CODEC_MEMBER in members:  # a storage codec's member: its header names the codec
        try:
            return _codecs.decode_member(members[_codecs.CODEC_MEMBER], limits.arrays)
        except SchemaError as exc:
            raise fail(f"{_codecs.CODEC_MEMBER}: {exc}", type(exc)) from None
    raise fail(f"no embeddings: neither {NPZ_MEMBER!r} nor {PTH_MEMBER!r} is present (nor a storage codec's "
               f"{_codecs.CODEC_MEMBER!r})")


def _torch_zip_size(raw: bytes) -> int:
    """What torch.load may inflate and allocate: the declared sizes of the zip's records (it checks
    every tensor's record against its claimed size before filling it)."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            return sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, zlib.error):
        return 0  # not a zip (a legacy pickle file): torch.load's weights_only refusal names it


def _load_pth_gz(data: bytes, fail, bound: int):
    try:
        raw = gunzip(data, bound, PTH_MEMBER)
        size = _torch_zip_size(raw)
        if size > bound:
            raise too_large(f"{PTH_MEMBER} records", size, bound)
    except SchemaError as exc:
        raise fail(str(exc), type(exc)) from None
    try:
        # weights_only: tensors and plain containers only; never unpickle arbitrary objects
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip and unpickling errors all mean "bad member"
        raise fail(f"{PTH_MEMBER}: unreadable: {type(exc).__name__}: {exc}") from None


def _split_text_rows(arrays: dict, syn: dict, fail) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(ground-truth rows, {syn_key: rows}) from either layout."""
    text = arrays.get("text_emb")
    if text is None or text.ndim != 2:
        raise fail(f"missing or non 2-d 'text_emb' (arrays: {sorted(arrays)})")
    named = {k[:-len("_emb")]: v for k, v in arrays.items() if k.endswith("_emb") and SYN_KEY.match(k[:-4])}
    if named:  # dfndr: one array per synthetic key, text_emb = ground truth only
        if set(named) != set(syn):
            raise fail(f"dfndr arrays {sorted(k + '_emb' for k in named)} do not match {SYN_MEMBER} keys "
                       f"{sorted(syn)}")
        return text, named
    # legacy: the S synthetic rows follow the ground-truth rows, in syn.json order
    if set(syn) - {"syn_text"}:
        raise fail(f"legacy layout (no <syn_key>_emb arrays) but {SYN_MEMBER} has keys {sorted(syn)}")
    s = len(syn.get("syn_text", []))
    if text.shape[0] < s + 1:
        raise fail(f"legacy text_emb has {text.shape[0]} rows: too few for 1+ ground-truth and {s} synthetic")
    rows = {"syn_text": text[text.shape[0] - s:]} if "syn_text" in syn else {}
    return text[:text.shape[0] - s], rows


def decode_dr_sample(members: dict, limits: Limits | None = None) -> DRSample:
    """Either layout, npz or pth.gz, param_aug as a list or a JSON string, image present or not.
    Embeddings come back as float32. Raises SchemaError naming the uid and the member; MemberTooLarge
    (a SchemaError) when a member would inflate past `limits` (default: Limits.default())."""
    limits = limits or Limits.default()
    key = str(members.get("__key__", "?"))
    uid = key.rpartition("/")[2]

    def fail(message: str, kind: type[SchemaError] = SchemaError) -> SchemaError:
        return kind(f"sample {uid}: {message}")

    for name in (META_MEMBER, PARAMS_MEMBER, SYN_MEMBER):
        if name not in members:
            raise fail(f"missing member {name!r}")
    params_size = len(members[PARAMS_MEMBER]) if isinstance(members[PARAMS_MEMBER], (bytes, str)) else 0
    if params_size > limits.params:  # parsed JSON takes many times its bytes
        raise fail(f"{PARAMS_MEMBER}: {params_size} bytes, over its bound of {limits.params}", MemberTooLarge)
    try:
        meta = _json(members[META_MEMBER])
        syn = _json(members[SYN_MEMBER])
        params = _json(members[PARAMS_MEMBER])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise fail(f"invalid JSON in {META_MEMBER!r}/{SYN_MEMBER!r}/{PARAMS_MEMBER!r}: {exc}") from None
    if not isinstance(meta, dict):
        raise fail(f"{META_MEMBER!r} must be an object")
    if "uid" in meta:
        if key != "?" and meta["uid"] != uid:
            raise fail(f"{META_MEMBER!r} uid {meta['uid']!r} differs from the sample key")
        uid = meta["uid"]
    _check_uid(uid, fail)
    _check_syn(syn, fail)
    entries = params.get("param_aug") if isinstance(params, dict) else None
    if isinstance(entries, str):  # tolerated on read: some writers stored the list as a JSON string
        try:
            entries = json.loads(entries)
        except (ValueError, RecursionError) as exc:
            raise fail(f"{PARAMS_MEMBER}: param_aug string is not JSON: {exc}") from None
    if not (isinstance(entries, list) and all(isinstance(e, list) for e in entries)):
        raise fail(f"{PARAMS_MEMBER} must hold a list of entries under 'param_aug'")

    arrays = _load_arrays(members, fail, limits)
    image_emb = arrays.get("image_emb")
    if image_emb is None:
        raise fail(f"embeddings lack 'image_emb' (arrays: {sorted(arrays)})")
    text_emb, syn_emb = _split_text_rows(arrays, syn, fail)
    image = next(((ext, members[ext]) for ext in IMAGE_EXTENSIONS if ext in members), (None, None))
    try:
        caption = _text(members[CAPTION_MEMBER]) if CAPTION_MEMBER in members else None
        url = _text(members[URL_MEMBER]) if URL_MEMBER in members else None
    except UnicodeDecodeError as exc:
        raise fail(f"{CAPTION_MEMBER!r}/{URL_MEMBER!r} is not UTF-8: {exc}") from None
    sample = DRSample(uid=uid, image_ext=image[0], image=image[1], caption=caption, url=url, syn=syn,
                      entries=entries, image_emb=image_emb, text_emb=text_emb, syn_emb=syn_emb,
                      meta={k: v for k, v in meta.items() if k != "uid"})
    _check_embeddings(sample, fail)  # rows vs param_aug and captions, one D everywhere, finite
    return sample
