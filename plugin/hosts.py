"""Ollama host spellings (OLLAMA_HOST style) and whether one names this machine; no network, no server."""
from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from .errors import UserError

DEFAULT_PORT = 11434
DEFAULT_HOST = f"http://127.0.0.1:{DEFAULT_PORT}"


def normalize_host(host: str | None = None) -> str:
    """``http://HOST:PORT`` for an OLLAMA_HOST-style value (``host``, ``host:port``, ``:port``, URL).

    None means ``$OLLAMA_HOST`` or ``http://127.0.0.1:11434``. A wildcard bind address
    (0.0.0.0, ::) is reached through 127.0.0.1.
    """
    raw = (host if host is not None else os.environ.get("OLLAMA_HOST", "")).strip()
    if not raw:
        return DEFAULT_HOST
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme or "http"
    hostname = parts.hostname or "127.0.0.1"
    if hostname in ("0.0.0.0", "::"):
        hostname = "127.0.0.1"
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise UserError(f"'{host}' is not a valid Ollama host (expected HOST:PORT or http://HOST:PORT)") from None
    if ":" in hostname:
        hostname = f"[{hostname}]"
    return f"{scheme}://{hostname}:{port}{parts.path.rstrip('/')}"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (any OLLAMA_HOST spelling) names this machine: an IP literal in 127.0.0.0/8,
    ``::1``, or exactly ``localhost``. Any other name is remote (``127.0.0.1.example.org`` is a
    domain, resolved by DNS)."""
    name = urlsplit(normalize_host(host)).hostname or ""
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return address in ipaddress.IPv4Network("127.0.0.0/8")
    return address.is_loopback
