"""The request parser's cheaper structure scan and JSON decoding refuse and accept exactly what
the straightforward versions did (kept here as references): same code, same detail, same
document. Duplicate keys, NaN, a BOM, deep nesting and unterminated strings included."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from schemas.request import (
    InvalidMessage,
    MessageProperties,
    ParseLimits,
    _decode_json,
)

_REFERENCE_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def _reference_structure(text: str, max_depth: int, max_elements: int) -> None:
    skeleton = _REFERENCE_STRING.sub('""', text)
    depth = deepest = 0
    for seen, bracket in enumerate(_BRACKETS.finditer(skeleton)):
        if seen >= 2 * max_elements:
            break
        depth += 1 if bracket.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > max_depth:
                raise InvalidMessage(
                    "too_deep", "body", f"JSON nesting deeper than {max_depth} levels"
                )
    opened = skeleton.count("[") + skeleton.count("{")
    if opened + skeleton.count(",") + skeleton.count(":") > max_elements:
        raise InvalidMessage(
            "too_many_elements", "body", f"more than {max_elements} JSON values and keys"
        )


def _reference_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _reference_decode(text: str, limits: ParseLimits) -> Any:
    _reference_structure(text, limits.max_depth, limits.max_elements)
    try:
        return json.loads(text, parse_constant=_reject, object_pairs_hook=_reference_pairs)
    except ValueError as exc:
        raise InvalidMessage("not_json", "body", str(exc)) from None


def _outcome(decode: Any, text: str, limits: ParseLimits) -> tuple[str, Any]:
    try:
        return "ok", decode(text, limits)
    except InvalidMessage as exc:
        return exc.code, exc.detail


def _ours(text: str, limits: ParseLimits) -> Any:
    return _decode_json(text.encode("utf-8", "surrogatepass"), MessageProperties(), limits)


SAMPLES = [
    '{"a": 1, "b": {"c": [1, 2.5, null, true]}, "d": "x\\"y\\\\"}',
    '{"a": 1, "a": 2}',
    '{"a": {"b": 1, "c": 2, "b": 3}}',
    '[{"k": 1}, {"k": 2, "k": 3}]',
    '{"a": NaN}',
    '{"a": -Infinity}',
    '{"a": 1e400}',
    "\ufeff{}",
    '{"a": "[[[[[[", "b": "{,:,:"}',
    '"unterminated [[[',
    '"\\',
    "[" * 5 + "]" * 5,
    "[" * 6 + "]" * 6,
    "[" * 7,
    "[1," * 3 + "0" + "]" * 3,
    '{"a": [1, 2, 3], "b": {"c": {"d": {}}}}',
    '{"a": "\\u00e9\\ud800"}',
    "{} x",
    "[" + '"a", ' * 29 + '"a"]',  # more quotes than the counting shortcut takes
    '{"a": [[[[[["x"]]]]]]}',
]


@pytest.mark.parametrize("text", SAMPLES)
def test_samples_decode_as_before(text: str) -> None:
    for limits in (ParseLimits(), ParseLimits(max_depth=5, max_elements=12)):
        assert _outcome(_ours, text, limits) == _outcome(_reference_decode, text, limits)


@pytest.mark.parametrize("escapes", [True, False])
def test_random_texts_decode_as_before(escapes: bool) -> None:
    alphabet = ['"', "[", "]", "{", "}", ",", ":", "a", "1", " ", "\n", "null", '"k"']
    alphabet += ["\\"] if escapes else []
    rng = random.Random(19)
    limits = ParseLimits(max_depth=4, max_elements=10)
    for _ in range(30_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        if not text.strip():
            continue
        assert _outcome(_ours, text, limits) == _outcome(_reference_decode, text, limits), text


def test_random_documents_with_repeated_keys_decode_as_before() -> None:
    rng = random.Random(20)
    limits = ParseLimits(max_depth=6, max_elements=60)

    def value(depth: int) -> str:
        if depth > 3 or rng.random() < 0.4:
            return rng.choice(["1", "2.5", '"s"', "null", "NaN", "[]"])
        if rng.random() < 0.5:
            return "[" + ", ".join(value(depth + 1) for _ in range(rng.randint(0, 3))) + "]"
        keys = [rng.choice("abc") for _ in range(rng.randint(0, 4))]
        return "{" + ", ".join(f'"{key}": {value(depth + 1)}' for key in keys) + "}"

    for _ in range(5_000):
        text = value(0)
        assert _outcome(_ours, text, limits) == _outcome(_reference_decode, text, limits), text
