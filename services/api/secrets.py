"""Secret fields: which payload paths a trigger schema marks ``"x-secret": true``, and masking
them (and what was rendered from them) in what the api sends back. Pure functions, no I/O.

The keyword is ``x-secret`` (a boolean on any subschema but the root): JSON Schema ignores
unknown keywords, so every draft and validator accepts the schema unchanged, and the ``x-``
prefix is the extension convention of OpenAPI and AsyncAPI. ``writeOnly`` was not taken: it
says a value is never returned at all, while a secret is returned in clear to a principal
allowed to reveal it.

A secret path is a tuple of segments: a property name, an array index, or ``ANY`` (every item
of an array, or every property of an object: what ``items``, ``additionalProperties`` and
``patternProperties`` reach). Combinators (``allOf``, ``anyOf``, ``oneOf``, ``if``/``then``/
``else``, ``not``, ``dependentSchemas``) and local ``$ref`` apply to the same value, so a mark
under them marks the path they are at. Matching is deliberately wide (``ANY`` masks every
property of an object whose ``additionalProperties`` is secret): a read may show too many
``"***"``, never a secret.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

KEYWORD = "x-secret"
MASK = "***"
"""What a read shows instead of a secret value."""
MAX_SECRET_PATHS = 64
"""Paths one schema may mark secret."""
MAX_PATH_SEGMENTS = 16
"""Payloads are at most 16 levels deep: a deeper mark could never match, and is refused."""
_MAX_VISITS = 20_000
"""Subschemas visited while collecting (with every $ref inlined; schemas.py bounds that to
2,000 before this runs, this only stops a schema that was never checked)."""


class _Any:
    __slots__ = ()

    def __repr__(self) -> str:
        return "*"


ANY: Any = _Any()
"""A segment matching every array item or object property."""
Path = tuple[Any, ...]

_SAME = ("allOf", "anyOf", "oneOf")
_SAME_ONE = ("if", "then", "else", "not")
_ITEM = ("items", "additionalItems", "unevaluatedItems", "contains")
_PROPERTY = ("additionalProperties", "unevaluatedProperties")


def _where(field: str, at: tuple[str, ...]) -> str:
    return field + "".join(f".{p}" for p in at)


def secret_paths(schema: Any, field: str) -> tuple[tuple[Path, ...], list[tuple[str, str]]]:
    """The payload paths ``schema`` marks secret, or the problems of its marks (each naming the
    schema node under ``field``). Call it on a schema that compiled (``schemas.compile_schema``
    does): local ``$ref``s only, no cycles."""
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    visits = [0]

    def resolve(ref: str) -> Any:
        if not ref.startswith("#/") and ref != "#":
            return _anchor(schema, ref[1:]) if ref.startswith("#") else None
        node = schema
        for token in ref[2:].split("/") if ref != "#" else ():
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                return None
        return node

    def walk(node: Any, path: Path, at: tuple[str, ...], refs: tuple[str, ...]) -> None:
        visits[0] += 1
        if problems or visits[0] > _MAX_VISITS or not isinstance(node, dict):
            return
        mark = node.get(KEYWORD)
        if mark is not None:
            if not isinstance(mark, bool):
                problems.append((_where(field, (*at, KEYWORD)), "must be true or false"))
                return
            if mark:
                if not path:
                    problems.append(
                        (_where(field, (*at, KEYWORD)), "marks the whole payload: mark its properties instead")
                    )
                elif len(path) > MAX_PATH_SEGMENTS:
                    problems.append(
                        (_where(field, (*at, KEYWORD)), f"is deeper than {MAX_PATH_SEGMENTS} levels: no payload is")
                    )
                elif path not in found:
                    if len(found) == MAX_SECRET_PATHS:
                        problems.append((field, f"may mark at most {MAX_SECRET_PATHS} paths secret"))
                    else:
                        found.append(path)
                # Everything under a secret value is masked with it.
                return
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in refs:
            walk(resolve(ref), path, (*at, "$ref"), (*refs, ref))
        for key in _SAME:
            for i, child in enumerate(node[key] if isinstance(node.get(key), list) else ()):
                walk(child, path, (*at, key, str(i)), refs)
        for key in _SAME_ONE:
            walk(node.get(key), path, (*at, key), refs)
        for key in ("dependentSchemas",):
            for name, child in node[key].items() if isinstance(node.get(key), dict) else ():
                walk(child, path, (*at, key, name), refs)
        for name, child in node["properties"].items() if isinstance(node.get("properties"), dict) else ():
            walk(child, (*path, name), (*at, "properties", name), refs)
        for name, child in node["patternProperties"].items() if isinstance(node.get("patternProperties"), dict) else ():
            walk(child, (*path, ANY), (*at, "patternProperties", name), refs)
        for key in _PROPERTY:
            walk(node.get(key), (*path, ANY), (*at, key), refs)
        for key in _ITEM:
            child = node.get(key)
            if isinstance(child, list):  # draft 4-2019 tuple form: items by position
                for i, each in enumerate(child):
                    walk(each, (*path, i), (*at, key, str(i)), refs)
            else:
                walk(child, (*path, ANY), (*at, key), refs)
        if isinstance(node.get("prefixItems"), list):
            for i, each in enumerate(node["prefixItems"]):
                walk(each, (*path, i), (*at, "prefixItems", str(i)), refs)

    walk(schema, (), (), ())
    if problems:
        return (), problems[:1]
    return tuple(found), []


def _anchor(node: Any, name: str, depth: int = 0) -> Any:
    if depth > 64:
        return None
    if isinstance(node, dict):
        if node.get("$anchor") == name:
            return node
        children: Any = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _anchor(child, name, depth + 1)
        if found is not None:
            return found
    return None


def path_text(path: Path) -> str:
    """A path as a person reads it: ``creds.password``, ``tokens[*]``, ``items[0].key``."""
    out = ""
    for segment in path:
        if segment is ANY:
            out += "[*]"
        elif isinstance(segment, int):
            out += f"[{segment}]"
        else:
            out += f".{segment}" if out else str(segment)
    return out


def _at(value: Any, path: Path) -> Iterator[Any]:
    """The values at ``path`` inside ``value`` (several under ``ANY``)."""
    if not path:
        yield value
        return
    head, rest = path[0], path[1:]
    if head is ANY:
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            yield from _at(child, rest)
    elif isinstance(head, int):
        if isinstance(value, list) and head < len(value):
            yield from _at(value[head], rest)
    elif isinstance(value, dict) and head in value:
        yield from _at(value[head], rest)


def _masked(value: Any, path: Path) -> tuple[Any, bool]:
    """``value`` with what lies at ``path`` replaced by MASK (copied where it changes)."""
    if not path:
        return MASK, True
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        keys = list(value) if head is ANY else [head] if isinstance(head, str) and head in value else []
        out: Any = None
        for key in keys:
            child, changed = _masked(value[key], rest)
            if changed:
                if out is None:
                    out = dict(value)
                out[key] = child
        return (value, False) if out is None else (out, True)
    if isinstance(value, list):
        indexes = range(len(value)) if head is ANY else [head] if isinstance(head, int) and head < len(value) else []
        items: Any = None
        for i in indexes:
            child, changed = _masked(value[i], rest)
            if changed:
                if items is None:
                    items = list(value)
                items[i] = child
        return (value, False) if items is None else (items, True)
    return value, False


def mask_payload(payload: Any, paths: Sequence[Path]) -> tuple[Any, bool]:
    """The payload with every value at a secret path shown as MASK, and whether any was there.
    A payload of another shape than the schema's (a list where it has an object, a scalar)
    simply has nothing at that path."""
    changed = False
    for path in paths:
        payload, hit = _masked(payload, path)
        changed = changed or hit
    return payload, changed


def _leaves(value: Any, out: list[Any], depth: int = 0) -> None:
    if isinstance(value, dict):
        for child in value.values():
            _leaves(child, out, depth + 1)
    elif isinstance(value, list):
        for child in value:
            _leaves(child, out, depth + 1)
    elif value is not None and value != "" and depth < 64:
        out.append(value)


def secret_values(payload: Any, paths: Sequence[Path]) -> list[Any]:
    """The clear scalar values at the secret paths of a payload (every leaf of a secret object
    or list); empty strings and nulls hide nothing and are left out."""
    out: list[Any] = []
    for path in paths:
        for value in _at(payload, path):
            _leaves(value, out)
    return out


def _needles(values: Sequence[Any]) -> tuple[list[str], list[Any]]:
    texts: list[str] = []
    scalars: list[Any] = []
    for v in values:
        if isinstance(v, str):
            texts.append(v)
            escaped = json.dumps(v)[1:-1]  # as it appears inside a rendered object's JSON text
            if escaped != v:
                texts.append(escaped)
        elif isinstance(v, bool):
            scalars.append(v)
            texts.append("true" if v else "false")
        else:
            scalars.append(v)
            texts.append(json.dumps(v))
            # A number may have been rendered from a Struct's double (1234.0) or a decoded
            # integer (1234): whichever form the rendering used, it holds one of these.
            if isinstance(v, float) and v.is_integer():
                texts.append(str(int(v)))
            elif isinstance(v, int):
                texts.append(f"{v}.0")
    return texts, scalars


def mask_rendered(value: Any, secrets: Sequence[Any]) -> tuple[Any, bool]:
    """``value`` (rendered action parameters, schema problems) with every string that holds a
    secret's text, and every scalar equal to a secret, shown as MASK.

    Templates are path lookups only (``matching.py``): a parameter that took a secret holds it
    whole (``{{ event.payload.token }}``) or inside its text (``Bearer {{ ... }}``, or an
    object rendered as JSON), never transformed, so finding the value finds every use. A
    parameter that merely happens to contain a secret's text is masked too: wide on purpose."""
    if not secrets:
        return value, False
    texts, scalars = _needles(secrets)
    return _mask_texts(value, texts, scalars)


def _mask_texts(value: Any, texts: list[str], scalars: list[Any]) -> tuple[Any, bool]:
    if isinstance(value, str):
        return (MASK, True) if any(t in value for t in texts) else (value, False)
    if isinstance(value, dict):
        out: dict[str, Any] | None = None
        for key, child in value.items():
            new, changed = _mask_texts(child, texts, scalars)
            if changed:
                if out is None:
                    out = dict(value)
                out[key] = new
        return (value, False) if out is None else (out, True)
    if isinstance(value, list):
        items: list[Any] | None = None
        for i, child in enumerate(value):
            new, changed = _mask_texts(child, texts, scalars)
            if changed:
                if items is None:
                    items = list(value)
                items[i] = new
        return (value, False) if items is None else (items, True)
    if value is not None and any(_same_scalar(value, s) for s in scalars):
        return MASK, True
    return value, False


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _field_path(field: str) -> Path:
    return tuple(field.split(".")) if field else ()


def _touches(field: Path, path: Path) -> bool:
    """Whether a condition's field lies at, under or above a secret path: either way the value
    it is compared with is (or holds) a secret value. ``ANY`` in the field is a searched list's
    item, which may be any index."""
    for f, p in zip(field, path, strict=False):
        if f is ANY or p is ANY:
            continue
        if isinstance(p, int):
            if f != str(p):
                return False
        elif f != p:
            return False
    return True


def mask_conditions(nodes: Sequence[Any], paths: Sequence[Path]) -> tuple[list[Any], bool]:
    """A rule's condition tree (stored JSON: tests, ``all``/``any``/``not`` groups, a search's
    ``item``) with the ``value`` of every test whose field touches a secret path shown as
    MASK, and whether any was. A search's own value is a count; its item's tests are on
    ``item.<path>``, which is the list's path, any index, then ``<path>``."""
    if not paths:
        return list(nodes), False
    changed = [False]

    def node(n: Any, prefix: Path) -> Any:
        if not isinstance(n, dict):
            return n
        out = dict(n)
        for group in ("all", "any"):
            if isinstance(n.get(group), list):
                out[group] = [node(child, prefix) for child in n[group]]
        if "not" in n:
            out["not"] = node(n["not"], prefix)
        field = n.get("field")
        if not isinstance(field, str):
            return out
        segments = _field_path(field)
        if prefix:  # inside a search's item: "item" is the list's item
            segments = (*prefix, *segments[1:])
        if "item" in n:
            out["item"] = node(n["item"], (*segments, ANY))
        elif "value" in n and any(_touches(segments, p) for p in paths) and n["value"] != MASK:
            out["value"] = MASK
            changed[0] = True
        return out

    masked = [node(n, ()) for n in nodes]
    return (masked, True) if changed[0] else (list(nodes), False)


def masked_on_secrets(nodes: Sequence[Any], paths: Sequence[Path]) -> list[str]:
    """The fields of the tests in a condition tree whose value is MASK on a secret path: what a
    client that read a rule masked and wrote it back whole would store instead of the value."""
    found: list[str] = []

    def node(n: Any, prefix: Path) -> None:
        if not isinstance(n, dict):
            return
        for group in ("all", "any"):
            if isinstance(n.get(group), list):
                for child in n[group]:
                    node(child, prefix)
        if "not" in n:
            node(n["not"], prefix)
        field = n.get("field")
        if not isinstance(field, str):
            return
        segments = _field_path(field)
        if prefix:
            segments = (*prefix, *segments[1:])
        if "item" in n:
            node(n["item"], (*segments, ANY))
        elif n.get("value") == MASK and any(_touches(segments, p) for p in paths):
            found.append(field)

    for n in nodes:
        node(n, ())
    return found


def field_is_secret(field: str, paths: Sequence[Path]) -> bool:
    """Whether a condition's field (``a.b``; ``item.x`` inside a search counts as any of its
    list's items) lies at, under or above one of ``paths``."""
    segments = tuple(ANY if part == "item" else part for part in _field_path(field))
    return any(_touches(segments, p) for p in paths)
