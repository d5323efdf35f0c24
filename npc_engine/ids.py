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


# Save ids become file names (``exports/<save_id>.npcsave``) and a save file is named by the
# client: on Windows ``:`` makes a drive-relative path (``D:x``) or an NTFS stream
# (``slot:stream``), device names (``NUL``, ``con.npcsave``) open a device whatever the
# extension, and a trailing dot or space is silently dropped. So a save name is the id
# alphabet without ``:``, never a device name, never ending in ``.``; ``check_save_name`` is
# the one check (protocol models, stores, CLI all call it).
SAVE_ID_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"
_SAVE_NAME = re.compile(SAVE_ID_PATTERN)
WINDOWS_DEVICE_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789"}
    | {"CONIN$", "CONOUT$", "CLOCK$"}
)


def save_name_problem(value: object) -> str | None:
    """Why ``value`` cannot name a save (and its file), or None when it can."""
    if not isinstance(value, str) or not _SAVE_NAME.fullmatch(value):
        return "1-64 characters of A-Z a-z 0-9 _ . @ - (no ':')"
    if value.endswith((".", " ")):
        return "must not end in '.'"
    if value.split(".", 1)[0].upper() in WINDOWS_DEVICE_NAMES:
        return "must not be a Windows device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    return None


def check_save_name(value: str) -> str:
    """``value`` if it can name a save and its file on every OS; else ValueError."""
    problem = save_name_problem(value)
    if problem is not None:
        raise ValueError(f"{str(value)[:80]!r} is not a valid save name: {problem}")
    return value
