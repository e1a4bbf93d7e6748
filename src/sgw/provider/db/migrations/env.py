"""Alembic environment: runs the migrations on the connection ``schema.upgrade`` passes.

From the command line (to write a new revision), pass the database with ``-x url=...``:
``alembic -c /dev/null -x url=sqlite:///dev.db revision --autogenerate -m "..."`` after
setting ``script_location`` (see ``schema.alembic_config``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from sgw.provider.db.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode recreates tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("no database: call sgw.provider.db.schema.upgrade(url) or pass -x url=...")
    from sgw.provider.db.schema import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


main()
