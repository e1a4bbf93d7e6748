"""Which URLs may carry credentials (a gateway's signed requests, an admin's API token).

One rule for the gateway's provider URL, its control servers (configured or learned from
the provider's answers) and the admin CLI's endpoint: ``https`` always; plain ``http`` only
to this machine (a loopback address) unless the operator allowed it explicitly on a
development network; never plain ``http`` once the provider is reached over ``https`` (a
downgrade); no other scheme. Callers word the refusal with the fix that fits them.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

HTTPS = "https"
HTTP = "http"
# The refusals a caller may want to word on its own (each with its fix).
BEYOND_LOOPBACK = "plain http to another machine"
DOWNGRADE = "plain http where the provider is reached over https (a downgrade)"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def transport_refusal(url: str, *, insecure_http: bool, https_only: bool = False) -> str | None:
    """Why ``url`` may not carry credentials, or None if it may.

    ``insecure_http``: plain http beyond loopback was allowed explicitly; ``https_only``:
    the provider is reached over https, so plain http anywhere is a downgrade.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "not a URL"
    scheme = parts.scheme.lower()
    if scheme not in (HTTP, HTTPS):
        return f"scheme {parts.scheme or '(none)'!r} is not http or https"
    if not host:
        return "no host"
    if scheme == HTTPS:
        return None
    if https_only:
        return DOWNGRADE
    if insecure_http or is_loopback(host):
        return None
    return BEYOND_LOOPBACK
