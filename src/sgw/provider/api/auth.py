"""Who a request acts for, and what it may touch (DESIGN.md section 4).

Two kinds of credentials (docs/adr/0003-gateway-authentication.md):

- ``Authorization: Bearer sgw_...``: an admin API token of an account (``sgw provider
  init`` makes the first). It may call everything of its account.
- A gateway's request signed with its identity key: HTTP Message Signatures
  (``Signature-Input``/``Signature``, RFC 9421, ``sgw.common.message_signatures``), or
  during the transition the old ``Authorization: SGW1-Ed25519 ...`` (``sgw.common.signing``;
  docs/adr/0010-http-message-signatures.md), within the clock-skew window, each nonce
  once. It acts for
  the gateway's account but touches only the volumes bound to the gateway and their
  snapshots (anything else is 404 to it), and no admin call (403). A not yet activated
  gateway signs with its bare public key and may only fetch its credentials.

``sgw.provider.api.gate`` runs first: it refuses what the request's head alone gives
away (no credentials, a malformed header, a ``pk:`` key outside the credentials call, a
body over its route's cap) before any body is read, and hands a signed request's parsed
header on, checked, in the request's state (``SIGNED_HEADER``). ``AuthMiddleware`` then checks
credentials before anything else runs (a bad one is a 401, logged); the control
channel's hot calls are checked by ``sgw.provider.api.lean`` with the same
``Authenticator`` on the event loop (``signed_async``, ``bearer_async``: the gateway's
key and a token's principal from caches, the nonce written in a group), as are all
other signed calls (their body hashed as it arrives; the digest is left in the
request's state as ``BODY_SHA256`` for routes that need it too); the route dependencies
(``CurrentAccount``, ``AdminPrincipal``) say what a route needs, so no route can forget
to ask. In development mode (``--insecure-dev``) a request without credentials acts for
the built-in account ``dev``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sgw.common import message_signatures, signing
from sgw.common.errors import (
    DatabaseError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    UnauthenticatedError,
)
from sgw.provider.auth.nonces import NonceLedger
from sgw.provider.auth.nonces import expiry as nonce_expiry
from sgw.provider.auth.rates import RateLimiter
from sgw.provider.db.models import Account, GatewayStatus
from sgw.provider.management.accounts import TOKEN_PREFIX, Accounts, token_hash
from sgw.provider.management.gateways import DEACTIVATED_POLL_S, GatewayKey, Gateways

LOG = logging.getLogger(__name__)

# Where a signed request's body digest (hex SHA-256, checked by the signature) is kept in
# the ASGI scope's state.
BODY_SHA256 = "body_sha256"
# Where the gate leaves a signed request's checked header (SignedHead) in the ASGI scope's
# state.
SIGNED_HEADER = "signed_header"
DEV_ACCOUNT_ID = "dev"
DEV_ACCOUNT_NAME = "dev"
NO_CREDENTIALS = (
    "no credentials: send an API token of the management plane (Authorization: Bearer "
    "TOKEN; `sgw provider init` prints the first) or a request signed by an activated "
    "gateway; on a development machine start the provider with `sgw provider serve "
    "--insecure-dev` to serve without them"
)


LEGACY_REFUSED = (
    f"the {signing.SCHEME} signature scheme is refused by this provider (it runs with "
    "--refuse-legacy-signatures): sign with HTTP Message Signatures (RFC 9421; sgw 0.2 "
    "gateways do; docs/block-api.md, Signing requests)"
)


class Kind(enum.StrEnum):
    TOKEN = "token"  # an admin API token
    GATEWAY = "gateway"  # an activated gateway's signed request
    CANDIDATE = "candidate"  # a gateway not activated (yet), signing with its public key
    DEV = "dev"  # no credentials, --insecure-dev


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for."""

    kind: Kind
    account_id: str = ""
    operator: bool = False
    token_id: str | None = None
    gateway_id: str | None = None
    public_key: bytes | None = None


DEV_PRINCIPAL = Principal(Kind.DEV, DEV_ACCOUNT_ID)


@dataclass(frozen=True, slots=True)
class SignedHead:
    """A signed request's header, checked without the body (``Authenticator.check_head``):
    its parts, who signs with its key id, and that key."""

    parsed: signing.SignedHeader | message_signatures.SignatureHead
    principal: Principal
    verifier: signing.Verifier


# An API token's principal, once checked, is trusted this long (seconds): a token revoked
# through another provider process is refused by this one within it (at once by the
# process that revoked it).
TOKEN_TRUST_S = 5.0
_TOKEN_CACHE_MAX = 10_000
# Key ids remembered as signing with the old scheme (one log line each); a fleet's worth.
_LEGACY_SEEN_MAX = 100_000
# What a signed request's key id may be: an activated gateway's id, or a public key.
_KEY_ID = re.compile(
    rf"{signing.GATEWAY_PREFIX}[!-~]+|{signing.PUBLIC_KEY_PREFIX}[0-9a-fA-F]{{64}}"
)


class Authenticator:
    """Turns credentials into a Principal, or UnauthenticatedError naming what is wrong."""

    def __init__(
        self,
        accounts: Accounts,
        gateways: Gateways,
        nonces: NonceLedger,
        clock: Callable[[], float] = time.time,
        *,
        accept_legacy: bool = True,
    ) -> None:
        """``accept_legacy``: accept the old ``SGW1-Ed25519`` scheme too (the transition,
        docs/adr/0010-http-message-signatures.md)."""
        self.accounts = accounts
        self.gateways = gateways
        self.nonces = nonces
        self.clock = clock
        self.accept_legacy = accept_legacy
        # Key ids seen signing with the old scheme (logged once each per process, so the
        # operator can tell when --refuse-legacy-signatures may be turned on).
        self._legacy_seen: set[str] = set()
        # sha256(token) -> (principal, monotonic time checked); cleared on a revocation
        self._tokens: dict[str, tuple[Principal, float]] = {}
        self._revocations = accounts.revocations
        self._task: asyncio.Task[None] | None = None
        self._flushing = False  # last-seen times being written in a worker thread
        # The request rate quota of each account, in memory (sgw.provider.auth.rates).
        self.rates = RateLimiter()

    # Lifecycle (the event loop's helpers)

    async def start(self) -> None:
        """Starts the background work of the cached checks: looking for gateways
        deactivated by other processes, writing last-seen times."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="auth-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.gateways.flush_seen, True)

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._housekeeping)
            except Exception as exc:  # the database may be away; keys then expire
                LOG.warning("authentication cache: cannot look for deactivations: %s", exc)
            await asyncio.sleep(DEACTIVATED_POLL_S)

    def _housekeeping(self) -> None:
        dropped = self.gateways.forget_deactivated()
        if dropped:
            LOG.info("deactivated gateways refused from now", extra={"gateways": dropped[:20]})
        self.gateways.flush_seen()
        self.rates.replace(self.accounts.rate_quotas())

    def throttle(self, principal: Principal) -> None:
        """Counts an authenticated request against its account's rate quota;
        RateLimitedError (429) past it. In memory: no database query per request."""
        if principal.account_id and principal.kind in (Kind.TOKEN, Kind.GATEWAY):
            self.rates.take(principal.account_id)

    # API tokens

    def bearer(self, token: str) -> Principal:
        cached = self._cached_token(token)
        if cached is not None:
            return cached
        found = self.accounts.authenticate(token) if token.startswith(TOKEN_PREFIX) else None
        if found is None:
            raise UnauthenticatedError(
                "the API token is not valid (revoked, mistyped or of another provider); "
                "create one with `sgw tokens create`"
            )
        record, account = found
        principal = Principal(Kind.TOKEN, account.id, account.operator, token_id=record.id)
        if len(self._tokens) >= _TOKEN_CACHE_MAX:
            self._tokens.clear()
        self._tokens[token_hash(token)] = (principal, time.monotonic())
        return principal

    async def bearer_async(self, token: str) -> Principal:
        """``bearer`` without a thread hop while the token is cached."""
        cached = self._cached_token(token)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.bearer, token)

    def _cached_token(self, token: str) -> Principal | None:
        if self.accounts.revocations != self._revocations:
            self._revocations = self.accounts.revocations
            self._tokens.clear()
            return None
        entry = self._tokens.get(token_hash(token))
        if entry is None or time.monotonic() - entry[1] >= TOKEN_TRUST_S:
            return None
        return entry[0]

    # Signed requests

    async def check_head(
        self, header: str, parsed: signing.SignedHeader | None = None
    ) -> SignedHead:
        """A signed request's header checked as far as it can be without the body: its
        form and timestamp (``parse``; ``parsed`` if the caller did that already), and its
        key id an active gateway's (the key from the cache, read in a thread otherwise) or
        a public key. UnauthenticatedError naming what is wrong otherwise."""
        if parsed is None:
            parsed = self.parse(header)
        return await self._head(parsed)

    async def check_message_head(self, signature_input: str, signature: str) -> SignedHead:
        """``check_head`` for an RFC 9421 signature (``sgw.common.message_signatures``):
        its form, ``created`` (and ``expires``) against the clock, its key id's key."""
        try:
            parsed = message_signatures.parse(signature_input, signature)
        except message_signatures.SignatureError as exc:
            raise UnauthenticatedError(f"{exc} (docs/block-api.md, Signing requests)") from None
        self._check_key_id_and_clock(parsed)
        if parsed.expires is not None and parsed.expires < self.clock():
            raise UnauthenticatedError(
                f"expired request: its signature expired at {parsed.expires}; sign it anew"
            )
        return await self._head(parsed)

    async def _head(
        self, parsed: signing.SignedHeader | message_signatures.SignatureHead
    ) -> SignedHead:
        key_id = parsed.key_id
        if key_id.startswith(signing.GATEWAY_PREFIX):
            key = self.gateways.signing_key(key_id[len(signing.GATEWAY_PREFIX) :])
            if key is not None:
                return SignedHead(parsed, _gateway_signer(key), key.verifier)
            principal, verifier = await asyncio.to_thread(self._signer, key_id)
        else:
            principal, verifier = self._signer(key_id)
        return SignedHead(parsed, principal, verifier)

    async def signed_async(
        self,
        header: str,
        method: str,
        target: bytes,
        body: bytes,
        *,
        digest: str | None = None,
        head: SignedHead | None = None,
    ) -> Principal:
        """A signed request's principal, on the event loop: the signature checked inline,
        the gateway's key from the cache (read in a thread otherwise), the nonce written
        in a group.
        ``digest``: the body's SHA-256 (hex) if the caller has it; else it is computed.
        ``head``: ``check_head(header)`` if the caller (the gate) did it already."""
        if head is None:
            head = await self.check_head(header)
        parsed = head.parsed
        assert isinstance(parsed, signing.SignedHeader)
        self._verify(parsed, head.verifier, method, target, digest or signing.body_digest(body))
        principal = await self._spend(head)
        if parsed.key_id not in self._legacy_seen and len(self._legacy_seen) < _LEGACY_SEEN_MAX:
            self._legacy_seen.add(parsed.key_id)
            LOG.info(
                "signed with the legacy %s scheme (a gateway before 0.2.0)",
                signing.SCHEME,
                extra={"key_id": parsed.key_id},
            )
        return principal

    async def signed_message_async(
        self, head: SignedHead, scope: Scope, body: bytes, body_sha256: bytes | None = None
    ) -> Principal:
        """An RFC 9421 signed request's principal (``head``: ``check_message_head``): the
        signature checked, the Content-Digest it covers compared with the body's SHA-256
        (``body_sha256`` if the caller hashed the body as it arrived), the nonce spent."""
        parsed = head.parsed
        assert isinstance(parsed, message_signatures.SignatureHead)
        try:
            covered = message_signatures.verify(
                head.verifier,
                parsed,
                method=scope["method"],
                authority=authority(scope),
                target=target(scope),
                headers=scope["headers"],
                scheme=scope.get("scheme", "http"),
            )
            if covered is None:
                if body:
                    raise message_signatures.SignatureError(
                        "the request has a body but its signature does not cover "
                        "content-digest: send Content-Digest (RFC 9530) and cover it"
                    )
            else:
                sha256 = body_sha256 or hashlib.sha256(body).digest()
                if message_signatures.digest_of(covered) != sha256:
                    raise message_signatures.SignatureError(
                        "Content-Digest does not match the body: the body was altered or "
                        "its digest computed over other bytes (send the SHA-256 of the "
                        "body as sent, before any transfer coding)"
                    )
        except message_signatures.SignatureError as exc:
            raise UnauthenticatedError(f"bad signature from {parsed.key_id}: {exc}") from None
        return await self._spend(head)

    async def _spend(self, head: SignedHead) -> Principal:
        """Spends a checked signature's nonce (refused if seen before) and notes the
        gateway as seen."""
        parsed, principal = head.parsed, head.principal
        key_id = parsed.key_id
        if not await self.nonces.first_use_async(
            key_id, parsed.nonce, nonce_expiry(parsed.timestamp)
        ):
            raise _replayed(parsed)
        if (
            principal.gateway_id is not None
            and self.gateways.touch(principal.gateway_id, flush=False)
            and not self._flushing
        ):
            self._flushing = True
            asyncio.get_running_loop().run_in_executor(None, self._flush_seen)
        return principal

    def _flush_seen(self) -> None:
        try:
            self.gateways.flush_seen()
        except Exception as exc:
            LOG.warning("cannot record when gateways were last seen: %s", exc)
        finally:
            self._flushing = False

    def parse(self, header: str) -> signing.SignedHeader:
        """The parts of a signed request's header, refused (UnauthenticatedError) if it is
        malformed, its key id neither ``gw:ID`` nor ``pk:`` and 64 hex digits, or its
        timestamp outside the clock-skew window: what can be told without the body; or
        refused outright when this provider no longer accepts the scheme."""
        if not self.accept_legacy:
            raise UnauthenticatedError(LEGACY_REFUSED)
        parsed = signing.parse_header(header)
        if parsed is None:
            raise UnauthenticatedError(
                f"malformed {signing.SCHEME} Authorization header: expected '{signing.SCHEME} "
                "key=KEY-ID, ts=UNIX-SECONDS, nonce=32-HEX-DIGITS, sig=86-BASE64URL-CHARACTERS' "
                "(docs/adr/0003-gateway-authentication.md)"
            )
        self._check_key_id_and_clock(parsed)
        return parsed

    def _check_key_id_and_clock(
        self, parsed: signing.SignedHeader | message_signatures.SignatureHead
    ) -> None:
        if not _KEY_ID.fullmatch(parsed.key_id):
            raise UnauthenticatedError(
                f"key id {parsed.key_id[:80]!r}: expected gw:GATEWAY-ID or pk: and the "
                "gateway's Ed25519 public key as 64 hex digits"
            )
        skew = parsed.timestamp - self.clock()
        if abs(skew) > signing.CLOCK_SKEW_S:
            raise UnauthenticatedError(
                f"stale request: its timestamp is {skew:+.0f} s from the provider's clock, "
                f"more than the {signing.CLOCK_SKEW_S} s allowed; set the gateway's clock (NTP)"
            )

    @staticmethod
    def _verify(
        parsed: signing.SignedHeader,
        verifier: signing.Verifier,
        method: str,
        target: bytes,
        digest: str,
    ) -> None:
        if not signing.verify(verifier, parsed, method, target, digest):
            raise UnauthenticatedError(
                f"bad signature from {parsed.key_id}: the request was altered or not signed "
                "with the gateway's identity key"
            )

    def _signer(self, key_id: str) -> tuple[Principal, signing.Verifier]:
        if key_id.startswith(signing.GATEWAY_PREFIX):
            gateway_id = key_id.removeprefix(signing.GATEWAY_PREFIX)
            key = self.gateways.signing_key(gateway_id)
            if key is None:
                key = self.gateways.load_signing_keys([gateway_id]).get(gateway_id)
            if key is None:
                raise UnauthenticatedError(f"unknown gateway {gateway_id}; activate it first")
            return _gateway_signer(key), key.verifier
        if key_id.startswith(signing.PUBLIC_KEY_PREFIX):
            hex_key = key_id.removeprefix(signing.PUBLIC_KEY_PREFIX)
            try:
                public_key = bytes.fromhex(hex_key)
            except ValueError:
                public_key = b""
            try:
                verifier = signing.Verifier(public_key)
            except ValueError:
                raise UnauthenticatedError(
                    f"key id {key_id[:80]!r}: not an Ed25519 public key"
                ) from None
            return Principal(Kind.CANDIDATE, public_key=public_key), verifier
        raise UnauthenticatedError(f"key id {key_id[:80]!r}: expected gw:ID or pk:HEX")


def _gateway_signer(key: GatewayKey) -> Principal:
    if key.status != GatewayStatus.ACTIVE.value:
        raise UnauthenticatedError(
            f"gateway {key.gateway_id} is {key.status}: its credentials are revoked"
        )
    return Principal(Kind.GATEWAY, key.account_id, gateway_id=key.gateway_id)


def _replayed(
    parsed: signing.SignedHeader | message_signatures.SignatureHead,
) -> UnauthenticatedError:
    return UnauthenticatedError(
        f"replayed request: nonce {parsed.nonce} of {parsed.key_id} was used before; "
        "sign every request with a new nonce"
    )


class AuthMiddleware:
    """Authenticates every request that carries credentials before the application sees
    it; stores the Principal in the request state. Bodies of signed requests (at most
    ``limit`` bytes, and at most their route's cap: ``sgw.provider.api.gate``) are read
    here, hashed, and handed on unchanged."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, limit: int) -> None:
        self.app = app
        self.auth = authenticator
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
        )
        # Checked already by the fast path (sgw.provider.api.lean), which hands a call it
        # does not serve itself on with its principal.
        if "principal" in scope.get("state", ()):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        signature = message_signature(scope) if header is None else None
        if header is None and signature is None:
            await self.app(scope, receive, send)
            return
        try:
            if signature is not None:
                head = scope.get("state", {}).get(SIGNED_HEADER)
                if head is None:
                    head = await self.auth.check_message_head(*signature)
                hasher = hashlib.sha256()
                try:
                    body = await read_body(receive, self.limit, hasher)
                except BodyTooLarge as exc:
                    await reply(scope, send, 413, "payload_too_large", str(exc.detail))
                    return
                receive = replay(body, receive)
                principal = await self.auth.signed_message_async(head, scope, body, hasher.digest())
                scope.setdefault("state", {})[BODY_SHA256] = hasher.hexdigest()
            elif header is not None and header[:7].lower() == "bearer ":
                principal = await run_in_threadpool(self.auth.bearer, header[7:].strip())
            elif header is not None and signing.is_signed(header):
                head = scope.get("state", {}).get(SIGNED_HEADER)
                if head is None:
                    head = await self.auth.check_head(header)  # before the body is read
                hasher = hashlib.sha256()
                try:
                    body = await read_body(receive, self.limit, hasher)
                except BodyTooLarge as exc:
                    await reply(scope, send, 413, "payload_too_large", str(exc.detail))
                    return
                receive = replay(body, receive)
                digest = hasher.hexdigest()
                principal = await self.auth.signed_async(
                    header, method, target(scope), body, digest=digest, head=head
                )
                scope.setdefault("state", {})[BODY_SHA256] = digest
            else:
                raise UnauthenticatedError(unknown_scheme(header or ""))
        except UnauthenticatedError as exc:
            await refuse(scope, send, exc)
            return
        try:
            self.auth.throttle(principal)
        except RateLimitedError as exc:
            await throttled(scope, send, exc)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def unknown_scheme(header: str) -> str:
    """What a refusal of an Authorization header of no known scheme says."""
    return (
        f"unknown Authorization scheme {header.split(' ', 1)[0][:40]!r}: use Bearer (API "
        "tokens) or, for gateways and applications that sign, HTTP Message Signatures "
        "(Signature-Input and Signature, no Authorization; docs/block-api.md)"
    )


def message_signature(scope: Scope) -> tuple[str, str] | None:
    """A request's RFC 9421 ``(Signature-Input, Signature)`` headers, if it has both
    (repeated lines joined, as RFC 9110 combines them)."""
    found: dict[bytes, list[str]] = {}
    for name, value in scope["headers"]:
        if name in (b"signature-input", b"signature"):
            found.setdefault(name, []).append(value.decode("latin-1"))
    if len(found) != 2:
        return None
    return ", ".join(found[b"signature-input"]), ", ".join(found[b"signature"])


def target(scope: Scope) -> bytes:
    """The request target as sent: path (percent-encoding kept) and query."""
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        path += b"?" + scope["query_string"]
    return path


def authority(scope: Scope) -> str:
    """The request's authority (its Host header) as RFC 9421's ``@authority``: lowercase,
    without the scheme's default port."""
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
    host = host.strip().lower()
    default = ":443" if scope.get("scheme") == "https" else ":80"
    return host.removesuffix(default)


async def refuse(scope: Scope, send: Send, exc: UnauthenticatedError) -> None:
    """Answers 401 naming what is wrong, and logs the refusal."""
    client = scope.get("client")
    LOG.warning(
        "request refused: %s",
        exc,
        extra={
            "method": scope["method"],
            "path": scope["path"],
            "client": client[0] if client else None,
        },
    )
    await reply(scope, send, 401, "unauthenticated", str(exc))


async def throttled(scope: Scope, send: Send, exc: RateLimitedError) -> None:
    """Answers 429 naming the quota, with Retry-After; the body is not read further."""
    LOG.info("request refused: %s", exc, extra={"method": scope["method"], "path": scope["path"]})
    retry = str(max(1, math.ceil(exc.retry_after)))
    await reply(scope, send, 429, "rate_limited", str(exc), headers={"Retry-After": retry})


class BodyTooLarge(HTTPException):
    """A request body over its cap (413): raised while it is read, so the framework's
    handler answers it too when a route reads the body (an HTTPException, which the
    framework passes on where it turns other errors of a body's reading into 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


async def read_body(receive: Receive, limit: int, hasher: hashlib._Hash | None = None) -> bytes:
    """The whole body, at most ``limit`` bytes (BodyTooLarge past it, or past the gate's
    cap). ``hasher`` is fed each part as it arrives (spread over the receipt, and without
    a worker thread's hop)."""
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise UnauthenticatedError("the client went away before sending its body")
        if msg["type"] == "http.request":
            part = msg.get("body", b"")
            size += len(part)
            if size > limit:
                raise BodyTooLarge(
                    f"request body is larger than {limit} bytes, the most any call accepts"
                )
            parts.append(part)
            if hasher is not None:
                hasher.update(part)
            if not msg.get("more_body", False):
                return b"".join(parts)


def replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that hands out ``body`` (read already) first."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def reply(
    scope: Scope,
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
) -> None:
    """Answers with our error document (``{"error", "message"}``) and ``status``; the
    request's body is not read."""
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="sgw"'}
    response = JSONResponse({"error": code, "message": message}, status, headers=headers)

    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, nothing, send)


# Route dependencies


def current_principal(request: Request) -> Principal:
    """Who the request acts for; UnauthenticatedError if it carries no credentials."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is not None:
        return principal
    if request.app.state.config.insecure_dev:
        return DEV_PRINCIPAL
    raise UnauthenticatedError(NO_CREDENTIALS)


async def current_account(request: Request) -> str:
    """The account the request acts for. A gateway's request is refused (404) when the
    volume or snapshot in its path or query is not the gateway's (on the event loop when
    the volume's gateway is cached, else in a worker thread)."""
    principal = current_principal(request)
    if principal.kind is Kind.CANDIDATE:
        raise UnauthenticatedError(
            "this gateway is not activated: activate it with `sgw activate KEY --name NAME`"
        )
    if principal.kind is Kind.GATEWAY:
        volume_id = request.path_params.get("volume_id")
        snapshot_ids = [
            s
            for s in (
                request.path_params.get("snapshot_id"),
                request.query_params.get("first_snapshot_id"),
            )
            if s is not None
        ]
        known = volume_id is None or (
            principal.gateway_id is not None
            and _gateways(request).owns_volume_known(principal.gateway_id, volume_id)
        )
        if not known or snapshot_ids:
            await run_in_threadpool(
                _check_owned, request, principal, None if known else volume_id, snapshot_ids
            )
    return principal.account_id


def _check_owned(
    request: Request, principal: Principal, volume_id: str | None, snapshot_ids: list[str]
) -> None:
    if volume_id is not None:
        check_volume(request, principal, volume_id)
    for snapshot_id in snapshot_ids:
        check_snapshot(request, principal, snapshot_id)


def admin_principal(request: Request) -> Principal:
    """An API token's (or development mode's) principal; gateways get 403."""
    principal = current_principal(request)
    if principal.kind not in (Kind.TOKEN, Kind.DEV):
        raise ForbiddenError(
            "admin calls need an API token (Authorization: Bearer TOKEN); gateway "
            "credentials cannot make them"
        )
    return principal


def operator_principal(request: Request) -> Principal:
    """An API token of the provider's operator account."""
    principal = admin_principal(request)
    if not principal.operator:
        raise ForbiddenError(
            "only the operator account (made by `sgw provider init`) may manage accounts"
        )
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
CurrentAccount = Annotated[str, Depends(current_account)]
AdminPrincipal = Annotated[Principal, Depends(admin_principal)]
OperatorPrincipal = Annotated[Principal, Depends(operator_principal)]


# What a gateway may touch (a token may touch its whole account)


def _gateways(request: Request) -> Gateways:
    gateways: Gateways = request.app.state.gateways
    return gateways


def check_volume(request: Request, principal: Principal, volume_id: str) -> None:
    """NotFoundError unless the principal is no gateway or the volume is bound to it."""
    if principal.gateway_id is None:
        return
    if not _gateways(request).owns_volume(principal.gateway_id, volume_id):
        raise NotFoundError(f"volume {volume_id} not found for gateway {principal.gateway_id}")


def check_snapshot(request: Request, principal: Principal, snapshot_id: str) -> None:
    """NotFoundError unless the principal is no gateway or may use the snapshot."""
    if principal.gateway_id is None:
        return
    if not _gateways(request).owns_snapshot(principal.gateway_id, snapshot_id):
        raise NotFoundError(f"snapshot {snapshot_id} not found for gateway {principal.gateway_id}")


def volume_gateway(
    request: Request, principal: Principal, gateway_id: str | None, from_snapshot_id: str | None
) -> str | None:
    """The gateway a new volume is bound to: a gateway's own volumes are bound to it (it
    may name no other gateway nor use another's snapshot); an admin chooses."""
    if from_snapshot_id is not None:
        check_snapshot(request, principal, from_snapshot_id)
    if principal.gateway_id is None:
        return gateway_id
    if gateway_id is not None and gateway_id != principal.gateway_id:
        raise NotFoundError(f"gateway {gateway_id} not found for gateway {principal.gateway_id}")
    return principal.gateway_id


def record_snapshot(request: Request, principal: Principal, snapshot_id: str) -> None:
    """Remembers that a gateway started the snapshot (it keeps it after its volume goes)."""
    if principal.gateway_id is not None:
        _gateways(request).claim_snapshot(principal.gateway_id, snapshot_id)


def ensure_account(sessions: sessionmaker[Session], account_id: str, name: str) -> None:
    """Creates the account unless it exists (several providers may start at once)."""
    with sessions() as s:
        if s.get(Account, account_id) is not None:
            return
    try:
        with sessions.begin() as s:
            s.add(Account(id=account_id, name=name))
    except IntegrityError as e:
        with sessions() as s:
            if s.get(Account, account_id) is not None:
                return  # another process created it first
        raise DatabaseError(
            f"cannot create account {account_id!r}: another account is named {name!r}; "
            "rename that account"
        ) from e
    LOG.info("account created", extra={"account": account_id})
