"""Who may use the server: the API key that every route but the open ones requires, and whether an address
the server binds is reachable from other machines."""

from __future__ import annotations

import ipaddress
import secrets
import socket

#: Routes answered without the API key: liveness probes and Prometheus scrapes carry no key.
OPEN_PATHS = frozenset({"/health", "/metrics"})


def check_api_key(key: str) -> str:
    """``key`` itself when a client can send it in an ``Authorization`` header (non-empty, visible ASCII,
    no spaces); a ``ValueError`` otherwise, so a key no client could match fails at startup."""
    if not key:
        raise ValueError("the API key is empty")
    if not all("!" <= char <= "~" for char in key):
        raise ValueError("the API key must be visible ASCII characters without spaces")
    return key


def bearer_matches(header: str | None, key: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <key>`` (the scheme in any case), comparing the
    token in constant time so its timing does not reveal how much of the key a guess got right."""
    if header is None:
        return False
    scheme, _, token = header.partition(" ")
    # header values arrive decoded as latin-1: encoding back gives the bytes the client sent
    return scheme.lower() == "bearer" and secrets.compare_digest(token.encode("latin-1"), key.encode("ascii"))


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one (127.0.0.0/8, ::1): a server bound there
    is reachable from this machine only. An address that does not resolve, or ``0.0.0.0`` / ``::`` (every
    interface), is not."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
