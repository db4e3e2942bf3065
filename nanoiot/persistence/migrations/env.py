"""The Alembic environment of NanoIoT's schema (run by Alembic, never imported).

The server and ``nanoiot db`` hand over a connection already inside their transaction
(``config.attributes["connection"]``); :func:`nanoiot.persistence.schema.alembic_config` builds the configuration
in code, so no ``alembic.ini`` is needed. Without a connection (``nanoiot db revision --autogenerate``), the URL is
``config.attributes["url"]``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool

from nanoiot.persistence.schema import metadata


def run(connection: Connection) -> None:
    # compare_type / compare_server_default: autogenerate (and the tests' comparison) see every difference.
    context.configure(connection=connection, target_metadata=metadata, compare_type=True,
                      compare_server_default=True)
    with context.begin_transaction():  # a no-op inside the caller's transaction
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    engine = create_engine(context.config.attributes["url"], poolclass=NullPool)
    try:
        with engine.begin() as connection:
            run(connection)
    finally:
        engine.dispose()


main()
