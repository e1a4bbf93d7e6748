"""The control channel's hot calls, served without the web framework.

A control server holding 10,000 gateways answers hundreds of their long-polls a second,
and every command is four requests (the admin's POST, the poll it wakes, the gateway's
reply, the next poll carrying the acknowledgement). Through the framework each costs
about 2 ms of CPU (middleware, routing, dependencies, a worker thread for the
credentials check) and each held poll some 30 KiB of request objects. ``LeanControl`` is
the ASGI application the server runs (behind the gate): it serves

- ``GET /v1/gateway/messages`` (a gateway's long-poll),
- ``POST /v1/gateway/messages/replies`` (its replies),
- ``POST /v1/gateways/{id}/commands`` (an admin's command),

on the event loop, behind ``sgw.provider.api.gate`` (which refused already what the
request's head gives away, and capped the body), authenticated exactly as
``AuthMiddleware`` would (signature checked inline, the gateway's key and a token's
principal from caches, the nonce written to the database in a group before anything
else happens; ``sgw.provider.api.auth``), and hands everything else to the framework. A
call it cannot serve plainly (another ``Authorization`` scheme or none, a query or body
the framework must refuse with its own 422, a principal not allowed here) is handed on
too, with its principal (the nonce is spent already) and its body, so the answers are the
framework's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sgw.common import signing
from sgw.common.errors import RateLimitedError, SgwError, UnauthenticatedError
from sgw.provider.api.auth import (
    SIGNED_HEADER,
    Authenticator,
    BodyTooLarge,
    Kind,
    Principal,
    message_signature,
    read_body,
    refuse,
    replay,
    reply,
    target,
    throttled,
)
from sgw.provider.api.control import (
    MAX_WAIT_S,
    POLL_PATH,
    REPLIES_PATH,
    CommandIn,
    CommandOut,
    RepliesIn,
    RepliesOut,
    ack_ids,
    disconnect_waiter,
    poll_out,
    send_command,
)
from sgw.provider.api.gate import body_cap
from sgw.provider.control.hub import ControlHub
from sgw.provider.control.planner import CommandPlanner

LOG = logging.getLogger(__name__)

_COMMANDS_PREFIX = "/v1/gateways/"
_WAIT = re.compile(r"[0-9]{1,5}(\.[0-9]{1,9})?")
_JSON = (b"content-type", b"application/json")
# The framework's default for ``wait`` of the poll (api.control.poll_messages).
_DEFAULT_POLL_WAIT = 20.0

Handler = Callable[[Scope, Receive, Send, Principal, bytes], Awaitable[bool]]
ErrorResponse = Callable[[SgwError, str], JSONResponse]


class LeanControl:
    """ASGI: the control channel's hot calls here, the rest to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        hub: ControlHub,
        planner: CommandPlanner,
        auth: Authenticator,
        errors: ErrorResponse,
    ) -> None:
        self.app = app
        self.hub = hub
        self.planner = planner
        self.auth = auth
        self.errors = errors
        self._empty: tuple[tuple[str, ...], bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            method: str = scope["method"]
            if method == "GET" and path == POLL_PATH:
                return await self._signed(scope, receive, send, self._poll)
            if method == "POST":
                if path == REPLIES_PATH:
                    return await self._signed(scope, receive, send, self._replies)
                if path.startswith(_COMMANDS_PREFIX) and path.endswith("/commands"):
                    return await self._admin(scope, receive, send)
        await self.app(scope, receive, send)

    # -- authentication --------------------------------------------------------------------

    async def _signed(self, scope: Scope, receive: Receive, send: Send, handler: Handler) -> None:
        """A gateway's call: authenticated here, served by ``handler`` (False: by the
        framework)."""
        header = _header(scope, b"authorization")
        signature = message_signature(scope) if header is None else None
        limit = self._plain_body(scope)
        legacy = header is not None and signing.is_signed(header)
        if not (legacy or signature) or limit is None:
            return await self.app(scope, receive, send)
        head = scope.get("state", {}).get(SIGNED_HEADER)
        try:
            body = await read_body(receive, limit)
            if signature is not None:
                if head is None:
                    head = await self.auth.check_message_head(*signature)
                principal = await self.auth.signed_message_async(head, scope, body)
            else:
                assert header is not None
                principal = await self.auth.signed_async(
                    header, scope["method"], target(scope), body, head=head
                )
        except UnauthenticatedError as exc:
            return await refuse(scope, send, exc)
        except BodyTooLarge as exc:  # more than Content-Length said: uvicorn prevents it
            return await reply(scope, send, 413, "payload_too_large", str(exc.detail))
        try:
            self.auth.throttle(principal)
        except RateLimitedError as exc:
            return await throttled(scope, send, exc)
        if principal.kind is Kind.GATEWAY and principal.gateway_id is not None:
            try:
                if await handler(scope, receive, send, principal, body):
                    return None
            except SgwError as exc:
                return await self.errors(exc, scope["path"])(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        return await self.app(scope, replay(body, receive), send)

    def _plain_body(self, scope: Scope) -> int | None:
        """The body's cap if its length is announced and within it (otherwise None: the
        framework answers, as for any call)."""
        limit = body_cap(scope["method"], scope["path"]).limit
        length = _header(scope, b"content-length")
        if length is None:
            plain = scope["method"] == "GET" and _header(scope, b"transfer-encoding") is None
            return limit if plain else None
        return limit if length.isdigit() and int(length) <= limit else None

    async def _admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/gateways/{id}/commands`` with an API token."""
        parts = scope["path"].split("/")
        header = _header(scope, b"authorization")
        query = _query(scope)
        content_type = _header(scope, b"content-type")
        limit = self._plain_body(scope)
        if (
            len(parts) != 5
            or not parts[3]
            or header is None
            or header[:7].lower() != "bearer "
            or query is None
            or not query.keys() <= {"wait"}
            or (content_type is not None and not content_type.startswith("application/json"))
            or limit is None
            or scope["method"] != "POST"
        ):
            return await self.app(scope, receive, send)
        wait = _wait(query.get("wait"), 0.0)
        try:
            principal = await self.auth.bearer_async(header[7:].strip())
        except UnauthenticatedError as exc:
            return await refuse(scope, send, exc)
        try:
            self.auth.throttle(principal)
        except RateLimitedError as exc:
            return await throttled(scope, send, exc)
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge as exc:  # more than Content-Length said: uvicorn prevents it
            return await reply(scope, send, 413, "payload_too_large", str(exc.detail))
        if principal.kind is Kind.TOKEN and wait is not None:
            try:
                command = CommandIn.model_validate_json(body)
            except ValidationError:
                command = None  # the framework's 422
            if command is not None:
                try:
                    info = await send_command(
                        self.hub, self.planner, principal.account_id, parts[3], command, wait=wait
                    )
                except SgwError as exc:
                    return await self.errors(exc, scope["path"])(scope, receive, send)
                return await _json(send, 202, CommandOut.of(info).model_dump_json().encode())
        scope.setdefault("state", {})["principal"] = principal
        return await self.app(scope, replay(body, receive), send)

    # -- the gateway's calls ---------------------------------------------------------------

    async def _poll(
        self, scope: Scope, receive: Receive, send: Send, principal: Principal, _body: bytes
    ) -> bool:
        query = _query(scope)
        if query is None or not query.keys() <= {"wait", "ack"}:
            return False
        wait = _wait(query.get("wait"), _DEFAULT_POLL_WAIT)
        if wait is None:
            return False
        acks = ack_ids(query.get("ack"))
        assert principal.gateway_id is not None
        messages = await self.hub.poll(
            principal.gateway_id, wait, acks, disconnect_waiter(receive), ends_after_answer=True
        )
        if messages:
            out = poll_out(self.hub, messages).model_dump_json().encode()
        else:
            out = self._empty_answer()
        await _json(send, 200, out)
        return True

    def _empty_answer(self) -> bytes:
        servers = tuple(self.hub.peer_urls)
        if self._empty is None or self._empty[0] != servers:
            body = poll_out(self.hub, []).model_dump_json().encode()
            self._empty = (servers, body)
        return self._empty[1]

    async def _replies(
        self, scope: Scope, _receive: Receive, send: Send, principal: Principal, body: bytes
    ) -> bool:
        content_type = _header(scope, b"content-type")
        if content_type is not None and not content_type.startswith("application/json"):
            return False
        query = _query(scope)
        if query is None or query:
            return False
        try:
            replies = RepliesIn.model_validate_json(body)
        except ValidationError:
            return False  # the framework's 422
        assert principal.gateway_id is not None
        accepted, refused = await self.hub.reply(
            principal.gateway_id,
            [(r.id, r.status == "succeeded", r.result, r.error) for r in replies.replies],
        )
        out = RepliesOut(accepted=accepted, refused=refused).model_dump_json().encode()
        await _json(send, 200, out)
        return True


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _query(scope: Scope) -> dict[str, str] | None:
    """The query's parameters; None if one is given twice."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    out = dict(pairs)
    return None if len(out) != len(pairs) else out


def _wait(value: str | None, default: float) -> float | None:
    """A ``wait`` within 0 to ``MAX_WAIT_S`` (None: the framework refuses it)."""
    if value is None:
        return default
    if not _WAIT.fullmatch(value):
        return None
    wait = float(value)
    return wait if wait <= MAX_WAIT_S else None


async def _json(send: Send, status: int, body: bytes) -> None:
    headers: list[tuple[bytes, bytes]] = [_JSON, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
