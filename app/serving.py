"""How `carnet serve` listens: the port is taken before anything slow (a busy one is one line, at once), the
address actually served is the one printed and, unless PUBLIC_BASE_URL says otherwise, the one links point at."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

__all__ = ["PortUnavailable", "bind", "serve_on", "served_base_url"]

_BACKLOG = 2048  # uvicorn's own default


class PortUnavailable(RuntimeError):
    """The address cannot be listened on; the message is a one-line hint for the person who typed the command."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), or PortUnavailable saying what to do."""
    where = f"{_bracketed(host)}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise PortUnavailable(f"--host {host}: not an address or a name this machine resolves "
                              "(127.0.0.1 for this machine only, 0.0.0.0 for every interface)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise PortUnavailable(_hint(exc, where, host, port)) from None
    return sock


def served_base_url(sock: socket.socket, host: str) -> str:
    """`http://host:port` as a person reaches it: the host as given (the machine's name for a wildcard bind, which
    is no address to browse to; no DNS lookup, which could stall a start), the port actually bound (`--port 0`)."""
    port = sock.getsockname()[1]
    name = host
    try:
        if ipaddress.ip_address(host).is_unspecified:
            name = socket.gethostname()
    except ValueError:
        pass  # a name such as localhost: kept as given
    return f"http://{_bracketed(name)}:{port}"


def serve_on(
    app: Any, sock: socket.socket, *, on_ready: Callable[[], None], forwarded_allow_ips: str | None = None
) -> None:
    """uvicorn on the socket bound by `bind`; `on_ready` runs once the app has started (lifespan done).

    `forwarded_allow_ips`: the proxies whose X-Forwarded-For gives the client address (per-IP signup limits, consent
    proofs, the access journal); None: the connecting address."""
    config = uvicorn.Config(app, log_config=None, proxy_headers=forwarded_allow_ips is not None,
                            forwarded_allow_ips=forwarded_allow_ips)
    _AnnouncingServer(config, on_ready).run(sockets=[sock])


class _AnnouncingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self._on_ready()


def _hint(exc: OSError, where: str, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"{where} is already in use (another `carnet serve`?): stop that process, or serve on another port "
                f"with --port {port + 1 if port else 8001}")
    if exc.errno == errno.EACCES:
        return f"{where}: ports below 1024 need privileges; use --port 8000 (or another port above 1023)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine (127.0.0.1, or 0.0.0.0 for every interface)"
    return f"cannot listen on {where}: {exc.strerror}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
