"""JSON Schema files exported from the wire models (``execution-worker schema-export``)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.confirmation import ExecutionConfirmation
from schemas.rpm import RPMOutput, TradeDecision

SCHEMA_DIR = Path(__file__).parent / "json"
EXPORTED: dict[str, type[BaseModel]] = {
    "rpm_output.schema.json": RPMOutput,
    "trade_decision.schema.json": TradeDecision,
    "execution_confirmation.schema.json": ExecutionConfirmation,
}


def render(model: type[BaseModel]) -> str:
    """The committed text of one model's JSON Schema (stable: sorted keys, trailing newline)."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def export(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, model in EXPORTED.items():
        path = directory / file_name
        path.write_text(render(model), encoding="utf-8")
        written.append(path)
    return written
