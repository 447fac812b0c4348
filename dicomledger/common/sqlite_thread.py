"""An SQLite database used from asyncio on one thread of its own, with one connection.

Each call is one thread hop: a lookup-and-write runs as one function on the thread, where
aiosqlite would take a hop per statement. The image index (``dicom/index.py``), the forward
queue (``forwarding.py``), the lifecycle state and the ledger's writers (``ledger/log.py``) are
built on it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")


class ThreadedSqlite:
    def __init__(self, path: Path, thread_name: str) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._db: sqlite3.Connection | None = None

    async def _on_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect(self, synchronous: str, schema: str) -> None:
        """Open in WAL mode with ``synchronous`` (FULL: durable at commit) and create ``schema``."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(schema)
        self._db = db

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        assert self._db is not None
        return self._db.execute(sql, params).fetchall()

    async def close(self) -> None:
        if self._db is not None:
            await self._on_thread(self._db.close)
            self._db = None
        self._thread.shutdown()
