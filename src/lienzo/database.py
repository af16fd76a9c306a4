"""One SQLite file as lienzo's stores keep it (the gallery, the server's job queue, its API keys): the standard
library's sqlite3, one connection used under a lock, opened on first use (with the store's migrations) and
opened again when used after :meth:`Database.close`."""

import sqlite3
import threading
from pathlib import Path


class Database:
    """The connection's life; a store's :meth:`_open` sets the connection up (pragmas, migrations)."""

    def __init__(self, path: str | Path, timeout: float = 10.0):
        self.path = Path(path)
        self.timeout = timeout  # seconds a write waits for another process's
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        with self._lock:
            if self._conn is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = self._open()
            return self._conn

    def _connect(self) -> sqlite3.Connection:
        """A new connection; isolation_level None: each statement commits as it runs, unless the store begins
        a transaction itself."""
        return sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)

    def _open(self) -> sqlite3.Connection:
        raise NotImplementedError
