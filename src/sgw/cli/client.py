"""A typed client of the provider's management API (docs/provider.md): one method per call.

It is what the ``sgw`` command's admin groups use, and what tests (and a web console's
tests) can drive in process through an ``httpx`` transport. It never prints: a refused or
failed call raises ``ApiError`` with the HTTP status, the provider's error code and its
message; what that means to a user (exit status, wording) is the caller's business.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal, TypedDict, cast
from urllib.parse import quote

import httpx

from sgw.common.errors import SgwError

LOG = logging.getLogger(__name__)

# Per request (seconds). A call that asks the provider to wait for an outcome (``wait``)
# must ask for less than this, or the client gives up first (the CLI asks for 20 s at most).
DEFAULT_TIMEOUT_S = 30.0
# A release upload: the provider reads the whole bundle (hash, manifest) before it answers.
UPLOAD_TIMEOUT_S = 600.0

CommandStatus = Literal["queued", "delivered", "acknowledged", "succeeded", "failed", "expired"]


class ApiError(SgwError):
    """The provider refused or failed a call.

    ``status_code``: the HTTP status (None when no answer came); ``error``: the provider's
    error code from the body (``""`` when it sent none); ``message``: its message, else the
    body's text.
    """

    def __init__(self, status_code: int | None, message: str, error: str = "") -> None:
        super().__init__(status_code, message, error)
        self.status_code = status_code
        self.message = message
        self.error = error

    def __str__(self) -> str:
        return f"{self.status_code}: {self.message}"


class ProviderUnreachableError(ApiError):
    """No answer came: the connection failed, broke or timed out (no status code)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)

    def __str__(self) -> str:
        return f"cannot reach the provider: {self.message}"


class Command(TypedDict):
    """A command sent to a gateway through the control channel, and its outcome."""

    id: str
    gateway_id: str
    type: str
    args: dict[str, Any]
    idempotency_key: str
    status: CommandStatus
    created: str
    expires: str
    delivered: str | None
    deliveries: int
    acknowledged: str | None
    completed: str | None
    # Set once the command succeeded (what the gateway answered).
    result: dict[str, Any] | None
    error: str | None


class Connection(TypedDict):
    """Whether a gateway is online, and which control server holds its long-poll."""

    online: bool
    server_id: str | None
    server_url: str | None
    since: str | None
    heartbeat: str | None


class NewAccount(TypedDict):
    """A new account and its first token (the token's secret is shown only now)."""

    account: dict[str, Any]
    token: dict[str, Any]


class ApiClient:
    """The management API at ``base_url``, acting with an API token.

    ``verify``: TLS verification as ``httpx`` takes it (an ``ssl.SSLContext`` pinning the
    provider's CA, or True for the system's CAs); ``transport``: another transport, e.g.
    ``httpx.MockTransport`` or an ASGI app's, for tests. Without a token the calls are
    anonymous (the provider answers 401).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.BaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url,
            headers=headers,
            verify=verify,
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Accounts and tokens

    def get_account(self) -> dict[str, Any]:
        """The account the token acts for."""
        return cast(dict[str, Any], self._call("GET", "/v1/account"))

    def list_accounts(self) -> list[dict[str, Any]]:
        """Every account (operator only)."""
        return cast(list[dict[str, Any]], self._call("GET", "/v1/accounts"))

    def create_account(self, name: str) -> NewAccount:
        """A new account and its first token (operator only)."""
        return cast(NewAccount, self._call("POST", "/v1/accounts", {"name": name}))

    def set_quotas(self, account_id: str, quotas: dict[str, int | float | None]) -> dict[str, Any]:
        """Sets the account's quotas named in ``quotas`` (None lifts one; operator only)."""
        path = f"/v1/accounts/{account_id}/quotas"
        return cast(dict[str, Any], self._call("PATCH", path, quotas))

    def list_tokens(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/v1/tokens"))

    def create_token(self, name: str) -> dict[str, Any]:
        """A new token of the account; its secret (``token``) is shown only now."""
        return cast(dict[str, Any], self._call("POST", "/v1/tokens", {"name": name}))

    def revoke_token(self, token_id: str) -> None:
        self._call("DELETE", f"/v1/tokens/{token_id}")

    # Gateways

    def activate(
        self,
        activation_key: str,
        name: str,
        timezone: str | None,
        code: str | None = None,
        *,
        unconfirmed: bool = False,
    ) -> dict[str, Any]:
        """Activates the gateway that handed out ``activation_key`` into the account;
        ``code``: the confirmation code on the gateway's console."""
        body: dict[str, Any] = {
            "activation_key": activation_key,
            "name": name,
            "timezone": timezone,
            "confirmation_code": code,
        }
        if unconfirmed:
            body["unconfirmed"] = True
        return cast(dict[str, Any], self._call("POST", "/v1/activations", body))

    def list_gateways(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/v1/gateways"))

    def get_gateway(self, gateway_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("GET", f"/v1/gateways/{gateway_id}"))

    def get_connection(self, gateway_id: str) -> Connection:
        return cast(Connection, self._call("GET", f"/v1/gateways/{gateway_id}/connection"))

    def rename_gateway(self, gateway_id: str, name: str) -> dict[str, Any]:
        return self._patch_gateway(gateway_id, {"name": name})

    def set_gateway_timezone(self, gateway_id: str, timezone: str) -> dict[str, Any]:
        """Sets the IANA time zone the gateway's snapshot schedules run in."""
        return self._patch_gateway(gateway_id, {"timezone": timezone})

    def deactivate_gateway(self, gateway_id: str) -> dict[str, Any]:
        """Revokes the gateway's credentials for good."""
        path = f"/v1/gateways/{gateway_id}/deactivate"
        return cast(dict[str, Any], self._call("POST", path))

    def _patch_gateway(self, gateway_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("PATCH", f"/v1/gateways/{gateway_id}", body))

    # Commands to gateways (the control channel)

    def send_command(
        self,
        gateway_id: str,
        type_: str,
        args: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        ttl: float | None = None,
        wait: float | None = None,
    ) -> Command:
        """Sends the gateway a command. ``ttl``: seconds it has to take it (it never starts
        later); ``wait``: seconds the provider may wait for the outcome before answering.
        A gateway that must be online and is not: ``ApiError`` 409 ``gateway_offline``."""
        body: dict[str, Any] = {"type": type_, "args": args, "idempotency_key": idempotency_key}
        if ttl is not None:
            body["ttl"] = ttl
        path = f"/v1/gateways/{gateway_id}/commands"
        return cast(Command, self._call("POST", path, body, wait=wait))

    def get_command(
        self, gateway_id: str, command_id: str, *, wait: float | None = None
    ) -> Command:
        """The command and its outcome; with ``wait``, once it finished or after that long."""
        path = f"/v1/gateways/{gateway_id}/commands/{command_id}"
        return cast(Command, self._call("GET", path, wait=wait))

    def cancel_command(self, gateway_id: str, command_id: str) -> Command:
        """Cancels a command no gateway took yet (it becomes ``expired``); one already
        delivered comes back unchanged."""
        path = f"/v1/gateways/{gateway_id}/commands/{command_id}"
        return cast(Command, self._call("DELETE", path))

    def list_commands(self, gateway_id: str, limit: int | None = None) -> list[Command]:
        """The gateway's newest commands, newest first."""
        path = f"/v1/gateways/{gateway_id}/commands"
        return cast(list[Command], self._call("GET", path, limit=limit))

    # Volumes

    def list_volumes(self, gateway_id: str | None = None) -> list[dict[str, Any]]:
        """The account's volumes, or one gateway's."""
        return cast(list[dict[str, Any]], self._call("GET", "/v1/volumes", gateway_id=gateway_id))

    def get_volume(self, volume_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("GET", f"/v1/volumes/{volume_id}"))

    def create_volume(
        self, name: str, size: int, mode: str, *, from_snapshot_id: str | None = None
    ) -> dict[str, Any]:
        """A volume held by the provider only (the block API's); a volume on a gateway is
        made by the gateway (a ``create_volume`` command). Empty fields are not sent."""
        fields = {"name": name, "size": size, "mode": mode, "from_snapshot_id": from_snapshot_id}
        body = {k: v for k, v in fields.items() if v}
        return cast(dict[str, Any], self._call("POST", "/v1/volumes", body))

    def delete_volume(self, volume_id: str) -> None:
        """Deletes a volume held by the provider only (its snapshots stay)."""
        self._call("DELETE", f"/v1/volumes/{volume_id}")

    def list_chap(self, volume_id: str) -> list[dict[str, Any]]:
        """The initiators with CHAP credentials for the volume (no secrets)."""
        return cast(list[dict[str, Any]], self._call("GET", f"/v1/volumes/{volume_id}/chap"))

    def set_chap(
        self, volume_id: str, initiator: str, secret: str, target_secret: str | None = None
    ) -> dict[str, Any]:
        """Sets an initiator's CHAP secret (and the target's, for mutual CHAP)."""
        body = {"initiator": initiator, "secret": secret, "target_secret": target_secret}
        return cast(dict[str, Any], self._call("PUT", f"/v1/volumes/{volume_id}/chap", body))

    def delete_chap(self, volume_id: str, initiator: str) -> None:
        self._call("DELETE", f"/v1/volumes/{volume_id}/chap/{initiator}")

    def get_access(self, volume_id: str) -> dict[str, Any]:
        """Who may log in to the volume over iSCSI: its access label, the open and legacy
        open flags, the initiators with CHAP and without (no secrets)."""
        return cast(dict[str, Any], self._call("GET", f"/v1/volumes/{volume_id}/access"))

    def list_acl(self, volume_id: str) -> list[dict[str, Any]]:
        """The initiators allowed on the volume without CHAP."""
        return cast(list[dict[str, Any]], self._call("GET", f"/v1/volumes/{volume_id}/acl"))

    def add_acl(self, volume_id: str, initiator: str) -> dict[str, Any]:
        """Allows an initiator on the volume by its name alone, without CHAP."""
        body = {"initiator": initiator}
        return cast(dict[str, Any], self._call("PUT", f"/v1/volumes/{volume_id}/acl", body))

    def delete_acl(self, volume_id: str, initiator: str) -> None:
        self._call("DELETE", f"/v1/volumes/{volume_id}/acl/{initiator}")

    def set_open(self, volume_id: str, open_: bool) -> dict[str, Any]:
        """Opens the volume to any initiator without authentication (labs), or closes it
        to all but its rules' initiators; returns its access."""
        body = {"open": open_}
        return cast(dict[str, Any], self._call("PUT", f"/v1/volumes/{volume_id}/open", body))

    def get_snapshot_schedule(self, volume_id: str) -> dict[str, Any]:
        """The volume's snapshot schedule; ``ApiError`` 404 if it has none."""
        path = f"/v1/volumes/{volume_id}/snapshot-schedule"
        return cast(dict[str, Any], self._call("GET", path))

    def set_snapshot_schedule(
        self,
        volume_id: str,
        start_hour: int,
        recurrence_hours: int,
        *,
        description: str | None = None,
        retain: int | None = None,
    ) -> dict[str, Any]:
        """Snapshots the volume every ``recurrence_hours`` from ``start_hour`` (gateway
        time), keeping the newest ``retain`` scheduled snapshots (None: all)."""
        body = {
            "start_hour": start_hour,
            "recurrence_hours": recurrence_hours,
            "description": description,
            "retain": retain,
        }
        path = f"/v1/volumes/{volume_id}/snapshot-schedule"
        return cast(dict[str, Any], self._call("PUT", path, body))

    def delete_snapshot_schedule(self, volume_id: str) -> None:
        self._call("DELETE", f"/v1/volumes/{volume_id}/snapshot-schedule")

    # Snapshots

    def list_snapshots(self, volume_id: str | None = None) -> list[dict[str, Any]]:
        """The account's snapshots, or one volume's, oldest first."""
        return cast(list[dict[str, Any]], self._call("GET", "/v1/snapshots", volume_id=volume_id))

    def get_snapshot(self, snapshot_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("GET", f"/v1/snapshots/{snapshot_id}"))

    def snapshot_volume(self, volume_id: str, description: str | None = None) -> dict[str, Any]:
        """A completed snapshot of the map the provider holds (a volume on no gateway)."""
        body = {"description": description} if description else None
        path = f"/v1/volumes/{volume_id}/snapshots"
        return cast(dict[str, Any], self._call("POST", path, body))

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._call("DELETE", f"/v1/snapshots/{snapshot_id}")

    # Updates (docs/updates.md)

    def get_update_policy(self, gateway_id: str | None = None) -> dict[str, Any]:
        """The gateway's update policy in effect, or the account's default (None)."""
        path = f"/v1/gateways/{gateway_id}/update-policy" if gateway_id else "/v1/updates/policy"
        return cast(dict[str, Any], self._call("GET", path))

    def set_update_policy(
        self,
        gateway_id: str | None,
        *,
        channel: str | None = None,
        window: dict[str, Any] | None = None,
        automatic: str | None = None,
    ) -> dict[str, Any]:
        """Sets the given fields of the gateway's policy, or of the account's default
        (``gateway_id`` None); the others keep the values in effect."""
        body = {
            k: v
            for k, v in (("channel", channel), ("window", window), ("automatic", automatic))
            if v is not None
        }
        path = f"/v1/gateways/{gateway_id}/update-policy" if gateway_id else "/v1/updates/policy"
        return cast(dict[str, Any], self._call("PUT", path, body))

    def clear_update_policy(self, gateway_id: str) -> dict[str, Any]:
        """Drops the gateway's own policy (the account's default applies again)."""
        path = f"/v1/gateways/{gateway_id}/update-policy"
        return cast(dict[str, Any], self._call("DELETE", path))

    def update_now(self, gateway_id: str) -> dict[str, Any]:
        """Swaps the gateway to its planned release at once: ``{version, command}``."""
        path = f"/v1/gateways/{gateway_id}/updates/now"
        return cast(dict[str, Any], self._call("POST", path))

    def update_status(self, gateway_id: str | None = None) -> dict[str, Any]:
        """``{gateways: [...], rollouts: [...]}``."""
        return cast(dict[str, Any], self._call("GET", "/v1/updates/status", gateway_id=gateway_id))

    def start_rollout(
        self,
        version: str,
        *,
        share: int | None = None,
        soak_minutes: float | None = None,
        max_failures: int | None = None,
        heartbeat_timeout_minutes: float | None = None,
    ) -> dict[str, Any]:
        """Starts a rollout of a published release (the operator's call)."""
        body: dict[str, Any] = {"version": version}
        for key, value in (
            ("share", share),
            ("soak_minutes", soak_minutes),
            ("max_failures", max_failures),
            ("heartbeat_timeout_minutes", heartbeat_timeout_minutes),
        ):
            if value is not None:
                body[key] = value
        return cast(dict[str, Any], self._call("POST", "/v1/rollouts", body))

    def list_rollouts(self, limit: int | None = None) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/v1/rollouts", limit=limit))

    def halt_rollout(self, version: str | None, reason: str | None = None) -> dict[str, Any]:
        """Halts the running rollout (of ``version``)."""
        body: dict[str, Any] = {"version": version}
        if reason:
            body["reason"] = reason
        return cast(dict[str, Any], self._call("POST", "/v1/rollouts/halt", body))

    def resume_rollout(self, version: str | None) -> dict[str, Any]:
        """Runs the halted rollout (of ``version``) again."""
        body = {"version": version}
        return cast(dict[str, Any], self._call("POST", "/v1/rollouts/resume", body))

    # The call

    # Releases (docs/updates.md)

    def publish_release(
        self, bundle: str, channel: str, severity: str = "normal"
    ) -> dict[str, Any]:
        """Publishes the bundle file (streamed) as a signed release (operator only)."""

        def chunks() -> Iterator[bytes]:
            with open(bundle, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        try:
            resp = self._http.post(
                "/v1/releases",
                content=chunks(),
                params={"channel": channel, "severity": severity},
                headers={
                    "content-type": "application/octet-stream",
                    "content-length": str(os.path.getsize(bundle)),
                },
                timeout=UPLOAD_TIMEOUT_S,
            )
        except httpx.HTTPError as e:
            raise ProviderUnreachableError(str(e)) from e
        return cast(dict[str, Any], self._answer("POST", "/v1/releases", resp))

    def list_releases(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/v1/releases"))

    def revoke_release(self, version: str) -> dict[str, Any]:
        """Removes the release from the signed targets (operator only)."""
        return cast(
            dict[str, Any], self._call("POST", f"/v1/releases/{quote(version, safe='')}/revoke")
        )

    # Health

    def gateway_health(self, gateway_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("GET", f"/v1/gateways/{gateway_id}/health"))

    def fleet_health(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/v1/health/fleet"))

    def _call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        """Makes the call; its JSON answer (None for an empty one). Query parameters that
        are None are left out."""
        query = {k: v for k, v in params.items() if v is not None}
        try:
            resp = self._http.request(method, path, json=body, params=query)
        except httpx.HTTPError as e:
            raise ProviderUnreachableError(str(e)) from e
        return self._answer(method, path, resp)

    @staticmethod
    def _answer(method: str, path: str, resp: httpx.Response) -> Any:
        """A response's JSON answer (None for an empty one), or ApiError."""
        LOG.debug("%s %s: %d", method, path, resp.status_code)
        if resp.status_code < 300:
            return None if resp.status_code == 204 or not resp.content else resp.json()
        error = ""
        try:
            doc = resp.json()
            message = doc.get("message") or resp.text
            error = str(doc.get("error") or "")
        except (ValueError, AttributeError):
            message = resp.text
        raise ApiError(resp.status_code, str(message), error)
