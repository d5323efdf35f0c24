"""Save slots: what a save is, and the file format of an exported save.

A save is a *manifest*: the ids of the memories alive when it was made (per collection) and
every game-state record (trust, flags, conversation histories). Memories themselves are not
copied: a memory is immutable once written, so the live store already holds every memory a
recent save names. Only a memory that leaves the live store (forgotten, or undone by a load)
while some save still names it is moved to an archive, from which a load brings it back.
That makes ``save.create`` cost one id listing and one write (no copy of 10,000 vectors) and
``save.load`` cost the difference between now and the save, not the size of the world.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from npc_engine.errors import FieldError
from npc_engine.ids import ID_PATTERN

SAVE_FORMAT = "npc-engine-save"
SAVE_FORMAT_VERSION = 1
MAX_SAVES = 100  # save ids are the client's choice: bounded
MAX_IMPORT_BYTES = 512 << 20  # a save file larger than this is refused before parsing
_SAVE_ID = re.compile(ID_PATTERN)


class SaveError(FieldError):
    """A save request the engine refuses; ``field`` names the field at fault."""


@dataclass(frozen=True)
class SaveInfo:
    save_id: str
    created_at: datetime
    memories: int

    def iso_created_at(self) -> str:
        return self.created_at.isoformat().replace("+00:00", "Z")


def check_save_id(save_id: str) -> str:
    if not isinstance(save_id, str) or not _SAVE_ID.match(save_id):
        raise SaveError("save_id", f"save_id must match {ID_PATTERN}")
    return save_id


def unknown_save(save_id: str) -> SaveError:
    return SaveError("save_id", f"No save with id {save_id!r}.")


def pack(document: dict[str, Any]) -> str:
    """JSON, compressed, as text (Chroma metadata holds strings, not bytes)."""
    raw = json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return base64.b64encode(gzip.compress(raw, compresslevel=1)).decode("ascii")


def unpack(text: str) -> dict[str, Any]:
    return dict(json.loads(gzip.decompress(base64.b64decode(text))))


def encode_export(
    info: SaveInfo, manifest: dict[str, Any], records: dict[str, dict[str, Any]]
) -> bytes:
    """An exported save: the manifest and every memory it names (text, metadata, vector)."""
    document = {
        "format": SAVE_FORMAT,
        "version": SAVE_FORMAT_VERSION,
        "save_id": info.save_id,
        "created_at": info.iso_created_at(),
        "manifest": manifest,
        "records": records,
    }
    return gzip.compress(json.dumps(document, separators=(",", ":")).encode("utf-8"), 6)


def decode_export(data: bytes) -> dict[str, Any]:
    """An exported save, checked for shape; refuses anything else with a clear error."""
    if len(data) > MAX_IMPORT_BYTES:
        raise SaveError("file", "the save file is larger than an engine save can be")
    try:
        document = json.loads(gzip.decompress(data))
    except (OSError, ValueError, EOFError) as exc:
        raise SaveError("file", f"not an npc-engine save file ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != SAVE_FORMAT:
        raise SaveError("file", "not an npc-engine save file")
    if document.get("version") != SAVE_FORMAT_VERSION:
        raise SaveError("file", f"save file version {document.get('version')} is not supported")
    manifest, records = document.get("manifest"), document.get("records")
    if not isinstance(manifest, dict) or not isinstance(records, dict):
        raise SaveError("file", "the save file has no manifest or no memories")
    return document
