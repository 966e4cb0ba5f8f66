"""Tool-schema normalization: the reference's scenarios, plus properties."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.toolschema import MAX_SCHEMA_DEPTH, normalize_tool_schemas


def chat(parameters: Any, **extra: Any) -> bytes:
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}, **extra}
    return json.dumps({"model": "m", "messages": [], "tools": [tool]}).encode()


def params(body: bytes, index: int = 0) -> Any:
    return json.loads(body)["tools"][index]["function"]["parameters"]


def norm(body: bytes) -> Any:
    return json.loads(normalize_tool_schemas(body))


def test_typeless_property_and_object():
    out = params(normalize_tool_schemas(chat({"properties": {"a": {"description": "x"}}})))
    assert out == {"properties": {"a": {"description": "x", "type": "string"}}, "type": "object"}


def test_existing_types_preserved_and_identical_bytes():
    body = chat({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert normalize_tool_schemas(body) is body


def test_nested_arrays():
    out = params(normalize_tool_schemas(chat({"type": "object", "properties": {
        "a": {"items": {"items": {"enum": ["x"]}}}}})))
    assert out["properties"]["a"] == {"items": {"items": {"enum": ["x"], "type": "string"},
                                                "type": "array"}, "type": "array"}


def test_additional_properties_recursion_and_bare_bool_untouched():
    out = params(normalize_tool_schemas(chat({"type": "object", "additionalProperties": {
        "type": ["number", "null"]}, "properties": {"b": {"type": "object",
                                                          "additionalProperties": False}}})))
    assert out["additionalProperties"] == {"type": "number", "nullable": True}
    assert out["properties"]["b"]["additionalProperties"] is False


def test_union_inference_instead_of_blanket_string():
    out = params(normalize_tool_schemas(chat({"type": "object", "properties": {
        "a": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
        "b": {"oneOf": [{"type": ["boolean", "null"]}, {"type": "string"}]},
        "c": {"allOf": [{"description": "only"}]}}})))
    assert out["properties"]["a"]["type"] == "integer"
    assert out["properties"]["b"]["type"] == "boolean"  # member fixed first, drives the parent
    assert out["properties"]["c"]["type"] == "string"


def test_nullable_collapse_in_all_positions():
    schema = {"type": ["object", "null"], "properties": {"a": {"type": ["string", "null"]}},
              "additionalProperties": {"type": ["integer", "null"]}}
    schema["properties"]["l"] = {"type": "array", "items": {"type": ["string", "null"]}}
    out = params(normalize_tool_schemas(chat(schema)))
    assert out["type"] == "object" and out["nullable"] is True
    assert out["properties"]["a"] == {"type": "string", "nullable": True}
    assert out["properties"]["l"]["items"] == {"type": "string", "nullable": True}
    assert out["additionalProperties"] == {"type": "integer", "nullable": True}


def test_leading_null_and_null_only_arrays():
    out = params(normalize_tool_schemas(chat({"type": "object", "properties": {
        "a": {"type": ["null", "string"]}, "b": {"type": ["null"]}}})))
    assert out["properties"]["a"] == {"type": "string", "nullable": True}
    assert out["properties"]["b"] == {"type": "null"}


def test_malformed_non_string_types_fall_back_to_inference():
    out = params(normalize_tool_schemas(chat({"type": "object", "properties": {
        "a": {"type": 5}, "b": {"type": {"x": 1}, "items": {}}, "c": {"type": []},
        "d": {"type": [1, "string"]}, "e": {"type": None, "properties": {}}}})))
    props = out["properties"]
    assert props["a"]["type"] == "string"
    assert props["b"]["type"] == "array"
    assert props["c"]["type"] == "string"
    assert props["d"]["type"] == "string"
    assert props["e"]["type"] == "object"


def test_explicit_nullable_untouched():
    out = params(normalize_tool_schemas(chat({"type": "object", "properties": {
        "a": {"type": ["string", "null"], "nullable": False}}})))
    assert out["properties"]["a"] == {"type": "string", "nullable": False}


def test_maps_that_are_not_schemas_gain_nothing():
    out = params(normalize_tool_schemas(chat({"type": "object", "properties": {
        "a": {}, "b": {"default": 1}}, "items": [{"type": ["string", "null"]}]})))
    assert out["properties"] == {"a": {}, "b": {"default": 1}}


def test_deep_nesting_and_the_depth_limit():
    def nested(depth: int) -> dict[str, Any]:
        node: dict[str, Any] = {"type": ["string", "null"]}
        for _ in range(depth):
            node = {"properties": {"x": node}}
        return node

    within = params(normalize_tool_schemas(chat(nested(MAX_SCHEMA_DEPTH))))
    node = within
    for _ in range(MAX_SCHEMA_DEPTH):
        assert node["type"] == "object"
        node = node["properties"]["x"]
    assert node == {"type": "string", "nullable": True}

    beyond = params(normalize_tool_schemas(chat(nested(MAX_SCHEMA_DEPTH + 5))))
    node = beyond
    for _ in range(MAX_SCHEMA_DEPTH + 5):
        node = node["properties"]["x"]
    assert node == {"type": ["string", "null"]}  # below the limit: unchanged, no crash
    # Pathologically deep bodies do not crash either.
    deep = b'{"tools":[' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    assert normalize_tool_schemas(deep) is deep


def test_bodies_without_tools_or_malformed_pass_through():
    for body in [b'{"messages":[]}', b'{"x":"\\"tools\\""}', b'{"tools": "no"}',
                 b'{"tools": [], "x": 1} trailing', b'{"tools": [', b'[{"tools": []}]',
                 b"\xff\xfe\"tools\""]:
        assert normalize_tool_schemas(body) is body


def test_bodies_over_the_callers_limit_are_skipped():
    body = chat({"properties": {"a": {}}}, pad="x" * 5000)
    assert normalize_tool_schemas(body, limit=len(body) - 1) is body
    assert normalize_tool_schemas(body, limit=len(body)) != body


def test_numbers_and_siblings_survive_exactly():
    raw = ('{"model":"m","temperature":0.1000000000000000055511151231257827,'
           '"seed":123456789012345678901234567890,"n":1e400,"name":"Zoë 🚀",'
           '"tools":[{"type":"function","function":{"name":"f","parameters":'
           '{"properties":{"a":{"type":["string","null"],"minimum":1.50}}}}}]}').encode()
    out = normalize_tool_schemas(raw).decode()
    assert "0.1000000000000000055511151231257827" in out
    assert "123456789012345678901234567890" in out
    assert '"minimum":1.50' in out
    assert "Zoë 🚀" in out
    assert out.index('"model"') < out.index('"temperature"') < out.index('"tools"')


def test_idempotent():
    once = normalize_tool_schemas(chat({"properties": {"a": {"type": ["string", "null"]}}}))
    assert normalize_tool_schemas(once) is once


def test_the_incident_shape():
    """Pydantic Optional fields in a Gemma vision request: the partner's exact failure."""
    schema = {"title": "GetWeather", "type": "object", "properties": {
        "city": {"title": "City", "type": "string"},
        "unit": {"anyOf": [{"type": "string", "enum": ["c", "f"]}, {"type": "null"}],
                 "default": None},
        "days": {"type": ["integer", "null"], "default": None}}, "required": ["city"]}
    out = params(normalize_tool_schemas(chat(schema)))
    assert out["properties"]["unit"]["type"] == "string"
    assert out["properties"]["days"] == {"type": "integer", "default": None, "nullable": True}


def test_malformed_tool_entries_pass_through():
    body = json.dumps({"tools": [3, "x", None, {"name": "no schema"},
                                 {"type": "function", "function": {"name": "f", "parameters": None}},
                                 {"function": {"parameters": {"properties": {"a": {}}}}}]}).encode()
    out = json.loads(normalize_tool_schemas(body))["tools"]
    assert out[:5] == json.loads(body)["tools"][:5]
    assert out[5]["function"]["parameters"]["type"] == "object"


def test_responses_flat_tools():
    body = json.dumps({"tools": [{"type": "function", "name": "f",
                                  "parameters": {"properties": {"a": {"enum": [1]}}}}]}).encode()
    tool = norm(body)["tools"][0]
    assert tool["parameters"]["type"] == "object"
    assert tool["parameters"]["properties"]["a"]["type"] == "string"


def test_flat_tool_with_non_object_function():
    body = json.dumps({"tools": [{"function": "f", "parameters": {"properties": {}}}]}).encode()
    assert norm(body)["tools"][0]["parameters"]["type"] == "object"


def test_object_function_wrapper_claims_the_entry():
    body = json.dumps({"tools": [{"function": {"name": "f", "parameters": {"type": "object"}},
                                  "parameters": {"properties": {}}}]}).encode()
    assert normalize_tool_schemas(body) is body


def test_anthropic_input_schema_and_tool_without_schema():
    body = json.dumps({"tools": [
        {"name": "f", "input_schema": {"properties": {"a": {"type": ["string", "null"]}}}},
        {"name": "g"}, {"type": "web_search_20250305", "name": "web"}]}).encode()
    tools = norm(body)["tools"]
    assert tools[0]["input_schema"]["type"] == "object"
    assert tools[0]["input_schema"]["properties"]["a"] == {"type": "string", "nullable": True}
    assert tools[1:] == [{"name": "g"}, {"type": "web_search_20250305", "name": "web"}]


def test_mixed_shapes_in_one_body():
    body = json.dumps({"tools": [
        {"type": "function", "function": {"name": "a", "parameters": {"properties": {}}}},
        {"type": "function", "name": "b", "parameters": {"properties": {}}},
        {"name": "c", "input_schema": {"properties": {}}}]}).encode()
    tools = norm(body)["tools"]
    assert tools[0]["function"]["parameters"]["type"] == "object"
    assert tools[1]["parameters"]["type"] == "object"
    assert tools[2]["input_schema"]["type"] == "object"


def test_null_schemas_preserved():
    body = json.dumps({"tools": [{"name": "c", "input_schema": None},
                                 {"type": "function", "name": "b", "parameters": None}]}).encode()
    assert normalize_tool_schemas(body) is body


# ---- properties ----------------------------------------------------------------

names = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
type_values = st.one_of(
    st.sampled_from(["string", "integer", "number", "boolean", "object", "array", "null"]),
    st.lists(st.sampled_from(["string", "integer", "null"]), max_size=3),
    st.integers(), st.none(), st.dictionaries(names, st.integers(), max_size=1),
)


def schemas(depth: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    leaf = st.fixed_dictionaries({}, optional={
        "type": type_values, "description": st.text(max_size=5), "enum": st.lists(st.integers(),
                                                                                  max_size=2),
        "nullable": st.booleans(), "default": st.integers()})
    if depth == 0:
        return leaf
    child = schemas(depth - 1)
    return st.fixed_dictionaries({}, optional={
        "type": type_values, "description": st.text(max_size=5),
        "properties": st.dictionaries(names, child, max_size=3), "items": child,
        "additionalProperties": st.booleans() | child,
        "anyOf": st.lists(child, max_size=2), "oneOf": st.lists(child, max_size=2),
        "allOf": st.lists(child, max_size=2)})


def tool_entries() -> st.SearchStrategy[Any]:
    s = schemas()
    return st.one_of(
        st.builds(lambda p: {"type": "function", "function": {"name": "f", "parameters": p}}, s),
        st.builds(lambda p: {"type": "function", "name": "f", "parameters": p}, s),
        st.builds(lambda p: {"name": "f", "input_schema": p}, s),
        st.integers(), st.text(max_size=3), st.none(),
    )


bodies = st.builds(lambda tools, t: {"model": "m", "temperature": t, "tools": tools},
                   st.lists(tool_entries(), max_size=3),
                   st.floats(allow_nan=False, allow_infinity=False))


def covered_nodes(node: Any, depth: int = 0) -> list[dict[str, Any]]:
    """Schema nodes the rules cover (within the depth limit)."""
    if not isinstance(node, dict) or depth > MAX_SCHEMA_DEPTH:
        return []
    out = []
    if "type" in node or {"properties", "items", "additionalProperties", "enum", "description",
                          "anyOf", "oneOf", "allOf"} & set(node):
        out.append(node)
    kids: list[Any] = list((node.get("properties") or {}).values()) if isinstance(
        node.get("properties"), dict) else []
    items = node.get("items")
    kids += items if isinstance(items, list) else [items]
    kids.append(node.get("additionalProperties"))
    for union in ("anyOf", "oneOf", "allOf"):
        if isinstance(node.get(union), list):
            kids += node[union]
    for kid in kids:
        out += covered_nodes(kid, depth + 1)
    return out


def roots(doc: dict[str, Any]) -> list[Any]:
    out = []
    for tool in doc.get("tools", []):
        if not isinstance(tool, dict):
            continue
        if isinstance(tool.get("function"), dict):
            out.append(tool["function"].get("parameters"))
        elif isinstance(tool.get("parameters"), dict):
            out.append(tool["parameters"])
        if isinstance(tool.get("input_schema"), dict):
            out.append(tool["input_schema"])
    return out


def added_keys(before: Any, after: Any) -> set[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        keys = set(after) - set(before)
        for k in set(before) & set(after):
            keys |= added_keys(before[k], after[k])
        return keys
    if isinstance(before, list) and isinstance(after, list):
        keys: set[str] = set()
        for b, a in zip(before, after, strict=True):
            keys |= added_keys(b, a)
        return keys
    return set()


@pytest.mark.slow  # a long property run
@settings(max_examples=300)
@given(bodies)
def test_properties_over_generated_schemas(doc):
    raw = json.dumps(doc).encode()
    out = normalize_tool_schemas(raw)
    parsed = json.loads(out)  # output parses whenever input parses
    assert normalize_tool_schemas(out) is out  # idempotent: a second pass changes nothing
    assert added_keys(doc, parsed) <= {"type", "nullable"}
    for root in roots(parsed):
        for node in covered_nodes(root):
            assert isinstance(node["type"], str)
    assert parsed["temperature"] == doc["temperature"]


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw):
    out = normalize_tool_schemas(b'{"tools":' + raw)
    assert isinstance(out, bytes)
    assert normalize_tool_schemas(raw) is raw or isinstance(normalize_tool_schemas(raw), bytes)
