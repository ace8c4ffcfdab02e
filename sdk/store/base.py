"""The store's engine, transactions and schema check: what every part of `Store` builds on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from edgefleet.sdk.store.schema import StoreError, default_db_url, engine_for, prepare_schema


class StoreBase:
    """One engine and short transactions; writes upsert with INSERT ... ON CONFLICT, not a Python lock.

    Several threads and several processes (two ingest processes on a shared subscription) may write at
    once: PostgreSQL serializes per row (ON CONFLICT, SELECT ... FOR UPDATE on a device's row), SQLite per
    database (write transactions begin IMMEDIATE and wait up to the busy timeout).
    """

    def __init__(self, url: str | None = None, retention_days: float | None = 30.0) -> None:
        self.url = url or default_db_url()
        self.retention_days = retention_days
        self.engine = engine_for(self.url)
        try:
            with self._tx(write=True) as conn:
                prepare_schema(conn, self._safe_url())
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, OperationalError):
                raise StoreError(
                    f"cannot open the store at {self._safe_url()}: {cause.orig}. Check that the database "
                    "server runs and the URL (user, host, port, database) is right, or pass --db sqlite:///PATH"
                ) from cause
            raise

    def _safe_url(self) -> str:
        """The URL without its password, for messages."""
        return str(self.engine.url.render_as_string(hide_password=True))

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Connection]:
        """One transaction (a write one takes SQLite's lock at BEGIN); SQLAlchemy errors become StoreError."""
        try:
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(edgefleet_write=True)
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"store operation failed: {exc}") from exc

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()
