"""Schemathesis against the provider's own OpenAPI document, on a real provider process
(initialised, HTTPS, an API token): generated calls of every operation must never get a
5xx. Bounded: a few examples per operation, so the whole run stays well under a minute."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import zstandard
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sgw.common.chunk_packs import MEDIA_TYPE, PackedChunk, encode_pack
from tests.fixtures.management import SecureProvider, activate

# Examples per operation: ~35 operations, each call a few milliseconds on loopback.
MAX_EXAMPLES = 25


def _pack(chunks: list[tuple[bytes, bool, bool]]) -> bytes:
    """A chunk pack of ``(data, zstd, right id)`` chunks."""
    return encode_pack(
        [
            PackedChunk(
                hashlib.sha256(data if right else data + b"!").hexdigest(),
                zstandard.compress(data) if zstd else data,
                zstd,
            )
            for data, zstd, right in chunks
        ]
    )


# Chunk pack bodies: well-formed packs (right or wrong ids, plaintext or zstd, maybe
# all-zero or repeated chunks) and arbitrary bytes, some starting like a pack.
schemathesis.openapi.media_type(
    MEDIA_TYPE,
    st.one_of(
        st.lists(
            st.tuples(st.binary(min_size=0, max_size=2048), st.booleans(), st.booleans()),
            min_size=1,
            max_size=6,
        ).map(_pack),
        st.binary(max_size=512),
        st.binary(max_size=512).map(lambda b: b"SGWK\x01\x00" + b),
    ),
)


@pytest.fixture(scope="module")
def fuzzed_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureProvider]:
    p = SecureProvider(Path(tmp_path_factory.mktemp("fuzz")) / "provider").start()
    try:
        # Something to find: a gateway, a volume bound to it, a snapshot.
        gw = activate(p, p.token, "fuzz-gw")
        vol = p.admin().post(
            "/v1/volumes",
            json={"name": "fuzz", "size": 1 << 20, "mode": "cached", "gateway_id": gw.gateway_id},
        )
        assert vol.status_code == 201
        p.admin().post(f"/v1/volumes/{vol.json()['id']}/snapshots")
        yield p
    finally:
        for c in p.clients:
            c.close()
        p.kill()


@pytest.fixture(scope="module")
def api_schema(fuzzed_provider: SecureProvider) -> Any:
    spec = httpx.get(f"{fuzzed_provider.url}/openapi.json", verify=fuzzed_provider.tls).json()
    return schemathesis.openapi.from_dict(spec)


def test_no_server_errors(api_schema: Any, fuzzed_provider: SecureProvider) -> None:
    p = fuzzed_provider
    failures: list[str] = []
    statuses: list[int] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 25

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def call(case: Any) -> None:
            response = case.call(
                base_url=p.url,
                headers={"Authorization": f"Bearer {p.token}"},
                verify=p.ca,
                timeout=30,
            )
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}"
                )

        call()
    assert not failures, "\n".join(failures[:20])
    # The run reached the routes, not only the validation layer.
    assert len(statuses) >= 3 * len(operations)
    assert {200, 201, 204} & set(statuses) and 404 in statuses
    assert "Traceback" not in p.log_text()
