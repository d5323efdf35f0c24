"""JSON Schemas generated from the pydantic models (never written by hand).

The committed ``*.schema.json`` files let editors validate persona YAML; a test fails when
they differ from what the models generate (`npc-engine schema NAME > file` refreshes them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

SCHEMA_DIR = Path(__file__).parent


def _models() -> dict[str, type[BaseModel]]:
    from npc_engine.persona.model import LoreFile, Persona, World

    return {"persona": Persona, "world": World, "lore": LoreFile}


def schema_for(name: str) -> dict[str, Any]:
    if name == "protocol":
        from npc_engine.protocol import protocol_schema

        return protocol_schema()
    model = _models()[name]
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://npc-engine.dev/schemas/{name}.schema.json"
    return schema


def schema_text(name: str) -> str:
    return json.dumps(schema_for(name), indent=2, ensure_ascii=False) + "\n"


def committed_schema_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.schema.json"
