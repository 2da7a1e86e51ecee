"""Per-sample parsing of the text side of image-text shards: the DataComp uid, the ground-truth
caption and (for embeddings-only runs) synthetic captions made by an earlier run."""
from __future__ import annotations

import json
import re

from reinforge.stages.base import MapStage, SkipSample

UID = re.compile(r"^[0-9a-f]{32}$")


class ParseUID(MapStage):
    """Re-key the sample by its DataComp uid (from the `json` member, else the key itself): outputs,
    random seeds and joins all go by uid, so they survive resharding."""

    name = "uid"

    def process(self, sample: dict) -> dict:
        uid = sample["__key__"]
        if "json" in sample:
            try:
                uid = json.loads(sample["json"]).get("uid", uid)
            except (ValueError, UnicodeDecodeError, AttributeError):
                raise SkipSample("bad_metadata_json", "the json member is not a JSON object") from None
        if not isinstance(uid, str) or not UID.match(uid):
            raise SkipSample("bad_uid", f"uid {str(uid)[:40]!r} is not 32 lowercase hex characters")
        sample["source_key"], sample["__key__"] = sample["__key__"], uid
        return sample


class ParseCaption(MapStage):
    name = "caption"

    def __init__(self, member: str = "txt", threads: int = 1):
        self.member = member
        self.threads = threads

    def process(self, sample: dict) -> dict:
        raw = sample.get(self.member)
        if raw is None:
            raise SkipSample("missing_caption", f"no {self.member!r} member")
        try:
            caption = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SkipSample("caption_not_utf8", f"{self.member!r} is not valid UTF-8") from None
        if not caption:
            raise SkipSample("empty_caption", f"{self.member!r} is empty")
        sample["caption"] = caption
        if "url.txt" in sample:
            sample["url"] = sample["url.txt"].decode("utf-8", errors="replace").strip()
        return sample


class ReadSynCaptions(MapStage):
    """Synthetic captions already in the input (`syn.json` of an earlier captions run)."""

    name = "syn_captions"

    def process(self, sample: dict) -> dict:
        raw = sample.get("syn.json")
        if raw is None:
            raise SkipSample("missing_synthetic_captions", "no syn.json member")
        try:
            syn = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise SkipSample("bad_synthetic_captions", "syn.json is not valid JSON") from None
        if (not isinstance(syn, dict) or not syn or
                not all(k.startswith("syn_text") and isinstance(v, list) and all(isinstance(c, str) for c in v)
                        for k, v in syn.items())):
            raise SkipSample("bad_synthetic_captions", "syn.json must map syn_text[_<suffix>] to lists of strings")
        sample["syn"] = syn
        return sample
