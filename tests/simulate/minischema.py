"""A small JSON Schema checker for the keywords docs/scenario.schema.json uses (the project
has no JSON Schema library): $ref into $defs, type, enum, const, pattern, properties,
additionalProperties: false, required, items, minItems, maxItems, minimum, maximum,
minLength, oneOf. Returns the problems found, each with its path."""

from __future__ import annotations

import re
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "boolean": (bool,),
}
KNOWN = {
    "$schema", "title", "description", "$defs", "$ref", "type", "enum", "const", "pattern",
    "properties", "additionalProperties", "required", "items", "minItems", "maxItems",
    "minimum", "maximum", "minLength", "oneOf",
}  # fmt: skip


def problems(schema: dict[str, Any], value: Any, root: dict[str, Any] | None = None,
             path: str = "$") -> list[str]:  # fmt: skip
    root = root or schema
    unknown = set(schema) - KNOWN
    assert not unknown, f"the checker does not know {unknown} (at {path})"
    found: list[str] = []
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        found += problems(root["$defs"][name], value, root, path)
    if "type" in schema:
        wanted = _TYPES[schema["type"]]
        is_bool = isinstance(value, bool)
        if not isinstance(value, wanted) or (is_bool and schema["type"] == "integer"):
            return [*found, f"{path}: not a {schema['type']}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{path}: not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: not one of {schema['enum']}")
    if "pattern" in schema and not (isinstance(value, str) and re.search(schema["pattern"], value)):
        found.append(f"{path}: does not match {schema['pattern']}")
    if "minLength" in schema and len(value) < schema["minLength"]:
        found.append(f"{path}: too short")
    if "minimum" in schema and value < schema["minimum"]:
        found.append(f"{path}: below {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        found.append(f"{path}: above {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            found.append(f"{path}: too few items")
        if len(value) > schema.get("maxItems", len(value)):
            found.append(f"{path}: too many items")
        if "items" in schema:
            for i, item in enumerate(value):
                found += problems(schema["items"], item, root, f"{path}[{i}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                found.append(f"{path}.{key}: required")
        for key, item in value.items():
            if key in properties:
                found += problems(properties[key], item, root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{path}.{key}: not allowed")
    if "oneOf" in schema:
        matches = [s for s in schema["oneOf"] if not problems(s, value, root, path)]
        if len(matches) != 1:
            found.append(f"{path}: matches {len(matches)} of the oneOf alternatives, not 1")
    return found
