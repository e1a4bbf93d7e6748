"""Schema migrations that decide something about existing rows, on real databases (SQLite
file and PostgreSQL server): a database at the revision before is filled as that version
left it, then upgraded (and downgraded and upgraded again)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command

from sgw.provider.db.models import UtcDateTime
from sgw.provider.db.schema import alembic_config, head_revision, make_engine, upgrade

NOW = datetime(2026, 12, 1, tzinfo=UTC)

# The tables as revision 0006 had them (only the columns filled here).
ACCOUNTS = sa.table(
    "accounts", sa.column("id"), sa.column("name"), sa.column("created", UtcDateTime())
)
GATEWAYS = sa.table(
    "gateways",
    sa.column("id"),
    sa.column("account_id"),
    sa.column("name"),
    sa.column("created", UtcDateTime()),
)
VOLUMES = sa.table(
    "volumes",
    *(sa.column(c) for c in ("id", "account_id", "gateway_id", "name", "size", "chunk_size")),
    *(sa.column(c) for c in ("mode", "map_version", "key_scope")),
    sa.column("created", UtcDateTime()),
)
CHAP = sa.table(
    "chap_credentials",
    *(sa.column(c) for c in ("volume_id", "initiator", "secret")),
    sa.column("updated", UtcDateTime()),
)


def migrate(url: str, revision: str, *, down: bool = False) -> None:
    engine = make_engine(url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


def test_0007_keeps_open_what_was_open_and_closes_the_rest(empty_db_url: str) -> None:
    """Before 0007 a gateway exported a volume without CHAP credentials to any initiator:
    such volumes are marked legacy open; one with CHAP, or on no gateway, is not; none is
    open by flag; the initiators table starts empty."""
    migrate(empty_db_url, "0006")
    account, gateway = str(uuid.uuid4()), str(uuid.uuid4())
    ids = {name: str(uuid.uuid4()) for name in ("open", "chapped", "unbound")}
    engine = make_engine(empty_db_url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(ACCOUNTS).values(id=account, name="acme", created=NOW))
            conn.execute(
                sa.insert(GATEWAYS).values(id=gateway, account_id=account, name="gw", created=NOW)
            )
            for name, vid in ids.items():
                conn.execute(
                    sa.insert(VOLUMES).values(
                        id=vid,
                        account_id=account,
                        gateway_id=None if name == "unbound" else gateway,
                        name=name,
                        size=1 << 20,
                        chunk_size=1 << 20,
                        mode="stored",
                        map_version=0,
                        key_scope=vid,
                        created=NOW,
                    )
                )
            conn.execute(
                sa.insert(CHAP).values(
                    volume_id=ids["chapped"],
                    initiator="iqn.2024-01.test:h",
                    secret=b"sealed",
                    updated=NOW,
                )
            )
        upgrade(empty_db_url)

        def flags() -> dict[str, tuple[bool, bool]]:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text("SELECT name, iscsi_open, iscsi_legacy_open FROM volumes")
                )
                return {name: (bool(o), bool(legacy)) for name, o, legacy in rows}

        assert flags() == {
            "open": (False, True),
            "chapped": (False, False),
            "unbound": (False, False),
        }
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM initiator_acls")).scalar() == 0
        # Down and up again: the same decision from the same rows.
        migrate(empty_db_url, "0006", down=True)
        with engine.connect() as conn:
            assert "initiator_acls" not in sa.inspect(conn).get_table_names()
            columns = {c["name"] for c in sa.inspect(conn).get_columns("volumes")}
            assert "iscsi_legacy_open" not in columns
        migrate(empty_db_url, head_revision())
        assert flags()["open"] == (False, True) and flags()["chapped"] == (False, False)
    finally:
        engine.dispose()
