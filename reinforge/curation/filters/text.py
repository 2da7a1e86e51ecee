"""Caption statistics for the DataComp filters: word and character counts, a language guess, and
matches against ImageNet-21k synset names.

- Counts are DataComp's: words = `len(text.split())`, chars = `len(text)` (code points).
- Language: py3langid (langid.py's model, shipped inside the PyPI package, 97 languages, ~12k short
  captions/s on one core here). DataComp used fastText's lid.176, which must be downloaded; both are
  n-gram classifiers, so short or odd captions get noisy labels either way. Newlines become spaces.
- CLD3 (optional, `filter score --cld3`): DataComp's LAION-2B reproduction (`laion2b`) keeps captions
  Google's CLD3 calls English, via `gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)`.
  The PyPI `gcld3` is a source package that needs protoc and libprotobuf to build; `cld3-py` ships the
  same bindings (import name `gcld3`, the model compiled in) as wheels.
- Synsets: the 21,843 ImageNet-21k (fall 2011) synsets' lemma lists as timm ships them. DataComp
  looked up each caption word's most frequent WordNet sense (nltk + a WordNet download); without
  WordNet we match the lemma names themselves, case-folded, as 1- to 3-word phrases of the caption
  (99.7% of lemmas have <= 3 words), with a plain-English plural fallback (dogs, boxes, puppies).
  Single-character lemmas ("A" of vitamin A) are left out: they would match every article.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

MAX_WORDS = 3
_TOKEN = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


@lru_cache(maxsize=1)
def synset_lemmas() -> tuple[dict[str, int], list[str]]:
    """lemma (case-folded) -> index of its first synset; and the synset ids (wnid) by index. Every
    first word of a multi-word lemma is also a key (-1 when it is no lemma itself), so that a caption
    word that starts no lemma costs a single lookup."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo("imagenet-21k")
    full: dict[str, int] = {}
    starts, wnids = set(), []
    for i in range(info.num_classes()):
        wnids.append(info.index_to_label_name(i))
        for lemma in info.index_to_description(i).split(","):
            words = lemma.strip().casefold().split()
            if words and len(words) <= MAX_WORDS and len(" ".join(words)) > 1:
                full.setdefault(" ".join(words), i)
                if len(words) > 1:
                    starts.add(words[0])
    return {**dict.fromkeys(starts, -1), **full}, wnids


def _singular(word: str) -> list[str]:
    if word.endswith("ies") and len(word) > 4:
        return [word[:-3] + "y"]
    if word.endswith("es") and len(word) > 3:
        return [word[:-2], word[:-1]]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        return [word[:-1]]
    return []


def synset_matches(text: str, lemmas: dict[str, int]) -> tuple[int, int]:
    """(number of caption phrases naming a synset, index of the first such synset or -1)."""
    words = _TOKEN.findall(text.casefold())
    hits, first = 0, -1
    for i, word in enumerate(words):
        found = lemmas.get(word, -1)
        if word in lemmas:  # may start a multi-word lemma
            for n in range(2, min(MAX_WORDS, len(words) - i) + 1):
                longer = lemmas.get(" ".join(words[i:i + n]), -1)
                if longer >= 0:
                    hits += 1
                    first = longer if first < 0 else first
        if found < 0:  # maybe a plural
            found = next((lemmas[s] for s in _singular(word) if lemmas.get(s, -1) >= 0), -1)
        if found >= 0:
            hits += 1
            first = found if first < 0 else first
    return hits, first


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # the model ships inside the package (npz, no pickle)
    return LanguageIdentifier.from_model_file(MODEL_FILE)


@lru_cache(maxsize=1)
def _cld3():
    import gcld3
    return gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)  # DataComp's settings


def cld3_languages(texts: list) -> np.ndarray:
    """CLD3's language code per caption (None for a missing caption), newlines as spaces as DataComp did."""
    identify = _cld3().FindLanguage
    return np.array([identify(text=t.replace("\n", " ")).language if t is not None else None for t in texts],
                    object)


def caption_stats(texts: list) -> dict[str, np.ndarray]:
    """Per caption: words, chars, lang, synset_hits, synset, and DataComp's own wordnet_hits and
    ft_words (wordnet.py). A missing caption (None) gets NaN counts, lang None and synset -1, written as
    nulls: every rule on it fails and counts it as invalid."""
    from reinforge.curation.filters.wordnet import fasttext_words, wordnet_hits
    lemmas, _ = synset_lemmas()
    identify = _language_identifier().classify
    rows = [(len(t.split()), len(t), identify(t.replace("\n", " "))[0], *synset_matches(t, lemmas),
             wordnet_hits(t), fasttext_words(t))
            if t is not None else (np.nan, np.nan, None, np.nan, -1, np.nan, np.nan) for t in texts]
    words, chars, lang, hits, first, wn_hits, ft_words = zip(*rows) if rows else ((),) * 7
    return {"words": np.array(words, np.float32), "chars": np.array(chars, np.float32),
            "lang": np.array(lang, object), "synset_hits": np.array(hits, np.float32),
            "synset": np.array(first, np.int32), "wordnet_hits": np.array(wn_hits, np.float32),
            "ft_words": np.array(ft_words, np.float32)}
