"""The three PATCH content types the API server accepts for built-in kinds.

* ``application/json-patch+json``: RFC 6902 (add, remove, replace, move, copy, test),
  with RFC 6901 pointers (``~1`` is ``/``, ``~0`` is ``~``, ``-`` appends).
* ``application/merge-patch+json``: RFC 7386 (maps merged, ``null`` deletes, lists replaced).
* ``application/strategic-merge-patch+json``: the Kubernetes flavour.  Maps merge like a
  merge patch; lists whose Go field carries ``patchStrategy:"merge"`` are merged element by
  element on their ``patchMergeKey`` (containers by ``name``, ports by ``containerPort``,
  volumeMounts by ``mountPath``, conditions by ``type`` ...); every other list is replaced
  (tolerations, taints and containerStatuses are atomic in the real API too).  Directives:
  ``$patch: replace|delete`` on maps and list elements, ``$retainKeys``,
  ``$deleteFromPrimitiveList/<field>``; ``$setElementOrder/<field>`` is accepted and ignored.

All functions return a new document and never modify their arguments.
"""

from __future__ import annotations

from typing import Any

from .jcopy import jcopy

JSONPATCH = "application/json-patch+json"
MERGEPATCH = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY_YAML = "application/apply-patch+yaml"


class PatchError(Exception):
    """The patch cannot be applied; ``invalid`` selects 422 (else 400) for the caller."""

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


# --------------------------------------------------------------------------- RFC 6902


def _json_equal(a: Any, b: Any) -> bool:
    """Equality in the JSON sense: ``true`` is not ``1``, ``1`` equals ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise PatchError(f"invalid JSON pointer {path!r}")
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer must start with '/': {path!r}")
    return [tok.replace("~1", "/").replace("~0", "~") for tok in path[1:].split("/")]


def _index(container: list[Any], token: str, path: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"invalid array index {token!r} in {path}", invalid=True)
    idx = int(token)
    limit = len(container) + (1 if allow_end else 0)
    if idx >= limit:
        raise PatchError(f"array index {idx} out of bounds in {path}", invalid=True)
    return idx


def _resolve(doc: Any, tokens: list[str], path: str) -> Any:
    node = doc
    for tok in tokens:
        if isinstance(node, dict):
            if tok not in node:
                raise PatchError(f"doc is missing path: {path}", invalid=True)
            node = node[tok]
        elif isinstance(node, list):
            node = node[_index(node, tok, path, allow_end=False)]
        else:
            raise PatchError(f"doc is missing path: {path}", invalid=True)
    return node


def _add(doc: Any, tokens: list[str], value: Any, path: str) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, path, allow_end=True), value)
    else:
        raise PatchError(f"add operation does not apply: doc is missing path: {path}", invalid=True)
    return doc


def _remove(doc: Any, tokens: list[str], path: str) -> tuple[Any, Any]:
    if not tokens:
        raise PatchError("cannot remove the whole document", invalid=True)
    parent = _resolve(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(
                f"remove operation does not apply: doc is missing path: {path}", invalid=True
            )
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(parent, last, path, allow_end=False))
    raise PatchError(f"remove operation does not apply: doc is missing path: {path}", invalid=True)


def json_patch(doc: Any, ops: Any) -> Any:
    """Apply an RFC 6902 patch; a failed ``test`` raises ``PatchError(invalid=True)``."""
    if not isinstance(ops, list):
        raise PatchError("json patch must be a JSON array of operations")
    doc = jcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid json patch operation {op!r}")
        kind, path = op["op"], op["path"]
        tokens = _pointer(path)
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"{kind} operation has no value: {op!r}")
        if kind == "add":
            doc = _add(doc, tokens, jcopy(op["value"]), path)
        elif kind == "remove":
            doc, _ = _remove(doc, tokens, path)
        elif kind == "replace":
            _resolve(doc, tokens, path)  # must exist
            if tokens:
                doc, _ = _remove(doc, tokens, path)
            doc = _add(doc, tokens, jcopy(op["value"]), path)
        elif kind in ("move", "copy"):
            src = op.get("from")
            from_tokens = _pointer(src)
            if kind == "move":
                if tokens[: len(from_tokens)] == from_tokens and tokens != from_tokens:
                    raise PatchError(f"cannot move {src} into its own child {path}", invalid=True)
                doc, value = _remove(doc, from_tokens, str(src))
            else:
                value = jcopy(_resolve(doc, from_tokens, str(src)))
            doc = _add(doc, tokens, value, path)
        elif kind == "test":
            try:
                current = _resolve(doc, tokens, path)
            except PatchError:
                raise PatchError(
                    f"testing value {path} failed: path does not exist", invalid=True
                ) from None
            if not _json_equal(current, op["value"]):
                raise PatchError(f"testing value {path} failed: test failed", invalid=True)
        else:
            raise PatchError(f"unexpected json patch operation {kind!r}")
    return doc


# --------------------------------------------------------------------------- RFC 7386


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return jcopy(patch)
    result = jcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------- strategic

# Field name -> patchMergeKey, for the list fields of the kinds served here whose Go
# struct tag says patchStrategy:"merge" (core/v1 types.go, meta/v1 types.go).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "ports": "containerPort",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "resourceClaims": "name",
    "conditions": "type",
    "addresses": "type",
    "ownerReferences": "uid",
    "topologySpreadConstraints": "topologyKey",
}
# Lists of scalars with patchStrategy:"merge" (treated as sets).
PRIMITIVE_MERGE: frozenset[str] = frozenset({"finalizers"})

_IGNORED_PREFIXES = ("$setElementOrder/",)
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"


def _strip(value: Any) -> Any:
    """Drop directive keys from a value that is inserted wholesale."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip(v) for v in value if not (isinstance(v, dict) and "$patch" in v)]
    return value


def _merge_list(original: list[Any], patch: list[Any], key: str) -> list[Any]:
    if any(isinstance(e, dict) and e.get("$patch") == "replace" for e in patch):
        return _strip(patch)  # type: ignore[no-any-return]
    result = jcopy(original)
    for elem in patch:
        if not isinstance(elem, dict):
            raise PatchError(f"list element {elem!r} is not a map with merge key {key!r}")
        if key not in elem:
            raise PatchError(f"map: {elem!r} does not contain declared merge key: {key}")
        idx = next(
            (
                i
                for i, cur in enumerate(result)
                if isinstance(cur, dict) and cur.get(key) == elem[key]
            ),
            None,
        )
        if elem.get("$patch") == "delete":
            if idx is not None:
                del result[idx]
            continue
        if idx is None:
            result.append(_merge_map({}, elem))
        else:
            result[idx] = _merge_map(result[idx], elem)
    return result


def _merge_map(original: dict[str, Any], patch: dict[str, Any]) -> Any:
    directive = patch.get("$patch")
    if directive == "replace":
        return _strip(patch)
    if directive == "delete":
        return None
    if directive is not None:
        raise PatchError(f"unknown patch type: {directive!r}")
    result = jcopy(original)
    retain = patch.get("$retainKeys")
    if retain is not None:
        if not isinstance(retain, list):
            raise PatchError("$retainKeys must be a list")
        result = {k: v for k, v in result.items() if k in retain}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith(_IGNORED_PREFIXES):
            continue
        if key.startswith(_DELETE_PRIMITIVE):
            field = key[len(_DELETE_PRIMITIVE) :]
            if isinstance(result.get(field), list) and isinstance(value, list):
                result[field] = [v for v in result[field] if v not in value]
            continue
        if key.startswith("$"):
            raise PatchError(f"unknown strategic merge patch directive {key!r}")
        if value is None:
            result.pop(key, None)
            continue
        current = result.get(key)
        if isinstance(value, dict):
            merged = _merge_map(current if isinstance(current, dict) else {}, value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list) and key in MERGE_KEYS:
            result[key] = _merge_list(
                current if isinstance(current, list) else [], value, MERGE_KEYS[key]
            )
        elif isinstance(value, list) and key in PRIMITIVE_MERGE and isinstance(current, list):
            result[key] = current + [v for v in value if v not in current]
        else:
            result[key] = _strip(value)
    return result


def strategic_merge_patch(target: dict[str, Any], patch: Any) -> dict[str, Any]:
    """Apply a strategic merge patch to a whole object."""
    if not isinstance(patch, dict):
        raise PatchError("strategic merge patch must be a JSON object")
    merged = _merge_map(target, patch)
    if merged is None:
        raise PatchError("cannot $patch: delete the whole object")
    return merged  # type: ignore[no-any-return]


def apply_patch(content_type: str, target: dict[str, Any], patch: Any) -> Any:
    """Dispatch on the request's Content-Type (parameters such as charset ignored)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == JSONPATCH:
        return json_patch(target, patch)
    if media == MERGEPATCH:
        if not isinstance(patch, dict):
            raise PatchError("merge patch must be a JSON object")
        return merge_patch(target, patch)
    if media == STRATEGIC:
        return strategic_merge_patch(target, patch)
    raise PatchError(f"unsupported patch content type {media!r}")
