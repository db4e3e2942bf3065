"""A synchronous reachability check run before the reactor starts, so a bad URL is one line and exit 1."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from nanoiot.errors import ConfigError


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
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"cannot reach the database {engine.url.render_as_string(hide_password=True)}: "
                          f"{reason}") from None
    finally:
        engine.dispose()
