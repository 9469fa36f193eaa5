"""The manifest's JSON Schema, and a small validator for the subset of JSON Schema it uses.

(The board runtime depends only on numpy, onnxruntime and pyzmq, so it carries its own validator.)
"""
from __future__ import annotations

SCHEMA_VERSION = 2

_INT_LIST = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_NAME_LIST = {"type": "array", "items": {"type": "string"}}
_SHA256 = {"type": "string", "minLength": 64, "maxLength": 64}
_SHARD = {
    "type": "object",
    "required": ["board", "file", "sha256", "channels", "param_bytes"],
    "properties": {"board": {"type": "integer", "minimum": 0}, "file": {"type": ["string", "null"]},
                   "sha256": {**_SHA256, "type": ["string", "null"]},
                   "channels": _INT_LIST, "param_bytes": {"type": "integer", "minimum": 0}},
}
_TENSOR = {"type": "object", "required": ["name", "shape"],
           "properties": {"name": {"type": "string"}, "shape": _INT_LIST}}

MANIFEST_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "robustpart bundle manifest",
    "type": "object",
    "required": ["schema_version", "model", "input", "output", "boards", "fill", "compensation", "provenance",
                 "stages", "head"],
    "properties": {
        "schema_version": {"type": "integer"},
        "model": {"type": "object", "required": ["name", "source_hash"],
                  "properties": {"name": {"type": "string"}, "source_hash": {"type": "string"}}},
        "input": {"type": "object", "required": ["name", "shape", "dtype", "mean", "std"],
                  "properties": {"name": {"type": "string"}, "shape": _INT_LIST,
                                 "dtype": {"type": "string", "enum": ["float32"]},
                                 "mean": {"type": "array", "items": {"type": "number"}},
                                 "std": {"type": "array", "items": {"type": "number"}}}},
        "output": {"type": "object", "required": ["name", "shape", "num_classes"],
                   "properties": {"name": {"type": "string"}, "shape": _INT_LIST,
                                  "num_classes": {"type": "integer", "minimum": 1},
                                  "labels": {"type": "array", "items": {"type": "string"}}}},
        "boards": {"type": "integer", "minimum": 1},
        "fill": {"type": "object", "required": ["policy"], "properties": {"policy": {"type": "string"}}},
        "compensation": {"type": ["object", "null"],
                         "required": ["file", "sha256", "policy", "max_failures", "sets", "affine_inputs"],
                         "properties": {"file": {"type": "string"}, "sha256": _SHA256, "policy": {"type": "object"},
                                        "max_failures": {"type": "integer", "minimum": 1},
                                        "sets": {"type": "array", "items": _INT_LIST},
                                        "seconds": {"type": "number", "minimum": 0},
                                        "bytes": {"type": "integer", "minimum": 0},
                                        "max_set_bytes": {"type": "integer", "minimum": 0},
                                        "board_bytes": {"type": "array",
                                                        "items": {"type": "integer", "minimum": 0}},
                                        "affine_inputs": _NAME_LIST}},
        "provenance": {"type": "object", "required": ["method", "options"],
                       "properties": {"method": {"type": "string"}, "options": {"type": "object"}}},
        "stages": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "unit", "inputs", "tensor", "shape", "axis", "extras", "fill_values", "shards"],
            "properties": {
                "index": {"type": "integer", "minimum": 0}, "unit": {"type": ["string", "null"]},
                "inputs": _NAME_LIST,
                "tensor": {"type": "string"}, "shape": _INT_LIST, "axis": {"type": "integer", "minimum": 1},
                "extras": {"type": "array", "items": _TENSOR},
                "fill_values": {"type": ["array", "null"], "items": {"type": "number"}},
                "shards": {"type": "array", "items": _SHARD}}}},
        "head": {"type": ["object", "null"], "required": ["inputs", "file", "sha256", "param_bytes"],
                 "properties": {"inputs": _NAME_LIST, "file": {"type": "string"}, "sha256": _SHA256,
                                "param_bytes": {"type": "integer", "minimum": 0}}},
        "backups": {"type": "array", "items": _INT_LIST},
        "memory_budget": {"type": "integer", "minimum": 0},
        "wire": {"enum": ["fp32", "fp16"]},
        "pipeline": {"type": "object", "required": ["mode", "skip", "exits", "blocks", "adapters"],
                     "properties": {
                         "mode": {"type": "string", "enum": ["pipeline", "hybrid"]},
                         "skip": {"type": "string", "enum": ["failover", "always", "none"]},
                         "exits": {"type": "boolean"},
                         "hyperconnections": {"type": "object", "required": ["weights", "board_failure"],
                                              "properties": {"weights": {"enum": ["relative", "reliability", "one"]},
                                                             "board_failure": {"type": "number", "minimum": 0}}},
                         "blocks": {"type": "array", "items": {
                             "type": "object", "required": ["stages", "boards", "output"],
                             "properties": {"stages": _INT_LIST, "boards": _INT_LIST, "output": _TENSOR}}},
                         "adapters": {"type": ["object", "null"], "required": ["file", "sha256", "pairs"],
                                      "properties": {"file": {"type": "string"}, "sha256": _SHA256,
                                                     "pairs": {"type": "array", "items": {"type": "object"}}}}}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
          "null": type(None), "boolean": bool}


def schema_errors(value, schema: dict, path: str = "manifest") -> list[str]:
    """Where `value` breaks `schema` (type, required, properties, items, enum, minimum, min/maxLength)."""
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = any(isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                 for t in names)
        if not ok:
            return [f"{path} should be {' or '.join(names)}, is {type(value).__name__}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path} should be one of {schema['enum']}, is {value!r}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{path} should be >= {schema['minimum']}, is {value}")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        errors.append(f"{path} should have {schema.get('minLength')}..{schema.get('maxLength')} characters")
    if isinstance(value, dict):
        errors += [f"{path}.{key} is missing" for key in schema.get("required", []) if key not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors
