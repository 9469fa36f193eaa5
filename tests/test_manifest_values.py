"""The typed manifest values and the JSON Schema describe the same JSON; a compiled manifest round-trips."""
from __future__ import annotations

import json

import pytest

from robustpart.runtime import manifest as m
from robustpart.runtime.schema import MANIFEST_SCHEMA

pytestmark = pytest.mark.board

STAGE = MANIFEST_SCHEMA["properties"]["stages"]["items"]
SCHEMA_OF = {
    m.Manifest: MANIFEST_SCHEMA,
    m.ModelEntry: MANIFEST_SCHEMA["properties"]["model"],
    m.InputEntry: MANIFEST_SCHEMA["properties"]["input"],
    m.OutputEntry: MANIFEST_SCHEMA["properties"]["output"],
    m.CompensationEntry: MANIFEST_SCHEMA["properties"]["compensation"],
    m.HeadEntry: MANIFEST_SCHEMA["properties"]["head"],
    m.StageEntry: STAGE,
    m.TensorEntry: STAGE["properties"]["extras"]["items"],
    m.ShardEntry: STAGE["properties"]["shards"]["items"],
    m.PipelineEntry: MANIFEST_SCHEMA["properties"]["pipeline"],
    m.BlockEntry: MANIFEST_SCHEMA["properties"]["pipeline"]["properties"]["blocks"]["items"],
}


def test_every_json_value_has_its_schema():
    assert set(SCHEMA_OF) == set(m.JSON_VALUES)


@pytest.mark.parametrize("value_type", m.JSON_VALUES, ids=lambda t: t.__name__)
def test_schema_names_the_fields_the_value_writes(value_type):
    schema = SCHEMA_OF[value_type]
    assert m.json_keys(value_type) == set(schema["properties"])
    assert set(schema["required"]) <= set(schema["properties"])


def test_compiled_manifest_round_trips(bundle):
    data = json.loads((bundle / m.MANIFEST).read_text())
    loaded = m.load_manifest(bundle)
    assert loaded.to_json() == data
    assert m.Manifest.from_json(loaded.to_json(), loaded.root) == loaded
