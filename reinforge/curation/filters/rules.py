"""The filter rule language: a small grammar parsed by hand (never eval) into a tree of atoms.

    rule    := or
    or      := and ( ("|" | "or") and )*
    and     := not ( ("&" | "and") not )*
    not     := ("!" | "not") not | "(" or ")" | atom
    atom    := NAME                              named filter (FILTERS below)
             | COLUMN OP NUMBER                  e.g. clip_l14>=0.3, short_side>=200
             | lang ("==" | "!=") CODE           e.g. lang==en
             | top "(" COLUMN "," FRACTION ")"   the round(f*n) highest rows of the pool's valid rows
    OP      := >= | > | <= | < | == | !=

Examples: `basic & top(clip_l14, 0.3)`, `english & text`, `basic and (clip_b32>=0.28 or image)`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

from reinforge.curation.filters.clusters import FilterError

NUMERIC = ("words", "chars", "synset_hits", "wordnet_hits", "ft_words", "short_side", "aspect", "clip_b32", "clip_l14", "cluster",
           "cluster_sim", "cluster_targets")
STRING = ("lang", "lang_cld3")
OPS = (">=", "<=", "==", "!=", ">", "<")
# DataComp's baselines: basic (English, caption > 2 words and > 5 chars, short side >= 200 px,
# aspect <= 3); text-based is `english & text`, image-based `english & words>1 & chars>5 & image`
FILTERS = {
    "english": "lang==en",
    "basic": "lang==en & words>2 & chars>5 & short_side>=200 & aspect<=3",
    "text": "synset_hits>=1",
    "caption": "lang==en & words>1 & chars>5",
    "image": "cluster_targets>=1",
    "laion2b": "lang_cld3==en & clip_b32>=0.28",  # DataComp's LAION-2B reproduction (CLD3 English)
}
# `datacomp` semantics (the default): the names mean what DataComp's code decides. text: a whitespace
# token's first WordNet sense is an ImageNet-21k synset; caption: the image-based baselines' caption
# filter, which counts words with fastText's tokenizer.
DATACOMP_FILTERS = {**FILTERS, "text": "wordnet_hits>=1", "caption": "lang==en & ft_words>1 & chars>5"}
SEMANTICS = ("datacomp", "exact")
# DataComp's baseline names (baselines.py --name) as rules; clip_score is `top(COL, F)` or `COL>=T`, and
# image_based_intersect_clip_score with another score or fraction is `--baseline image_based --top-fraction F`
BASELINES = {
    "basic_filter": "basic",
    "text_based": "english & text",
    "image_based": "caption & image",
    "image_based_intersect_clip_score": "caption & image & top(clip_l14, 0.3)",  # its README's l14 30 %
    "laion2b": "laion2b",
}
_TOKEN = re.compile(r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op>>=|<=|==|!=|>|<)|"
                    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[()&|!,]))")


@dataclass(frozen=True)
class Compare:
    column: str
    op: str
    value: Union[float, str]

    def __str__(self) -> str:
        value = self.value if isinstance(self.value, str) else f"{self.value:g}"
        return f"{self.column}{self.op}{value}"


@dataclass(frozen=True)
class Top:
    column: str
    fraction: float

    def __str__(self) -> str:
        return f"top({self.column},{self.fraction:g})"


@dataclass(frozen=True)
class Node:
    op: str  # "and" | "or" | "not"
    parts: tuple

    def __str__(self) -> str:
        if self.op == "not":
            return f"!{self.parts[0]}"
        return "(" + f" {'&' if self.op == 'and' else '|'} ".join(map(str, self.parts)) + ")"


Rule = Union[Compare, Top, Node]


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"rule {text!r}: cannot read {text[pos:].strip()[:20]!r} (column {pos + 1})")
        out.append(m.group(m.lastgroup))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str, semantics: str = "datacomp"):
        self.text, self.tokens, self.i, self.semantics = text, _tokens(text), 0, semantics

    def error(self, what: str) -> FilterError:
        at = self.tokens[self.i] if self.i < len(self.tokens) else "the end"
        return FilterError(f"rule {self.text!r}: {what} at {at!r}")

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, *expected: str) -> str:
        token = self.peek()
        if token is None or (expected and token not in expected):
            raise self.error(f"expected {' or '.join(expected) or 'more'}")
        self.i += 1
        return token

    def parse(self) -> Rule:
        if not self.tokens:
            raise FilterError("rule is empty")
        rule = self.or_()
        if self.peek() is not None:
            raise self.error("unexpected token")
        return rule

    def or_(self) -> Rule:
        parts = [self.and_()]
        while self.peek() in ("|", "or"):
            self.take()
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else Node("or", tuple(parts))

    def and_(self) -> Rule:
        parts = [self.not_()]
        while self.peek() in ("&", "and"):
            self.take()
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else Node("and", tuple(parts))

    def not_(self) -> Rule:
        if self.peek() in ("!", "not"):
            self.take()
            return Node("not", (self.not_(),))
        if self.peek() == "(":
            self.take()
            rule = self.or_()
            self.take(")")
            return rule
        return self.atom()

    def number(self) -> float:
        try:
            value = float(self.peek() or "")
            if not math.isfinite(value):
                raise ValueError(value)
        except ValueError:
            raise self.error("expected a finite number") from None
        self.i += 1
        return value

    def atom(self) -> Rule:
        name = self.take()
        if name == "top":
            self.take("(")
            column = self.column(self.take())
            self.take(",")
            fraction = self.number()
            self.take(")")
            if not 0 <= fraction <= 1:
                raise FilterError(f"rule {self.text!r}: top({column}, {fraction:g}): the fraction must be in [0, 1]")
            return Top(column, fraction)
        named = DATACOMP_FILTERS if self.semantics == "datacomp" else FILTERS
        if name in named:
            return parse_rule(named[name], self.semantics)
        column = self.column(name)
        if self.peek() not in OPS:
            raise self.error(f"expected a comparison after {column}")
        op = self.take()
        if column in STRING:
            if op not in ("==", "!="):
                raise self.error(f"{column} takes == or !=")
            return Compare(column, op, self.take())
        return Compare(column, op, self.number())

    def column(self, name: str) -> str:
        if name not in NUMERIC + STRING:
            self.i -= 1
            raise self.error(f"unknown name (filters: {', '.join(FILTERS)}; columns: {', '.join(NUMERIC + STRING)})")
        return name


def parse_rule(text: str, semantics: str = "datacomp") -> Rule:
    if semantics not in SEMANTICS:
        raise FilterError(f"--semantics {semantics!r}: choose one of {', '.join(SEMANTICS)}")
    return _Parser(text, semantics).parse()


def leaves(rule: Rule) -> list[Union[Compare, Top]]:
    """Atoms in the order they appear (repeats kept once)."""
    if isinstance(rule, Node):
        out: list = []
        for part in rule.parts:
            out += [a for a in leaves(part) if a not in out]
        return out
    return [rule]


def columns(rule: Rule) -> list[str]:
    return list(dict.fromkeys(a.column for a in leaves(rule)))
