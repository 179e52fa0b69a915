"""The filter grammar the contract declares (app.services.segment_schema) is the one the compiler accepts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode

from app.errors import InvalidInput
from app.services.segments import _compile

SCHEMA = schemathesis.openapi.from_path(Path(__file__).resolve().parents[2] / "openapi" / "openapi.json")


def _names_attributes(node: Any) -> bool:
    """Whether a filter has an `attributes.` condition: those need a defined attribute (the server's state)."""
    return "attributes." in json.dumps(node)


def test_every_filter_the_contract_allows_compiles() -> None:
    operation = SCHEMA["/v1/segments/preview"]["POST"]
    compiled = 0

    @seed(16)
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def run(case: schemathesis.Case) -> None:
        nonlocal compiled
        if _names_attributes(case.body["filter"]):
            return
        _compile(case.body["filter"], {}, datetime.now(UTC))  # raises InvalidInput on a refused filter
        compiled += 1

    run()
    assert compiled >= 30  # enough filters without attributes were tried


@pytest.mark.parametrize("value", [3, 3.0])
def test_a_whole_number_may_be_written_as_a_json_float(value: float) -> None:
    # JSON has one number type: a schema's "integer" allows 3.0, and so does the compiler.
    _compile({"all": [{"field": "stats.orders_count", "op": "gte", "value": value},
                      {"field": "orders.sku", "op": "eq", "value": "X", "within_days": value}]}, {}, datetime.now(UTC))


def test_a_fraction_is_not_a_whole_number() -> None:
    with pytest.raises(InvalidInput):
        _compile({"field": "stats.orders_count", "op": "gte", "value": 2.5}, {}, datetime.now(UTC))
