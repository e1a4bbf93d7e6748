"""The gateway's TUF client (sgw.gateway.updates.trust) against the provider's release
repository (sgw.provider.releases) served over HTTP: a published release is fetched and
verified; every attack TUF guards against ends in UpdateRefused with its reason and
nothing handed out."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from sgw.common.releases import bundle_name, target_path
from sgw.gateway.link.release_root import install_root
from sgw.gateway.updates.trust import ReleaseTrust, UpdateRefused
from sgw.provider.releases.repository import METADATA_PREFIX, TARGETS_PREFIX, ReleaseRepository
from tests.fixtures.releases import ServedRepository, make_bundle, open_repository, served


@pytest.fixture
def repo(tmp_path: Path):
    with served(tmp_path / "provider") as r:
        yield r


@pytest.fixture
def http():
    with httpx.Client(timeout=10) as client:
        yield client


def _trust(tmp_path: Path, repo: ServedRepository, http: httpx.Client) -> ReleaseTrust:
    metadata = tmp_path / "gateway" / "updates" / "metadata"
    if not (metadata / "root.json").exists():
        install_root(metadata, (repo.keys_dir / "root.json").read_bytes())
    return ReleaseTrust(metadata, tmp_path / "gateway" / "cache", repo.url, http)


def _publish(tmp_path: Path, repo: ServedRepository, version: str, **kw: str):
    bundle = make_bundle(tmp_path, version, payload=f"release {version}\n".encode())
    with open(bundle, "rb") as f:
        return repo.repository.publish(f, kw.get("channel", "stable"), kw.get("severity", "normal"))


def _refused(trust: ReleaseTrust, version: str, reason: str) -> UpdateRefused:
    with pytest.raises(UpdateRefused) as caught:
        trust.fetch(version)
    assert caught.value.reason == reason, caught.value
    assert not (trust.cache_dir / bundle_name(version)).exists()
    assert not (trust.cache_dir / (bundle_name(version) + ".partial")).exists()
    return caught.value


def test_a_published_release_is_fetched_and_verified(tmp_path, repo, http):
    published = _publish(tmp_path, repo, "1.2.0", severity="emergency")
    release = _trust(tmp_path, repo, http).fetch("1.2.0")
    assert release.version == "1.2.0"
    assert release.severity == "emergency"
    assert release.manifest == published.manifest
    data = release.bundle.read_bytes()
    assert hashlib.sha256(data).hexdigest() == published.sha256
    assert data == (tmp_path / bundle_name("1.2.0")).read_bytes()


def test_a_tampered_bundle_is_refused(tmp_path, repo, http):
    info = _publish(tmp_path, repo, "1.2.0")
    dirname, _, basename = target_path("1.2.0").rpartition("/")
    key = f"{TARGETS_PREFIX}{dirname}/{info.sha256}.{basename}"
    data = bytearray(repo.store.get(key))
    data[len(data) // 2] ^= 0x01  # same length, one bit different
    repo.store.put(key, bytes(data))
    error = _refused(_trust(tmp_path, repo, http), "1.2.0", "tampered")
    assert "1.2.0" in str(error)


def test_rolled_back_metadata_is_refused_after_a_restart(tmp_path, repo, http):
    _publish(tmp_path, repo, "1.0.0")
    old_timestamp = repo.store.get(METADATA_PREFIX + "timestamp.json")
    _publish(tmp_path, repo, "1.1.0")
    assert _trust(tmp_path, repo, http).fetch("1.1.0").version == "1.1.0"
    # The provider (or someone in between) serves the older state again: a new client
    # over the same metadata directory (a restarted agent) still knows the newer one.
    repo.store.put(METADATA_PREFIX + "timestamp.json", old_timestamp)
    _refused(_trust(tmp_path, repo, http), "1.0.0", "rollback")


def test_an_expired_timestamp_is_refused(tmp_path, repo, http):
    repo.clock.now -= timedelta(days=3)  # signed three days ago: its day is over
    _publish(tmp_path, repo, "1.0.0")
    error = _refused(_trust(tmp_path, repo, http), "1.0.0", "expired")
    assert "expired" in str(error)


def test_the_refresh_task_re_signs_an_expiring_timestamp(tmp_path, repo, http):
    repo.clock.now -= timedelta(hours=20)
    _publish(tmp_path, repo, "1.0.0")
    repo.clock.now += timedelta(hours=20)
    assert repo.repository.refresh() == ["timestamp"]
    assert repo.repository.refresh() == []  # fresh now: nothing to do
    assert _trust(tmp_path, repo, http).fetch("1.0.0").version == "1.0.0"


def test_mix_and_match_snapshot_and_targets_is_refused(tmp_path, repo, http):
    _publish(tmp_path, repo, "1.0.0")
    first_targets = repo.store.get(METADATA_PREFIX + f"{_targets_version(repo)}.targets.json")
    _publish(tmp_path, repo, "1.1.0")
    # The newest snapshot names targets version N; serve the first publish's targets
    # (validly signed, from another state) under that name.
    newest = _targets_version(repo)
    repo.store.put(METADATA_PREFIX + f"{newest}.targets.json", first_targets)
    _refused(_trust(tmp_path, repo, http), "1.1.0", "tampered")


def _targets_version(repo: ServedRepository) -> int:
    timestamp = json.loads(repo.store.get(METADATA_PREFIX + "timestamp.json"))
    snap_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
    snapshot = json.loads(repo.store.get(METADATA_PREFIX + f"{snap_version}.snapshot.json"))
    return int(snapshot["signed"]["meta"]["targets.json"]["version"])


def test_a_repository_signed_by_other_keys_is_refused(tmp_path, http):
    with served(tmp_path / "ours") as ours:
        trusted = (ours.keys_dir / "root.json").read_bytes()
    with served(tmp_path / "theirs") as theirs:
        _publish(tmp_path, theirs, "6.6.6")
        metadata = tmp_path / "gateway" / "updates" / "metadata"
        install_root(metadata, trusted)
        trust = ReleaseTrust(metadata, tmp_path / "gateway" / "cache", theirs.url, http)
        _refused(trust, "6.6.6", "untrusted")


def test_a_revoked_release_is_refused_and_others_still_served(tmp_path, repo, http):
    _publish(tmp_path, repo, "1.0.0")
    _publish(tmp_path, repo, "1.1.0")
    trust = _trust(tmp_path, repo, http)
    assert trust.fetch("1.1.0").bundle.exists()  # verified and cached before the revocation
    revoked = repo.repository.revoke("1.1.0")
    assert revoked.revoked is not None
    _refused(trust, "1.1.0", "revoked")  # and no longer in the cache
    assert trust.fetch("1.0.0").version == "1.0.0"
    assert [r.version for r in repo.repository.list_releases()] == ["1.0.0", "1.1.0"]


def test_an_unpublished_version_is_not_found(tmp_path, repo, http):
    _publish(tmp_path, repo, "1.0.0")
    _refused(_trust(tmp_path, repo, http), "9.9.9", "not-found")


def test_an_unreachable_provider_is_reported_as_such(tmp_path, repo, http):
    trust = _trust(tmp_path, repo, http)
    trust.base_url = "http://127.0.0.1:9"  # discard: nothing listens
    _refused(trust, "1.0.0", "unreachable")


def test_a_release_that_cannot_be_swapped_to_is_incompatible(tmp_path, repo, http):
    _publish(tmp_path, repo, "1.0.0")  # swappable from >=0.1.0
    with pytest.raises(UpdateRefused) as caught:
        _trust(tmp_path, repo, http).fetch("1.0.0", running="0.0.9")
    assert caught.value.reason == "incompatible"


def test_without_a_trusted_root_nothing_is_fetched(tmp_path, repo, http):
    _publish(tmp_path, repo, "1.0.0")
    trust = ReleaseTrust(tmp_path / "empty", tmp_path / "cache", repo.url, http)
    _refused(trust, "1.0.0", "untrusted")


def test_processes_refreshing_at_once_sign_once(tmp_path, repo, http):
    """Two repositories over the same store and lock file (two provider processes) re-sign
    an expiring timestamp once between them; an expiring targets re-signs all three."""
    repo.clock.now -= timedelta(hours=20)
    _publish(tmp_path, repo, "1.0.0")
    repo.clock.now += timedelta(hours=20)
    other = ReleaseRepository(
        repo.store,
        repo.repository.sessions,
        repo.repository.keys,
        repo.repository.lock_path,
        clock=repo.clock,
    )
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: r.refresh(), [repo.repository, other] * 4))
    assert sorted(map(tuple, results)) == [()] * 7 + [("timestamp",)]
    repo.clock.now += timedelta(days=16)  # targets (30 days) past half its life
    assert other.refresh() == ["targets", "snapshot", "timestamp"]
    assert _trust(tmp_path, repo, http).fetch("1.0.0").version == "1.0.0"


def test_processes_on_two_machines_sign_once(tmp_path, postgres_url):
    """Two repositories sharing a PostgreSQL database and a store but not a lock file
    (providers on two machines) re-sign an expiring timestamp once between them."""
    with open_repository(tmp_path / "one", db_url=postgres_url) as (first, clock):
        clock.now -= timedelta(hours=20)
        with open(make_bundle(tmp_path, "1.0.0"), "rb") as f:
            first.publish(f, "stable", "normal")
        clock.now += timedelta(hours=20)
        (tmp_path / "two").mkdir()
        second = ReleaseRepository(
            first.store, first.sessions, first.keys, str(tmp_path / "two" / "lock"), clock
        )
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda r: r.refresh(), [first, second] * 4))
    assert sorted(map(tuple, results)) == [()] * 7 + [("timestamp",)]
