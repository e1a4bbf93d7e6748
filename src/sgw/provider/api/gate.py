"""What a request must show before any of its body is read (docs/provider.md, "What is
open, and body limits").

The provider's event loop holds every gateway's long-poll, so nothing a caller without
credentials sends may cost it more than a look at the request's head (before this gate a
request without credentials reached the framework's JSON parsing, synchronous on that
loop, with a body of up to 64 MiB). ``Gate`` is the outermost ASGI application; from the
request line and headers alone it

- lets the open routes through without credentials (``OPEN_PATHS``, ``OPEN_PREFIXES``:
  GET and HEAD, without a body);
- lets the control servers' doorbell through on its own header (``x-sgw-peer``), checked
  here for its form and age and by the route for its HMAC over the body;
- refuses with 401 a request without credentials (unless ``--insecure-dev``), with an
  unknown scheme, a malformed API token or signature (``SGW1-Ed25519`` or RFC 9421's
  ``Signature-Input``/``Signature``), a timestamp outside the clock
  window, the key id of an unknown or deactivated gateway, or a not-yet-activated
  gateway's ``pk:`` key on any call but its credentials;
- caps the body by route (``body_cap``): 413 naming the limit when Content-Length is over
  it, or, for a body without a length (chunked), once the application read past it.

A refused request's body is never read: the server discards it as it arrives. Credentials
that pass are verified further in (``AuthMiddleware``, ``LeanControl``: a signature needs
the body's digest); a signed header is checked here once and handed on in the request's
state (``auth.SIGNED_HEADER``). The
framework's own per-route body limits would act only after routing and the middlewares,
and not on the lean path; this acts before both. The hot calls (polls, replies, chunk
uploads, packs) pay a look at a few headers and a path comparison; the signed header's
parse and its key's lookup in the cache were the authenticator's before and are now done
here instead.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sgw.common import signing
from sgw.common.chunks import MAX_CHUNK_SIZE
from sgw.common.errors import UnauthenticatedError
from sgw.common.health import HEALTH_PATH, MAX_REPORTS_PER_BATCH
from sgw.provider.api.auth import (
    NO_CREDENTIALS,
    SIGNED_HEADER,
    Authenticator,
    BodyTooLarge,
    SignedHead,
    message_signature,
    refuse,
    reply,
    unknown_scheme,
)
from sgw.provider.api.blocks import MAX_PACK_BODY
from sgw.provider.api.control import REPLIES_PATH
from sgw.provider.api.gateways import CREDENTIALS_PATH
from sgw.provider.api.releases import RELEASES_PATH
from sgw.provider.api.updates import REPORTS_PATH
from sgw.provider.blockstore.service import zstd_bound
from sgw.provider.control import peers
from sgw.provider.management.accounts import TOKEN_PREFIX
from sgw.provider.releases.repository import MAX_BUNDLE

LOG = logging.getLogger(__name__)

KIB = 1 << 10
MIB = 1 << 20

# Served to anyone, without credentials (GET and HEAD, no body): liveness, the API's
# description and its pages, and the activation landing (the provider's root, where a
# gateway's activation page sends the admin's browser with ``?activationKey=``; it answers
# 404 until the web console serves it).
OPEN_PATHS = frozenset(
    {"/", "/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
# Path prefixes served without credentials, the same way. The web console's sign-in page
# and static assets (``/console/...``, DESIGN.md section 3) belong here once it is built;
# nothing else does.
OPEN_PREFIXES: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BodyCap:
    """The most bytes a call's body may have, and what a refusal (413) says."""

    limit: int
    what: str  # the calls it is for (plural)
    hint: str  # what the caller should do instead

    def message(self) -> str:
        if self.limit == 0:
            return f"{self.what} take no request body; {self.hint}"
        size = f"{self.limit // MIB} MiB" if self.limit % MIB == 0 else f"{self.limit // KIB} KiB"
        return (
            f"request body is larger than {self.limit} bytes ({size}), the limit for "
            f"{self.what}; {self.hint}"
        )


# The caps (bytes). A JSON call's document is read whole and parsed on the event loop, so
# it gets what it needs and no more: a management call's document (a volume, a token, a
# CHAP secret, a command) is under a few KiB.
JSON_BODY = BodyCap(
    MIB,
    "calls with a JSON document",
    "the API's documents are far smaller (see /openapi.json); check what is sent",
)
# A commit's changes take about 80 bytes per changed chunk: 64 MiB is some 800,000 chunks
# (a re-sync of about 800 GiB of 1 MiB chunks), what commits could carry before the gate,
# so no commit that was accepted then is refused now.
COMMIT_BODY = BodyCap(64 * MIB, "commits", "commit fewer changes at once")
# The gateway's replies on the control channel. The largest is a diagnostics bundle,
# base64 in the reply: measured, 150-240 KiB of bundle (200-240 KB of reply) for 5,000 log
# lines of routine messages or of tracebacks, 2.3 MB (3.1 MB of reply) when every line
# carries a dozen random chunk ids; at most 8 MiB of bundle (the gateway's MAX_BUNDLE),
# 11,185,073 bytes of reply. A gateway sends its unsent replies oldest first in batches
# of about 8 MiB of results, one at least (gateway.link.journal), so no batch is larger
# than that one reply plus small ones' slack: 12 MiB takes every batch a gateway sends (a
# refused batch would stay in its outbox and hold up every later reply).
REPLIES_BODY = BodyCap(
    12 * MIB, "the control channel's replies", "send fewer replies, or smaller results, at once"
)
# One chunk or block, sent as is or zstd-compressed (the route checks the volume's own
# chunk size); a chunk pack (blocks.MAX_PACK_BODY). Both are read as they arrive.
CHUNK_BODY = BodyCap(
    zstd_bound(MAX_CHUNK_SIZE), "chunk and block uploads", "send at most one chunk per request"
)
PACK_BODY = BodyCap(MAX_PACK_BODY, "chunk packs", "send fewer chunks per pack")
# A release bundle, streamed to a file as it arrives (an operator's call).
RELEASE_BODY = BodyCap(MAX_BUNDLE, "release bundles", "a release slot is some 100 MiB; check it")
# An update agent's report: two versions, a state, a time and a reason of at most 4096
# characters (JSON-escaped, up to 6 bytes each): 32 KiB holds the largest with room.
REPORT_BODY = BodyCap(32 * KIB, "update reports", "shorten the reason (at most 4096 characters)")
# A gateway's batch of health reports (sgw.common.health): a report of 25 gateway metrics
# and 3 volumes is some 2 KB of JSON, so 1 MiB holds a full batch of 200 such; a gateway
# with many volumes sends fewer reports per batch.
HEALTH_BODY = BodyCap(
    MIB,
    "health report batches",
    f"send fewer reports per batch (at most {MAX_REPORTS_PER_BATCH}, fewer with many volumes)",
)
# A gateway that is not activated yet makes one call, a GET of its credentials without a
# body; a little room for a client that sends an empty document.
CANDIDATE_BODY = BodyCap(
    KIB,
    "the calls of a gateway that is not activated yet",
    f"it may only fetch its credentials (GET {CREDENTIALS_PATH}, no body)",
)
OPEN_BODY = BodyCap(0, "calls open without credentials", "send them without one")

# The PUT calls that carry a chunk or a block: (collection, item) of /v1/C/{id}/I/{id}.
_UPLOADS = frozenset({("volumes", "chunks"), ("snapshots", "blocks")})
_API_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{1,200}")
_CANDIDATE_ONLY = (
    "this gateway is not activated (it signs with its public key, pk:), so it may only fetch "
    f"its credentials (GET {CREDENTIALS_PATH}); activate it with `sgw activate KEY --name NAME`"
)


def body_cap(method: str, path: str) -> BodyCap:
    """The body cap of an authenticated call (or any call with ``--insecure-dev``)."""
    if method == "PUT":
        parts = path.split("/")
        if len(parts) == 6 and parts[1] == "v1" and (parts[2], parts[4]) in _UPLOADS:
            return CHUNK_BODY
    elif method == "POST":
        if path == REPLIES_PATH:
            return REPLIES_BODY
        if path == RELEASES_PATH:
            return RELEASE_BODY
        if path == REPORTS_PATH:
            return REPORT_BODY
        if path == HEALTH_PATH:
            return HEALTH_BODY
        if path.startswith("/v1/volumes/"):
            parts = path.split("/")
            if len(parts) == 5 and parts[4] == "chunk-packs":
                return PACK_BODY
            if len(parts) == 5 and parts[4] == "commits":
                return COMMIT_BODY
    return JSON_BODY


class Gate:
    """ASGI: refuses from the head what must not reach the application (see the module
    doc); hands everything else to ``app``."""

    def __init__(self, app: ASGIApp, auth: Authenticator, *, insecure_dev: bool) -> None:
        self.app = app
        self.auth = auth
        self.insecure_dev = insecure_dev

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        authorization = peer = length = None
        chunked = False  # Transfer-Encoding: the body's length is not announced
        signed = False  # Signature-Input: an RFC 9421 signature
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"signature-input":
                signed = True
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"x-sgw-peer":
                peer = value
        try:
            cap = await self._admit(scope, authorization, peer, signed)
        except _NoCredentialsError as exc:
            return await reply(scope, send, 401, "unauthenticated", str(exc))
        except UnauthenticatedError as exc:
            return await refuse(scope, send, exc)
        # uvicorn's parser refuses a Content-Length that is not a number and delivers no
        # more body than one announces; a body without one is counted as it is read.
        if length is not None and length.isdigit() and int(length) > cap.limit:
            return await reply(scope, send, 413, "payload_too_large", cap.message())
        if chunked or (length is not None and not length.isdigit()):
            receive = _counted(receive, cap)
        return await self.app(scope, receive, send)

    async def _admit(
        self, scope: Scope, authorization: bytes | None, peer: bytes | None, signed: bool
    ) -> BodyCap:
        """The body cap of a request that may go on; UnauthenticatedError otherwise."""
        method: str = scope["method"]
        path: str = scope["path"]
        if method in ("GET", "HEAD") and (
            path in OPEN_PATHS or (OPEN_PREFIXES and path.startswith(OPEN_PREFIXES))
        ):
            return OPEN_BODY
        if path == peers.DOORBELL_PATH and method == "POST":
            if not peers.well_formed(peer.decode("latin-1") if peer else None, time.time()):
                raise UnauthenticatedError(
                    f"doorbell refused: no well-formed {peers.HEADER} header within "
                    f"{peers.PEER_SKEW_S} s of this server's clock (control servers sign it "
                    "with DATA_DIR/control.secret; their clocks must agree)"
                )
            return JSON_BODY
        if authorization is None and signed:
            signature = message_signature(scope)
            if signature is None:
                raise UnauthenticatedError(
                    "Signature-Input without Signature: send both (RFC 9421; "
                    "docs/block-api.md, Signing requests)"
                )
            head = await self.auth.check_message_head(*signature)
            return self._signed_cap(scope, head, method, path)
        if authorization is None:
            if self.insecure_dev:
                return body_cap(method, path)
            raise _NoCredentialsError(NO_CREDENTIALS)
        header = authorization.decode("latin-1")
        if header[:7].lower() == "bearer ":
            if _API_TOKEN.fullmatch(header[7:].strip()) is None:
                raise UnauthenticatedError(
                    f"malformed API token: expected {TOKEN_PREFIX} and the rest of a token "
                    "that `sgw tokens create` printed (Authorization: Bearer TOKEN)"
                )
            return body_cap(method, path)
        if signing.is_signed(header):
            parsed = self.auth.parse(header)
            # An unknown or deactivated gateway is refused here too (its key is cached for
            # the gateways that call; read in a thread otherwise), not after its body.
            head = await self.auth.check_head(header, parsed)
            return self._signed_cap(scope, head, method, path)
        raise UnauthenticatedError(unknown_scheme(header))

    @staticmethod
    def _signed_cap(scope: Scope, head: SignedHead, method: str, path: str) -> BodyCap:
        """The body cap of a signed request whose head was checked; the head handed on."""
        if head.parsed.key_id.startswith(signing.PUBLIC_KEY_PREFIX):
            if method != "GET" or path != CREDENTIALS_PATH:
                raise UnauthenticatedError(_CANDIDATE_ONLY)
            cap = CANDIDATE_BODY
        else:
            cap = body_cap(method, path)
        scope.setdefault("state", {})[SIGNED_HEADER] = head
        return cap


class _NoCredentialsError(UnauthenticatedError):
    """A request without credentials: answered 401 and not logged (anyone can send them;
    refusals of credentials that were sent are logged)."""


def _counted(receive: Receive, cap: BodyCap) -> Receive:
    """``receive`` that raises BodyTooLarge (413) once more than ``cap`` bytes arrived."""
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > cap.limit:
                raise BodyTooLarge(cap.message())
        return message

    return counted
