"""Bringing a database up outside the reactor: the reachability check run before the reactor starts (a bad URL is
one line and exit 1), and the synchronous schema operations behind ``nanoiot db`` for operators and developers.

The server itself upgrades at start on the repository's thread pool (:meth:`Repository.start`); ``nanoiot db
upgrade`` runs the very same :func:`nanoiot.persistence.schema.upgrade`, advisory lock included.
"""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from nanoiot.errors import ConfigError
from nanoiot.persistence import schema
from nanoiot.persistence.repository import _create_engine


def check_database(url: str, timeout: int = 5) -> None:
    connect_args = {"connect_timeout": timeout} if url.startswith("postgresql") else {}
    try:
        engine = create_engine(url, connect_args=connect_args)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise ConfigError(f"invalid database URL {url!r}: {exc}") from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot reach the database {_safe(engine)}: {_reason(exc)}") from None
    finally:
        engine.dispose()


def upgrade_database(url: str) -> schema.Upgraded:
    """Create or upgrade the schema to the head revision, in one transaction (``nanoiot db upgrade``)."""
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            return schema.upgrade(conn)
    except schema.SchemaTooNew as exc:
        raise ConfigError(f"{_safe(engine)}: {exc}") from None
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot upgrade the database {_safe(engine)}: {_reason(exc)}") from None
    finally:
        engine.dispose()


def describe_current(url: str) -> str:
    """The database's revision in words (``nanoiot db current``): also says whether it is the head or needs work."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            found = schema.current_revision(conn)
            legacy = schema.legacy_version(conn) if found is None else None
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the database {_safe(engine)}: {_reason(exc)}") from None
    finally:
        engine.dispose()
    head = schema.head_revision()
    if found == head:
        return f"{found} (head)"
    if found is not None:
        known = found in {script.revision for script in schema.revisions()}
        if known:
            return f"{found} (behind head {head}: run nanoiot db upgrade)"
        return f"{found} (unknown to this NanoIoT, whose head is {head}: written by a newer one?)"
    if legacy is not None:
        return f"none: schema version {legacy} of a NanoIoT before Alembic (run nanoiot db upgrade)"
    return "none: an empty database (run nanoiot db upgrade, or start the server)"


def history() -> list[str]:
    """One line per revision, newest first (``nanoiot db history``)."""
    head = schema.head_revision()
    return [f"{script.revision}{' (head)' if script.revision == head else ''}  {(script.doc or '').strip()}"
            for script in schema.revisions()]


def new_revision(url: str, message: str, autogenerate: bool) -> str:
    """Write the next revision file (``0006_<slug>.py``...) for a developer; returns its path.

    With ``autogenerate`` Alembic drafts it from the difference between the Tables in ``schema.py`` and the
    database at ``url``, which must be at the head revision.
    """
    next_id = f"{int(schema.head_revision()) + 1:04d}"
    config = schema.alembic_config(url=_engine_url(url))
    try:
        script = command.revision(config, message=message, autogenerate=autogenerate, rev_id=next_id)
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot compare with the database: {_reason(exc)}") from None
    assert script is not None and not isinstance(script, list)
    return script.path


def _engine_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=False)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL {url!r}: {exc}") from None


def _engine(url: str) -> Engine:
    """An engine as the repository makes it (on SQLite: transactions that really begin, so DDL is atomic)."""
    try:
        return _create_engine(make_url(url), 1)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise ConfigError(f"invalid database URL {url!r}: {_reason(exc)}") from None


def _safe(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
