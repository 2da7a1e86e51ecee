"""TiC-DataComp's DataCompNet class ids: ml-tic-clip's `uid2classid/<year>.pkl` files and `--cls-file`.

What ml-tic-clip does (its dataset_creation/tic-datacomp/generate_datacompnet_uid2classid.py and the
resharder patch in datacomp.patch):
  produce   `tic-datacompnet_year2uids.pkl` = {year: {wordnet synset "nXXXXXXXX": [uid, ...]}} and
            BREEDS' `dataset_class_info.json` = [[imagenet class id 0-999, synset, names], ...] give,
            per year, a pickled dict {uid (32 hex str): class id (int)} in uid2classid/<year>.pkl.
  consume   `resharder.py -c uid2classid/<year>.pkl`: every output sample gets a `cls` member, the
            class id of its uid as ASCII decimal (webdataset's encoding of an int `cls`); the eval
            loader (clip_benchmark's wds zero-shot classification) reads `cls` as the label.

reinforge reads these pickles without running pickle's object machinery on them: the unpickler
resolves no global at all except the built-in containers (a pickle that names any other class or
function is refused), so only plain dicts, lists, sets, strings and numbers can come out. A JSON
file {uid: class id} is accepted too.
"""
from __future__ import annotations

import io
import json
import pickle
from collections import OrderedDict

import numpy as np

from reinforge.formats.sources import InputError
from reinforge.formats.subset import UID_OK, locate, parse_hex_uids
from reinforge.io.storage import filesystem, write_bytes

_PLAIN = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "list"): list,
          ("builtins", "dict"): dict, ("builtins", "tuple"): tuple, ("collections", "OrderedDict"): OrderedDict,
          ("__builtin__", "set"): set}


class ClassFileError(InputError):
    """A class-id file reinforge will not read or that does not fit the subset."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _PLAIN[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data (dict, list, "
                                         f"set, str, int) is read from a class-id pickle") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id in a class-id pickle")


def load_plain_pickle(data: bytes, name: str):
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ClassFileError(f"{name}: {exc}") from None


def read_class_ids(url: str) -> dict[str, int]:
    """{uid: class id} from ml-tic-clip's uid2classid pickle or a JSON object."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise ClassFileError(f"class-id file {url} not found")
    data = fs.cat_file(path)
    if url.endswith(".json"):
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise ClassFileError(f"{url}: not JSON ({exc})") from None
    else:
        raw = load_plain_pickle(data, url)
    if not isinstance(raw, dict):
        raise ClassFileError(f"{url}: holds a {type(raw).__name__}, expected a dict uid -> class id")
    bad = [(k, v) for k, v in raw.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ClassFileError(f"{url}: {len(bad)} entries are not str uid -> int class id, e.g. {bad[0]!r}")
    return raw


def class_id_table(mapping: dict[str, int], url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uid_hi, uid_lo, class id) per entry of the file, in its order; a key that is not a 32-hex uid is
    an error (count and examples)."""
    keys = list(mapping)
    hi, lo, status = parse_hex_uids([k.lower() for k in keys])
    if (status != UID_OK).any():
        bad = [keys[i] for i in np.flatnonzero(status != UID_OK)[:3]]
        raise ClassFileError(f"{url}: {int((status != UID_OK).sum())} keys are not 32-hex uids, e.g. {bad}")
    return hi, lo, np.fromiter(mapping.values(), np.int64, len(keys))


def class_ids_for(hi: np.ndarray, lo: np.ndarray, ids: np.ndarray, subset_uids: np.ndarray) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """Class id per subset uid (int64), and which uids have one. Entries (hi, lo, ids) in file order: of two
    keys naming one uid (they differ in case), the later one's id is taken."""
    pos = locate(hi, lo, subset_uids)  # each entry's row in the subset, -1 if it is not there
    out = np.full(len(subset_uids), -1, np.int64)
    found = np.zeros(len(subset_uids), bool)
    out[pos[pos >= 0]], found[pos[pos >= 0]] = ids[pos >= 0], True
    return out, found


def missing_class_ids(missing: int, uids: int, examples: list[str], url: str) -> ClassFileError:
    """A subset uid absent from the file is a hard error (count and examples): ml-tic-clip's resharder
    would drop such a sample with a KeyError in its log."""
    return ClassFileError(f"{missing} of {uids} subset uids have no class id in {url}, e.g. {', '.join(examples)}")


def write_uid2classid(year2uids_url: str, class_info_url: str, out_dir: str) -> dict[str, int]:
    """ml-tic-clip's generate_datacompnet_uid2classid: one uid2classid/<year>.pkl per year of
    year2uids ({year: {synset: [uid]}}), class ids from BREEDS' dataset_class_info.json. Returns
    {year: uids written}. Entries keep the input's order (synsets, then uids), like the reference."""
    fs, path = filesystem(year2uids_url)
    year2uids = load_plain_pickle(fs.cat_file(path), year2uids_url)
    fs, path = filesystem(class_info_url)
    synset2classid = {entry[1]: int(entry[0]) for entry in json.loads(fs.cat_file(path))}
    if not isinstance(year2uids, dict):
        raise ClassFileError(f"{year2uids_url}: expected a dict year -> {{synset: [uids]}}")
    written = {}
    for year, synset_uids in year2uids.items():
        unknown = [s for s in synset_uids if s not in synset2classid]
        if unknown:
            raise ClassFileError(f"{year2uids_url}: year {year}: synset {unknown[0]} is not in {class_info_url}")
        uid2classid = {uid: synset2classid[synset] for synset, uids in synset_uids.items() for uid in uids}
        write_bytes(f"{out_dir.rstrip('/')}/uid2classid/{year}.pkl", pickle.dumps(uid2classid, protocol=4))
        written[str(year)] = len(uid2classid)
    return written
