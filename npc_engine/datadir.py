"""One engine process owns a data directory: Chroma's PersistentClient is not safe for two
writer processes on one path (chroma-core/chroma #961, #7040), so a second engine fails fast."""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

from npc_engine.errors import DataDirInUseError, NpcEngineError

LOCK_NAME = "npc-engine.lock"
OWNER_NAME = "npc-engine.owner"


class DataDirLock:
    """An OS file lock (released by the kernel even on ``kill -9``) plus the owner's pid."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._lock = FileLock(str(data_dir / LOCK_NAME), timeout=0)

    def acquire(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NpcEngineError(
                f"Cannot create the data directory {self.data_dir}: {exc.strerror}"
            ) from exc
        try:
            self._lock.acquire()
        except Timeout:
            owner = self._read_owner()
            raise DataDirInUseError(
                f"The data directory {self.data_dir} is in use by another npc-engine process"
                f"{f' (pid {owner})' if owner else ''}. Stop it, or give this one its own "
                "--data-dir."
            ) from None
        (self.data_dir / OWNER_NAME).write_text(str(os.getpid()))

    def _read_owner(self) -> str | None:
        try:
            return (self.data_dir / OWNER_NAME).read_text().strip() or None
        except OSError:
            return None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
