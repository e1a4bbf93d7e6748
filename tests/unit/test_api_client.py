"""The management API client (sgw.cli.client) against an in-memory provider
(``httpx.MockTransport``): requests as the provider expects them, answers and errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sgw.cli.client import ApiClient, ApiError, ProviderUnreachableError

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """Answers every request with one canned response and keeps the requests."""

    def __init__(self, response: httpx.Response | None = None) -> None:
        self.response = response or httpx.Response(200, json={"ok": True})
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.response

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self) -> Any:
        return json.loads(self.last.content) if self.last.content else None


def client_for(handler: Handler, token: str | None = "sgw_test") -> ApiClient:
    return ApiClient("https://provider.test", token, transport=httpx.MockTransport(handler))


def test_every_call_carries_the_token() -> None:
    rec = Recorder()
    with client_for(rec) as client:
        client.get_account()
        client.list_volumes()
    assert [r.headers["authorization"] for r in rec.requests] == ["Bearer sgw_test"] * 2
    with client_for(rec, token=None) as anonymous:
        anonymous.get_account()
    assert "authorization" not in rec.last.headers


def test_requests_have_the_method_path_query_and_body_the_api_expects() -> None:
    rec = Recorder()
    client = client_for(rec)
    calls: list[tuple[Callable[[], object], str, str, Any]] = [
        (client.list_accounts, "GET", "/v1/accounts", None),
        (lambda: client.create_account("acme"), "POST", "/v1/accounts", {"name": "acme"}),
        (lambda: client.create_token("ci"), "POST", "/v1/tokens", {"name": "ci"}),
        (lambda: client.revoke_token("t1"), "DELETE", "/v1/tokens/t1", None),
        (
            lambda: client.activate("KEY", "edge", None, "ABCD-EFGH-JKMN"),
            "POST",
            "/v1/activations",
            {
                "activation_key": "KEY",
                "name": "edge",
                "timezone": None,
                "confirmation_code": "ABCD-EFGH-JKMN",
            },
        ),
        (
            lambda: client.activate("KEY", "edge", None, unconfirmed=True),
            "POST",
            "/v1/activations",
            {
                "activation_key": "KEY",
                "name": "edge",
                "timezone": None,
                "confirmation_code": None,
                "unconfirmed": True,
            },
        ),
        (lambda: client.rename_gateway("g1", "new"), "PATCH", "/v1/gateways/g1", {"name": "new"}),
        (
            lambda: client.set_gateway_timezone("g1", "Europe/Berlin"),
            "PATCH",
            "/v1/gateways/g1",
            {"timezone": "Europe/Berlin"},
        ),
        (lambda: client.deactivate_gateway("g1"), "POST", "/v1/gateways/g1/deactivate", None),
        (lambda: client.get_connection("g1"), "GET", "/v1/gateways/g1/connection", None),
        (lambda: client.list_commands("g1", 5), "GET", "/v1/gateways/g1/commands?limit=5", None),
        (lambda: client.list_volumes("g1"), "GET", "/v1/volumes?gateway_id=g1", None),
        (client.list_volumes, "GET", "/v1/volumes", None),
        (
            # Empty fields are not sent: the provider then names what is missing.
            lambda: client.create_volume("v", 1 << 20, "cached", from_snapshot_id=None),
            "POST",
            "/v1/volumes",
            {"name": "v", "size": 1 << 20, "mode": "cached"},
        ),
        (
            lambda: client.set_chap("v1", "iqn.a:b", "s" * 12),
            "PUT",
            "/v1/volumes/v1/chap",
            {"initiator": "iqn.a:b", "secret": "s" * 12, "target_secret": None},
        ),
        (
            lambda: client.delete_chap("v1", "iqn.a:b"),
            "DELETE",
            "/v1/volumes/v1/chap/iqn.a:b",
            None,
        ),
        (lambda: client.get_access("v1"), "GET", "/v1/volumes/v1/access", None),
        (lambda: client.list_acl("v1"), "GET", "/v1/volumes/v1/acl", None),
        (
            lambda: client.add_acl("v1", "iqn.2024-01.a:b"),
            "PUT",
            "/v1/volumes/v1/acl",
            {"initiator": "iqn.2024-01.a:b"},
        ),
        (
            lambda: client.delete_acl("v1", "iqn.2024-01.a:b"),
            "DELETE",
            "/v1/volumes/v1/acl/iqn.2024-01.a:b",
            None,
        ),
        (lambda: client.set_open("v1", False), "PUT", "/v1/volumes/v1/open", {"open": False}),
        (
            lambda: client.set_snapshot_schedule("v1", 3, 24, retain=7),
            "PUT",
            "/v1/volumes/v1/snapshot-schedule",
            {"start_hour": 3, "recurrence_hours": 24, "description": None, "retain": 7},
        ),
        (lambda: client.list_snapshots("v1"), "GET", "/v1/snapshots?volume_id=v1", None),
        (lambda: client.snapshot_volume("v1"), "POST", "/v1/volumes/v1/snapshots", None),
        (
            lambda: client.snapshot_volume("v1", "before upgrade"),
            "POST",
            "/v1/volumes/v1/snapshots",
            {"description": "before upgrade"},
        ),
        (lambda: client.delete_snapshot("s1"), "DELETE", "/v1/snapshots/s1", None),
    ]
    for call, method, target, body in calls:
        call()
        assert (rec.last.method, rec.last.url.raw_path.decode()) == (method, target)
        assert rec.body() == body, target
        if body is not None:
            assert rec.last.headers["content-type"] == "application/json"


def test_commands_are_sent_waited_for_and_cancelled() -> None:
    rec = Recorder(httpx.Response(202, json={"id": "c1", "status": "queued"}))
    client = client_for(rec)
    cmd = client.send_command("g1", "describe", {}, idempotency_key="k1", wait=20.0)
    assert cmd["id"] == "c1" and cmd["status"] == "queued"
    assert rec.last.url.raw_path == b"/v1/gateways/g1/commands?wait=20.0"
    assert rec.body() == {"type": "describe", "args": {}, "idempotency_key": "k1"}
    client.send_command("g1", "snapshot", {"volume_id": "v1"}, idempotency_key="k2", ttl=5.0)
    assert rec.last.url.raw_path == b"/v1/gateways/g1/commands"
    assert rec.body()["ttl"] == 5.0
    client.get_command("g1", "c1", wait=1.5)
    assert (rec.last.method, rec.last.url.raw_path) == (
        "GET",
        b"/v1/gateways/g1/commands/c1?wait=1.5",
    )
    client.cancel_command("g1", "c1")
    assert (rec.last.method, rec.last.url.raw_path) == ("DELETE", b"/v1/gateways/g1/commands/c1")


def test_answers_are_decoded_and_empty_ones_are_none() -> None:
    rows = [{"id": "v1", "name": "a"}, {"id": "v2", "name": "b"}]
    assert client_for(Recorder(httpx.Response(200, json=rows))).list_volumes() == rows
    assert client_for(Recorder(httpx.Response(204))).delete_volume("v1") is None
    assert client_for(Recorder(httpx.Response(200, content=b""))).revoke_token("t1") is None


@pytest.mark.parametrize(
    ("response", "status", "error", "message"),
    [
        (
            httpx.Response(404, json={"error": "not_found", "message": "no volume v9"}),
            404,
            "not_found",
            "no volume v9",
        ),
        (
            httpx.Response(401, json={"error": "unauthenticated", "message": "bad token"}),
            401,
            "unauthenticated",
            "bad token",
        ),
        (
            httpx.Response(409, json={"error": "gateway_offline", "message": "g1 is offline"}),
            409,
            "gateway_offline",
            "g1 is offline",
        ),
        # Not the provider's JSON error body: the body's text is the message.
        (httpx.Response(502, text="Bad Gateway"), 502, "", "Bad Gateway"),
        (httpx.Response(400, json=["x"]), 400, "", '["x"]'),
        (httpx.Response(422, json={"error": "invalid"}), 422, "invalid", '{"error":"invalid"}'),
    ],
)
def test_refusals_carry_status_code_error_code_and_message(
    response: httpx.Response, status: int, error: str, message: str
) -> None:
    with pytest.raises(ApiError) as raised:
        client_for(Recorder(response)).get_volume("v9")
    exc = raised.value
    assert not isinstance(exc, ProviderUnreachableError)
    assert (exc.status_code, exc.error, exc.message) == (status, error, message)
    assert str(exc) == f"{status}: {message}"


def test_no_answer_is_provider_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ProviderUnreachableError) as raised:
        client_for(refuse).list_gateways()
    assert raised.value.status_code is None
    assert str(raised.value) == "cannot reach the provider: connection refused"
