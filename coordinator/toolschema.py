"""Tool-schema normalization: bytes in, bytes out. Pure; never raises.

Gemma-style chat templates render ``{{ value['type'] | upper }}`` over every
tool parameter, so a parameter whose ``type`` is missing (enum-only, anyOf,
description-only: all legitimate JSON Schema) or not a string (Pydantic's
``["string", "null"]`` for every ``Optional``) crashes the template. This
module rewrites exactly those nodes, in every wire shape a tool can take:

* chat completions: ``tools[].function.parameters`` (an object ``function``
  claims the entry; a stray top-level ``parameters`` beside it is left alone);
* Responses API flat tools: ``tools[].parameters`` when there is no object
  ``function``;
* Anthropic: ``tools[].input_schema``, independently of the other two.

Fidelity: when nothing needs repair the input bytes come back untouched. When
something does, the body is re-encoded with numbers kept as their exact text
(``Decimal``), non-ASCII kept as is, and key order kept.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Final

MAX_SCHEMA_DEPTH: Final = 32

_SCHEMA_HINTS: Final = frozenset(
    {"properties", "items", "additionalProperties", "enum", "description", "anyOf", "oneOf",
     "allOf"}
)
_UNIONS: Final = ("anyOf", "oneOf", "allOf")


def normalize_tool_schemas(body: bytes, *, limit: int = 10 * 1024 * 1024) -> bytes:
    """Repair tool schemas in a request body; return ``body`` itself when nothing changes.

    ``limit`` is the body limit of the caller (docs/configuration.md, "Sizes"):
    bodies above it are left alone, as they are refused anyway.
    """
    if b'"tools"' not in body or len(body) > limit:
        return body
    exact = _ExactFloats()
    try:
        doc = json.loads(body, parse_float=exact)
    except (ValueError, RecursionError):
        return body  # malformed JSON, trailing data: left for validation to reject
    if not isinstance(doc, dict) or not isinstance(doc.get("tools"), list):
        return body
    try:
        changed = False
        for tool in doc["tools"]:
            changed |= _normalize_tool(tool)
        if not changed:
            return body
        if exact.lossless:
            return _encode_fast(doc)
        # Some number's text would not survive a float: re-parse keeping it exact.
        doc = json.loads(body, parse_float=Decimal)
        for tool in doc["tools"]:
            _normalize_tool(tool)
        return _encode(doc)
    except RecursionError:
        return body


def _normalize_tool(tool: Any) -> bool:
    if not isinstance(tool, dict):
        return False
    changed = False
    function = tool.get("function")
    if isinstance(function, dict):
        changed |= _normalize_root(function, "parameters")
    elif isinstance(tool.get("parameters"), dict):
        changed |= _normalize_root(tool, "parameters")
    if isinstance(tool.get("input_schema"), dict):
        changed |= _normalize_root(tool, "input_schema")
    return changed


def _normalize_root(holder: dict[str, Any], key: str) -> bool:
    schema = holder.get(key)
    return isinstance(schema, dict) and _fix(schema, 0)


def _fix(node: dict[str, Any], depth: int) -> bool:
    """Repair ``node`` in place, children before parents. True if anything changed."""
    if depth > MAX_SCHEMA_DEPTH:
        return False  # below the limit, nodes pass through unchanged
    changed = False
    for child in _children(node):
        changed |= _fix(child, depth + 1)
    if "type" in node:
        kind = node["type"]
        if isinstance(kind, str):
            return changed
        if isinstance(kind, list) and kind and all(isinstance(m, str) for m in kind):
            concrete = [m for m in kind if m != "null"]
            node["type"] = concrete[0] if concrete else "null"
            if concrete and len(concrete) < len(kind) and "nullable" not in node:
                node["nullable"] = True
            return True
        node["type"] = _infer(node)  # any other shape: never delete the key
        return True
    if _SCHEMA_HINTS.intersection(node):
        node["type"] = _infer(node)
        return True
    return changed


def _children(node: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    properties = node.get("properties")
    if isinstance(properties, dict):
        out.extend(v for v in properties.values() if isinstance(v, dict))
    items = node.get("items")
    if isinstance(items, dict):
        out.append(items)
    elif isinstance(items, list):
        out.extend(v for v in items if isinstance(v, dict))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):  # a bare true/false stays as it is
        out.append(extra)
    for union in _UNIONS:
        members = node.get(union)
        if isinstance(members, list):
            out.extend(m for m in members if isinstance(m, dict))
    return out


def _infer(node: dict[str, Any]) -> str:
    if "properties" in node or "additionalProperties" in node:
        return "object"
    if "items" in node:
        return "array"
    for union in _UNIONS:
        members = node.get(union)
        if not isinstance(members, list):
            continue
        for member in members:
            if isinstance(member, dict):
                kind = member.get("type")
                if isinstance(kind, str) and kind != "null":
                    return kind
    return "string"


class _ExactFloats:
    """parse_float hook: a float, noting whether its text would change on re-encoding."""

    def __init__(self) -> None:
        self.lossless = True

    def __call__(self, text: str) -> float:
        value = float(text)
        if self.lossless and repr(value) != text:
            self.lossless = False
        return value


def _encode_fast(doc: Any) -> bytes:
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _encode(doc: Any) -> bytes:
    parts: list[str] = []
    _write(doc, parts)
    text = "".join(parts)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (from \\ud800 escapes) cannot be UTF-8: escape everything.
        parts = []
        _write(doc, parts, ascii_only=True)
        return "".join(parts).encode("ascii")


def _write(value: Any, out: list[str], ascii_only: bool = False) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=ascii_only))
            out.append(":")
            _write(item, out, ascii_only)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out, ascii_only)
        out.append("]")
    elif isinstance(value, Decimal):
        out.append(str(value))  # the number's own text: no float rounding
    else:
        out.append(json.dumps(value, ensure_ascii=ascii_only))
