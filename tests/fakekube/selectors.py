"""Label and field selectors, with the grammar and semantics of k8s.io/apimachinery.

Label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``
(exists), ``!k`` (does not exist), ``k>1`` / ``k<1`` (integers); requirements are ANDed.
``!=`` and ``notin`` also match objects that lack the label, as in Kubernetes.

Field selectors: ``f=v``, ``f==v``, ``f!=v`` over the fields each kind supports; an
unsupported field is rejected the way the real server does (400 ``field label not
supported``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SET = re.compile(r"^(?P<key>[^\s!=<>()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_BINARY = re.compile(r"^(?P<key>[^\s!=<>()]+)\s*(?P<op>==|!=|=|>|<)\s*(?P<value>[^\s!=<>()]*)$")


class SelectorError(ValueError):
    """The selector does not parse; the server answers 400 BadRequest."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists", ">", "<"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if not present:
            return False
        try:
            have, want = int(str(value)), int(self.values[0])
        except ValueError:
            return False
        return have > want if self.op == ">" else have < want


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside ``( )``."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [t.strip() for t in terms]


def _check_key(key: str, term: str) -> str:
    if not _KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise SelectorError(f"unable to parse requirement: invalid label key {key!r} in {term!r}")
    return key


def _check_value(value: str, term: str) -> str:
    if not _VALUE.match(value) or len(value) > 63:
        raise SelectorError(
            f"unable to parse requirement: invalid label value {value!r} in {term!r}"
        )
    return value


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse a label selector; empty or None selects everything."""
    if not text or not text.strip():
        return []
    reqs: list[Requirement] = []
    for term in _split_terms(text):
        if not term:
            raise SelectorError(f"found '', expected: identifier in {text!r}")
        if term.startswith("!"):
            reqs.append(Requirement(_check_key(term[1:].strip(), term), "!exists"))
            continue
        m = _SET.match(term)
        if m:
            values = tuple(_check_value(v.strip(), term) for v in m["values"].split(","))
            reqs.append(Requirement(_check_key(m["key"], term), m["op"], values))
            continue
        m = _BINARY.match(term)
        if m:
            op = "=" if m["op"] == "==" else m["op"]
            value = m["value"]
            if op in (">", "<") and not re.fullmatch(r"-?\d+", value):
                raise SelectorError(f"unable to parse requirement: {value!r} is not an integer")
            reqs.append(Requirement(_check_key(m["key"], term), op, (_check_value(value, term),)))
            continue
        if re.fullmatch(r"[^\s!=<>(),]+", term):
            reqs.append(Requirement(_check_key(term, term), "exists"))
            continue
        raise SelectorError(f"unable to parse requirement: {term!r}")
    return reqs


def labels_match(reqs: list[Requirement], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in reqs)


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    value: str
    negate: bool


def parse_field_selector(
    text: str | None, supported: Callable[[str], bool]
) -> list[FieldRequirement]:
    """Parse a field selector, rejecting fields the kind does not index."""
    if not text or not text.strip():
        return []
    reqs: list[FieldRequirement] = []
    for term in text.split(","):
        term = term.strip()
        for op in ("!=", "==", "="):
            if op in term:
                field, value = (s.strip() for s in term.split(op, 1))
                break
        else:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{term}'")
        if not supported(field):
            raise SelectorError(f"field label not supported: {field}")
        reqs.append(FieldRequirement(field, value, op == "!="))
    return reqs


def fields_match(reqs: list[FieldRequirement], fields: Mapping[str, str]) -> bool:
    return all((fields.get(r.field, "") == r.value) != r.negate for r in reqs)
