"""A fresh PostgreSQL database per test (created with a unique name, dropped at the end) on 127.0.0.1:5432."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create an empty database, yield its URL, drop it (with any connection left to it) at the end."""
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg is not installed: pip install 'edgefleet[host]'")
    name = f"ef_{uuid.uuid4().hex[:16]}"
    try:
        admin = psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"no PostgreSQL on 127.0.0.1:5432 ({exc}); start it or deselect -m 'not postgres'")
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{PG_SERVER}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
