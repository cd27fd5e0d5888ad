"""Database URLs (a study's storage, an MLflow store): every wait for the server is bounded.

A server that accepts the connection and then never answers would otherwise hold a run
forever: the drivers wait without limit by default.
"""

from __future__ import annotations

import re

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

# Seconds a server gets to answer a new connection, per address its host name resolves to
# (libpq tries each in turn): 10 s keeps a name with up to three addresses within 30 s.
CONNECT_TIMEOUT_S = 10
# Seconds a SQLite file waits for another process's write lock before failing.
SQLITE_LOCK_TIMEOUT_S = 30
# Each driver's connect-timeout keyword; drivers not named here get none.
TIMEOUT_KEYWORDS = {"psycopg": "connect_timeout", "psycopg2": "connect_timeout", "pg8000": "timeout"}
# Backends that live on a server (MLflow takes these as tracking URIs too; SQLite is a local file).
SERVER_BACKENDS = ("postgresql", "mysql", "mariadb", "mssql", "oracle")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _backend_and_driver(url: str) -> tuple[str, str] | None:
    """SQLAlchemy's names for the URL's backend and driver (None: not a URL SQLAlchemy knows)."""
    try:
        db = make_url(url)
        return db.get_backend_name(), db.get_driver_name()
    except (ArgumentError, NoSuchModuleError):
        return None


def is_server_url(url: str) -> bool:
    """Whether ``url`` names a database on a server (PostgreSQL, MySQL, ...), not a file or an HTTP service."""
    found = _backend_and_driver(url) if "://" in url else None
    return found is not None and found[0] in SERVER_BACKENDS


def connect_timeout(url: str) -> tuple[str, int] | None:
    """The driver keyword and seconds that bound a new connection's wait; None where the URL's query
    sets the keyword itself (``?connect_timeout=60``) or the driver has none."""
    found = _backend_and_driver(url)
    key = TIMEOUT_KEYWORDS.get(found[1]) if found else None
    if key is None or key in make_url(url).query:
        return None
    return key, CONNECT_TIMEOUT_S


def connect_args(url: str) -> dict[str, int]:
    """SQLAlchemy ``connect_args`` that bound every wait of a new connection to ``url``'s database."""
    found = _backend_and_driver(url)
    if found is not None and found[0] == "sqlite":
        return {"timeout": SQLITE_LOCK_TIMEOUT_S}
    timeout = connect_timeout(url)
    return dict([timeout]) if timeout else {}


def failure_reason(exc: BaseException, url: str) -> str:
    """The first line of a failed connection's error, and the wait that bounded it."""
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    timeout = connect_timeout(url)
    if timeout is not None:
        key, seconds = timeout
        reason += f" (a server gets {seconds} s to answer a connection; ?{key}=SECONDS in the URL changes it)"
    return reason


def probe(url: str) -> None:
    """Open and close one connection to ``url``'s database; raises the driver's error, within the bounded wait."""
    engine = create_engine(url, connect_args=connect_args(url))
    try:
        engine.connect().close()
    finally:
        engine.dispose()
