"""docs/config.md documents every setting of the schema."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from moe_trainer.config.schema import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_every_schema_field_is_documented() -> None:
    text = DOC.read_text()
    for group, group_type in typing.get_type_hints(Config).items():
        for field in dataclasses.fields(group_type):
            assert f"`{group}.{field.name}`" in text, f"{group}.{field.name} missing from docs/config.md"
