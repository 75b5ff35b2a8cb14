"""The proposed mapping of the RPM's canonical symbol names to the broker's (pure).

Brokers add suffixes and prefixes (``EURUSD.a``, ``EURUSDm``, ``EURUSD.pro``, ``#EURUSD``,
DOMAIN.md 6). A broker name is a candidate for a canonical one when it is the canonical
name with an affix of lower-case letters, digits or punctuation (an upper-case affix makes
another instrument: ``EURUSDT`` is not ``EURUSD``). The exact name wins; else the affix pair
most symbols share; else the shortest name. Ties are reported, not guessed silently.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_AFFIX = re.compile(r"^[a-z0-9._#!+$-]{0,6}$")


@dataclass(frozen=True)
class Naming:
    symbol_map: dict[str, str]
    prefix: str = ""
    suffix: str = ""
    missing: tuple[str, ...] = ()
    ambiguous: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _affixes(canonical: str, name: str) -> tuple[str, str] | None:
    at = name.find(canonical)
    if at < 0:
        return None
    prefix, suffix = name[:at], name[at + len(canonical) :]
    if _AFFIX.match(prefix) and _AFFIX.match(suffix) and len(prefix) <= 3:
        return prefix, suffix
    return None


def propose(canonicals: Sequence[str], names: Iterable[str]) -> Naming:
    available = sorted(set(names))
    candidates: dict[str, list[tuple[str, tuple[str, str]]]] = {}
    for canonical in canonicals:
        found = [(n, a) for n in available if (a := _affixes(canonical, n)) is not None]
        candidates[canonical] = found
    shared = Counter(a for found in candidates.values() for _, a in found if a != ("", ""))
    mapping: dict[str, str] = {}
    ambiguous: dict[str, tuple[str, ...]] = {}
    for canonical, found in candidates.items():
        if not found:
            continue
        exact = [n for n, a in found if a == ("", "")]
        if exact:
            mapping[canonical] = exact[0]
            continue
        found.sort(key=lambda item: (-shared[item[1]], len(item[0]), item[0]))
        mapping[canonical] = found[0][0]
        best = shared[found[0][1]]
        tied = [n for n, a in found if shared[a] == best]
        if len(tied) > 1:
            ambiguous[canonical] = tuple(tied)
    used = Counter(
        _affixes(c, n) for c, n in mapping.items() if _affixes(c, n) not in (None, ("", ""))
    )
    prefix, suffix = ("", "")
    if used:
        common = used.most_common(1)[0][0]
        if common is not None:
            prefix, suffix = common
    missing = tuple(c for c in canonicals if c not in mapping)
    return Naming(mapping, prefix, suffix, missing, ambiguous)
