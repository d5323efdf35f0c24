"""The one pattern for ids a client chooses (npc, player, memory).

Such ids key memory collections, RAM state and caches, and appear inside prompts; a closed
alphabet keeps them from ever carrying chat-template structure, quotes or line breaks.
"""

from __future__ import annotations

import re

from npc_engine.errors import NpcEngineError

ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,64}$"
_ID = re.compile(ID_PATTERN)


def check_id(value: str, field: str) -> str:
    """``value`` if it is a valid id, else a clear error naming ``field``."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise NpcEngineError(
            f"{field} {value!r} is not a valid id: 1-64 characters of A-Z a-z 0-9 _ . : @ -"
        )
    return value
