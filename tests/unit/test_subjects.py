"""Key escaping: distinct names never share a subject token or KV key; bounded length."""

from __future__ import annotations

import random
import re

import pytest

from shared import subjects

KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
ALPHABET = "ab_-. /*>:\t=é€" + "\x00"


def _names(rng: random.Random, n: int) -> list[str]:
    out = [rng.choice(["", "a", "_", "a_b", "a b", "a.b", ".", ".."])]
    for _ in range(n):
        length = rng.choice([0, 1, 2, 3, 5, 8, 40, 300])
        out.append("".join(rng.choice(ALPHABET) for _ in range(length)))
    return out


@pytest.mark.parametrize("fn", [subjects.token, subjects.kv_key])
def test_distinct_names_distinct_keys(fn: object) -> None:
    assert callable(fn)
    rng = random.Random(12)
    names = set(_names(rng, 20000))
    keys: dict[str, str] = {}
    for name in names:
        k = fn(name)
        assert k not in keys or keys[k] == name, (name, keys.get(k))
        keys[k] = name
    assert len(keys) == len(names)


def test_pairs_do_not_collide() -> None:
    """A (namespace, name) pair as binder keys it: no two pairs meet."""
    rng = random.Random(7)
    seen: dict[str, tuple[str, str]] = {}
    for _ in range(20000):
        ns, name = "".join(rng.choice("a/_b") for _ in range(rng.randint(0, 4))), \
            "".join(rng.choice("a/_b") for _ in range(rng.randint(0, 4)))
        k = f"{subjects.token(ns)}/{name}"
        assert seen.setdefault(k, (ns, name)) == (ns, name)


def test_ordinary_names_unchanged() -> None:
    for name in ["sim-node-0", "node-1.example.com", "gpu-a100-7", "ip-10-0-1-2.ec2.internal"]:
        assert subjects.kv_key(name) == name
    assert subjects.token("sim-node-0") == "sim-node-0"
    assert subjects.token("nodeagent:node-1") == "nodeagent:node-1"  # a role's identity


def test_round_trip_and_shapes() -> None:
    rng = random.Random(3)
    for name in _names(rng, 3000):
        for fn in (subjects.token, subjects.kv_key):
            k = fn(name)
            assert k and len(k) <= 256
            if "_Z" not in k:
                assert subjects.unescape(k) == name
        key = subjects.kv_key(name)
        assert KV_KEY.match(key), key
        assert not key.startswith(".") and not key.endswith(".") and ".." not in key
        tok = subjects.token(name)
        assert not set(tok) & set(".*> \t\r\n"), tok


def test_long_names_are_hashed_and_distinct() -> None:
    a, b = "x" * 400 + "a", "x" * 400 + "b"
    assert subjects.kv_key(a) != subjects.kv_key(b)
    assert len(subjects.kv_key(a)) == 256 and "_Z" in subjects.kv_key(a)
    assert subjects.kv_key("x" * 256) == "x" * 256  # at the bound: kept as it is


def test_old_collisions_are_gone() -> None:
    assert subjects.token("a b") != subjects.token("a_b")
    assert subjects.kv_key("a b") != subjects.kv_key("a_b")
    assert subjects.token("a.b") != subjects.token("a_b")
    assert subjects.token("") != subjects.token("_")


def test_unescape_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        subjects.unescape("a_G1")
