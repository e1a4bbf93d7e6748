"""``sgw provider migrate-object-names``: renames what a store holds under plaintext hashes.

Before keyed names (docs/adr/0009-object-names-and-customer-keys.md) a loose chunk object
was named by its chunk id (``chunks/<scope>/<id[:2]>/<id>``) and a pack's index listed
chunk ids (pack format 1): both tell a bucket reader which known content is stored. The
provider still reads, commits and collects such objects (``service``, ``gc``); this pass
removes them:

- a legacy chunk object is copied, bytes unchanged (its encryption does not depend on its
  name), to its keyed name, durably, and only then deleted;
- a format 1 pack is rewritten in place with a format 2 index: the same chunks at the same
  offsets, so a reader holding a location reads the same bytes before and after.

Safe to interrupt and to run again (each step is idempotent; a run finds only what is
left), and while the provider serves and collects: a reader that misses the keyed name
tries the legacy one and then the keyed one again; a copy of a chunk the collector deleted
meanwhile is an unreferenced object it deletes after the grace period; a pack whose row
the collector deleted meanwhile becomes an orphan it sweeps. It needs the master key (the
names are keyed) but not the database. Run it once every provider server runs a version
with keyed names: an older server still writes legacy names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sgw.common.errors import ChunkCorruptError, ObjectNotFoundError, ObjectStoreError
from sgw.provider.blockstore.keys import KeyRing
from sgw.provider.blockstore.objects import ObjectStore
from sgw.provider.blockstore.packs import (
    FORMAT_VERSION,
    LEGACY_FORMAT,
    PACKS_PREFIX,
    index_bytes,
    pack_format,
    read_index,
)
from sgw.provider.blockstore.service import CHUNKS_PREFIX, chunk_key, is_intact, parse_chunk_key

__all__ = ["MigrationReport", "migrate_object_names"]

LOG = logging.getLogger(__name__)


@dataclass
class MigrationReport:
    """What one pass found and did (counts of objects)."""

    dry_run: bool = False
    renamed: int = 0  # legacy chunk objects copied to their keyed name and deleted
    duplicates: int = 0  # legacy objects whose keyed copy was there already: deleted
    packs_rewritten: int = 0  # format 1 packs given a format 2 index
    packs_current: int = 0  # packs already in format 2
    vanished: int = 0  # deleted by someone else (garbage collection) while we looked
    damaged: int = 0  # legacy objects or packs that fail their checks: left, logged
    errors: int = 0  # store errors (logged); run again

    @property
    def left(self) -> int:
        """Objects still named by a plaintext hash after this pass."""
        return self.damaged + self.errors

    def summary(self) -> str:
        """One line for people and logs."""
        verb = "would rename" if self.dry_run else "renamed"
        return (
            f"migrate-object-names{' (dry run)' if self.dry_run else ''}: {verb} "
            f"{self.renamed} chunk objects ({self.duplicates} more already had their keyed "
            f"copy), {'would rewrite' if self.dry_run else 'rewrote'} {self.packs_rewritten} "
            f"pack indexes ({self.packs_current} already current), {self.vanished} vanished "
            f"meanwhile, {self.damaged} damaged left as they are, {self.errors} errors"
        )


def migrate_object_names(
    store: ObjectStore, keys: KeyRing, *, dry_run: bool = False
) -> MigrationReport:
    """One pass over ``store`` that leaves no object named by a chunk id (see the module's
    docstring); what it did. ``dry_run`` changes nothing and reports what a pass would do."""
    report = MigrationReport(dry_run=dry_run)
    for key in list(store.list(CHUNKS_PREFIX)):
        scope = parse_chunk_key(key)
        parts = key.split("/")
        if scope is None or len(parts) != 4:  # keyed already, or not a chunk object
            continue
        try:
            _rename(store, key, chunk_key(keys, scope, parts[3]), report)
        except ObjectStoreError as e:
            report.errors += 1
            LOG.warning("could not rename a chunk object: %s", e, extra={"key": key})
    for key in list(store.list(PACKS_PREFIX)):
        scope = key.split("/")[1] if key.count("/") == 2 else None
        if scope is None:
            continue
        try:
            _rewrite_index(store, keys, scope, key, report)
        except ObjectStoreError as e:
            report.errors += 1
            LOG.warning("could not rewrite a pack's index: %s", e, extra={"key": key})
    LOG.info(report.summary())
    return report


def _rename(store: ObjectStore, legacy: str, keyed: str, report: MigrationReport) -> None:
    """Copies the legacy object to its keyed name (unless an intact copy is there) and
    deletes it."""
    try:
        blob = store.get(legacy)
    except ObjectNotFoundError:
        report.vanished += 1
        return
    if not is_intact(blob):
        report.damaged += 1
        LOG.error("legacy chunk object is damaged; left under its old name", extra={"key": legacy})
        return
    there = store.exists(keyed) and not store.sync([keyed], check=is_intact)
    if report.dry_run:
        report.duplicates += there
        report.renamed += not there
        return
    if not there:
        store.put(keyed, blob, durable=True)
    store.delete(legacy)
    report.duplicates += there
    report.renamed += not there


def _rewrite_index(
    store: ObjectStore, keys: KeyRing, scope: str, key: str, report: MigrationReport
) -> None:
    """Gives a format 1 pack a format 2 index in place (same size, same chunk offsets)."""
    try:
        data = store.get(key)
    except ObjectNotFoundError:
        report.vanished += 1
        return
    try:
        version = pack_format(data)
        entries = read_index(data)
    except ChunkCorruptError as e:
        report.damaged += 1
        LOG.error("pack index is damaged; left as it is: %s", e, extra={"key": key})
        return
    if version == FORMAT_VERSION:
        report.packs_current += 1
        return
    assert version == LEGACY_FORMAT
    named = [(keys.object_name(scope, c), off, n) for c, off, n in entries]
    index = index_bytes(named)
    new = data[: len(data) - len(index)] + index
    if read_index(new) != named or len(new) != len(data):  # cannot happen: the same layout
        raise ChunkCorruptError(f"rewritten index of pack {key} does not fit it")
    report.packs_rewritten += 1
    if not report.dry_run:
        store.put(key, new, durable=True)
