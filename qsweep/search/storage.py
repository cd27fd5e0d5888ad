"""Where a study lives: SQLite by default, a journal file, or an RDB URL shared by many machines."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url

from qsweep.errors import QsweepError
from qsweep.locks import file_lock
from qsweep.rdb import connect_args, failure_reason, redact

JOURNAL_PREFIX = "journal:"


class StorageError(QsweepError):
    """The study storage cannot be opened, or holds a study that does not fit this search."""


def resolve(spec: str | None, project_dir: Path) -> str:
    """``search.storage`` as a full spec: None -> ``sqlite:///<project>/optuna.db``."""
    return spec or f"sqlite:///{(project_dir / 'optuna.db').resolve()}"


def open_storage(spec: str | None, project_dir: Path, heartbeat_s: int, retries: int) -> optuna.storages.BaseStorage:
    """Open (and create) the storage; RDB storages get heartbeats so a dead worker's trial is retried.

    Raises :class:`StorageError` naming the storage if it cannot be reached; a server that does not
    answer is such an error within :data:`qsweep.rdb.CONNECT_TIMEOUT_S` per address.
    """
    url = resolve(spec, project_dir)
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"search.storage={url!r}: cannot open the journal file: {exc}") from None
    if "://" not in url:
        raise StorageError(f"search.storage={url!r} is not allowed; give null (SQLite in the project), "
                           f"'journal:PATH' or an RDB URL such as 'sqlite:///optuna.db' or "
                           f"'postgresql://user:password@host/db'")
    try:
        with _creation_lock(url):
            return RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True, "connect_args": connect_args(url)},
                heartbeat_interval=heartbeat_s,
                grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=retries),
            )
    except Exception as exc:  # sqlalchemy raises many kinds: driver missing, refused, silent, auth, bad URL
        raise StorageError(f"search.storage={redact(url)!r} cannot be reached: {failure_reason(exc, url)}") from None


def _creation_lock(url: str) -> AbstractContextManager:
    """A lock on ``<file>.lock`` for a SQLite file: opening a new one creates its tables, and a second
    process doing that at the same moment fails ("table studies already exists")."""
    db = make_url(url)
    if db.get_backend_name() != "sqlite" or db.database in (None, "", ":memory:"):
        return nullcontext()
    return file_lock(Path(db.database + ".lock"))


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether a dead worker's trial is detected (and retried) by this storage."""
    return isinstance(storage, RDBStorage)
