"""Where the provider is and who calls, for the admin groups: ``--endpoint`` or
``SGW_ENDPOINT``, ``SGW_TOKEN``, ``SGW_CA`` (the provider's CA for https), else the config
file (``SGW_CONFIG`` or ``~/.config/sgw/config.toml``; it holds a token, so it must be
mode 0600)::

    endpoint = "https://provider.example.net:8480"
    token = "sgw_..."
    ca = "/etc/sgw/provider-ca.pem"

The token goes over https, or plain http to this machine (loopback); plain http to another
machine only with ``--insecure-http`` or ``SGW_INSECURE_HTTP=1`` (development networks).
"""

from __future__ import annotations

import os
import ssl
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

from sgw.cli.client import ApiClient
from sgw.common.errors import ConfigError
from sgw.common.transport import BEYOND_LOOPBACK, transport_refusal

DEFAULT_CONFIG = "~/.config/sgw/config.toml"
INSECURE_HTTP_ENV = "SGW_INSECURE_HTTP"
_YES = ("1", "true", "yes")
_NO = ("", "0", "false", "no")


@dataclass(frozen=True)
class ClientSettings:
    endpoint: str
    token: str | None
    ca: str | None


def load_settings(endpoint_flag: str | None) -> ClientSettings:
    """Endpoint, token and CA from the flag, the environment, then the config file."""
    path = os.path.expanduser(os.environ.get("SGW_CONFIG", DEFAULT_CONFIG))
    doc: dict[str, Any] = {}
    if os.path.exists(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path} has mode {mode:04o} and holds a token; restrict it: chmod 600 {path}"
            )
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
    endpoint = endpoint_flag or os.environ.get("SGW_ENDPOINT") or doc.get("endpoint")
    if not endpoint:
        raise ConfigError(
            f"no provider endpoint: pass --endpoint URL, set SGW_ENDPOINT or write "
            f'endpoint = "https://..." in {path}'
        )
    token = os.environ.get("SGW_TOKEN") or doc.get("token")
    ca = os.environ.get("SGW_CA") or doc.get("ca")
    return ClientSettings(str(endpoint).rstrip("/"), token and str(token), ca and str(ca))


def insecure_http_allowed(flag: bool) -> bool:
    """True if ``--insecure-http`` was given or ``SGW_INSECURE_HTTP`` says yes."""
    text = os.environ.get(INSECURE_HTTP_ENV, "").strip().lower()
    if text not in _YES + _NO:
        raise ConfigError(
            f"{INSECURE_HTTP_ENV}={text!r}: set it to 1 (allow plain http) or 0, or unset it"
        )
    return flag or text in _YES


def check_endpoint(endpoint: str, *, insecure_http: bool) -> None:
    """ConfigError unless the endpoint may carry the API token (sgw.common.transport):
    https, or plain http to loopback or with ``insecure_http``."""
    why = transport_refusal(endpoint, insecure_http=insecure_http)
    if why is None:
        return
    if why == BEYOND_LOOPBACK:
        raise ConfigError(
            f"endpoint {endpoint} is plain http to another machine, which would send the "
            "API token unencrypted: use https:// (with SGW_CA, the provider's tls/ca.pem), "
            f"or pass --insecure-http (or set {INSECURE_HTTP_ENV}=1) on a development network"
        )
    raise ConfigError(
        f"endpoint {endpoint!r}: {why}; give a URL like https://provider.example.net:8480"
    )


def open_client(endpoint_flag: str | None, *, insecure_http: bool = False) -> ApiClient:
    """A client of the provider the settings name; it needs a token, which it sends only
    where ``check_endpoint`` allows, and pins the CA if one is set (else the system's CAs
    verify the provider). ``insecure_http``: the ``--insecure-http`` flag."""
    settings = load_settings(endpoint_flag)
    if not settings.token:
        raise ConfigError(
            "no API token: set SGW_TOKEN or token = ... in the config file (`sgw provider "
            "init` printed the first one)"
        )
    check_endpoint(settings.endpoint, insecure_http=insecure_http_allowed(insecure_http))
    verify = ssl.create_default_context(cafile=settings.ca) if settings.ca else True
    return ApiClient(settings.endpoint, settings.token, verify=verify)
