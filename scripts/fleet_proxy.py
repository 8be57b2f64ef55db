#!/usr/bin/env python
"""A TLS reverse proxy that lets SuperNodes reach the SuperLink's Fleet API and nothing else.

Flower 1.42 serves the Fleet API (``/v1/fleet/...``, SuperNodes), the Control API
(``/v1/control/...``, ``flwr``: no authentication in open-source Flower, so whoever reaches it
can submit a run, i.e. run code on the server and on every site) and the Runtime API
(``/v1/runtime/...``) on one socket. Keep that socket on 127.0.0.1 and put this proxy on the
address the sites use::

    python scripts/fleet_proxy.py --listen 0.0.0.0:9092 --upstream 127.0.0.1:8000 \\
        --certfile /etc/flux/pki/server.crt --keyfile /etc/flux/pki/server.key \\
        --ca-certfile /etc/flux/pki/ca.crt

It serves HTTPS (``--certfile``/``--keyfile``) and forwards a request to
``https://UPSTREAM`` (verified against ``--ca-certfile``) only when it is a ``POST`` whose path
is ``/v1/fleet/<name>[/<name>...]`` with names of ``[A-Za-z0-9_-]`` (no percent-encoding, no
dot segments, no empty segments: what the proxy checks is exactly what the SuperLink routes).
Every other path gets ``403`` (``/v1/control/``, ``/v1/runtime/``, ``/health``, ``/docs``,
``/v1/fleet/../control/...``, ...), another method on a Fleet path ``405``; each refusal is
logged on one line with the path and the client's address. Request and response bodies are
streamed both ways, headers pass through except the hop-by-hop ones (and any client-supplied
``Forwarded``/``X-Forwarded-*``, replaced by the proxy's own), so SuperNode authentication
(signature headers) works through it. SIGTERM or SIGINT: stop accepting, let requests in
flight finish (at most ``--grace`` seconds), log a summary line, exit 0.

Built on uvicorn (server, TLS), starlette (request/response objects) and httpx (upstream
client), the libraries Flower itself uses.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import signal
import socket
import ssl
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import anyio
import httpx
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

LOG = logging.getLogger("fleet_proxy")

#: the only paths forwarded: ``/v1/fleet/`` and one or more plain segments
FLEET_PATH = re.compile(rb"/v1/fleet/[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
#: the only method forwarded (every Fleet route of Flower 1.42 is a POST)
FLEET_METHODS = frozenset({"POST"})
#: RFC 9110 section 7.6.1 hop-by-hop fields, plus ``expect`` (answered by the proxy's own server)
#: and ``host`` (set by the upstream client for the upstream address)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
    }
)
#: forwarding information a client could forge; replaced by the proxy's own
FORWARDING = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
    }
)


def parse_address(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[IPv6]:PORT`` for IPv6 literals).

    Parameters
    ----------
    value : str
        The address as given on the command line.

    Returns
    -------
    tuple of (str, int)
        Host (without brackets) and port.

    Raises
    ------
    argparse.ArgumentTypeError
        When the value is not ``HOST:PORT`` with a port in 1..65535.
    """
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{value!r}: {host!r} is no IPv6 address") from exc
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{value!r}: write IPv6 addresses as [ADDRESS]:PORT")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (port 1-65535)")
    return host, int(port)


def url_host(host: str) -> str:
    """``host`` as it is written in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


def forwarded_path(raw_path: bytes) -> bool:
    """Whether a request path (as sent, undecoded, without the query) may be forwarded.

    Parameters
    ----------
    raw_path : bytes
        The request target's path, before percent-decoding.

    Returns
    -------
    bool
        True only for ``/v1/fleet/`` followed by one or more segments of ``[A-Za-z0-9_-]``.
    """
    return FLEET_PATH.fullmatch(raw_path) is not None


@dataclass
class Stats:
    """What the proxy did, logged when it stops."""

    forwarded: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    upstream_errors: int = 0

    def summary(self) -> str:
        """One line: forwarded requests per path, refusals, upstream errors."""
        per_path = ", ".join(f"{p} {n}" for p, n in sorted(self.forwarded.items())) or "-"
        return (
            f"forwarded {sum(self.forwarded.values())} requests ({per_path}); "
            f"refused {self.refused}; upstream errors {self.upstream_errors}"
        )


class FleetProxy:
    """ASGI application: forward Fleet API requests to the upstream, refuse everything else.

    Parameters
    ----------
    upstream : tuple of (str, int)
        The SuperLink's address (host, port), reached over HTTPS.
    ca_certfile : str
        PEM file of the CA(s) the upstream's certificate must chain to.
    read_timeout : float
        Seconds the upstream may stay silent while a request waits for it.
    """

    def __init__(self, upstream: tuple[str, int], ca_certfile: str, read_timeout: float):
        self.upstream = upstream
        self.base_url = httpx.URL(f"https://{url_host(upstream[0])}:{upstream[1]}")
        self.ca_certfile = ca_certfile
        self.read_timeout = read_timeout
        self.client: httpx.AsyncClient | None = None
        self.stats = Stats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point (``lifespan`` and ``http`` scopes)."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(
                    verify=ssl.create_default_context(cafile=self.ca_certfile),
                    trust_env=False,  # no HTTPS_PROXY, no SSL_CERT_FILE from the environment
                    follow_redirects=False,
                    timeout=httpx.Timeout(
                        connect=10.0, read=self.read_timeout, write=60.0, pool=None
                    ),
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
                )
                await self._check_upstream()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                LOG.info("stopped: %s", self.stats.summary())
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _check_upstream(self) -> None:
        """Log whether the upstream answers over verified TLS (a warning only: it may start
        later)."""
        assert self.client is not None
        try:
            reply = await self.client.get(self.base_url.copy_with(path="/health"), timeout=5.0)
            LOG.info("upstream %s answers (GET /health: %d)", self.base_url, reply.status_code)
        except httpx.HTTPError as exc:
            LOG.warning("upstream %s not reachable yet: %s", self.base_url, _reason(exc))

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        client = _client_address(scope)
        if not forwarded_path(raw_path):
            await self._refuse(scope, receive, send, request, client, 403, "not a Fleet API path")
            return
        if request.method not in FLEET_METHODS:
            await self._refuse(scope, receive, send, request, client, 405, "method not allowed")
            return
        await self._forward(scope, receive, send, request, raw_path, client)

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: Request,
        client: str,
        status: int,
        reason: str,
    ) -> None:
        self.stats.refused += 1
        path = scope.get("raw_path") or scope["path"].encode()
        LOG.warning(
            "refused %s %r from %s: %d %s",
            request.method,
            path.decode("latin-1"),
            client,
            status,
            reason,
        )
        body = (
            "403 Forbidden: only the Fleet API (/v1/fleet/) is served here\n"
            if status == 403
            else "405 Method Not Allowed: the Fleet API takes POST only\n"
        )
        headers = {"allow": "POST"} if status == 405 else None
        # the request body is never read, let alone forwarded
        await PlainTextResponse(body, status_code=status, headers=headers)(scope, receive, send)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: Request,
        raw_path: bytes,
        client: str,
    ) -> None:
        assert self.client is not None
        query: bytes = scope.get("query_string", b"")
        url = self.base_url.copy_with(raw_path=raw_path + (b"?" + query if query else b""))
        if url.raw_path.partition(b"?")[0] != raw_path:  # never send what was not checked
            await self._refuse(
                scope, receive, send, request, client, 403, "path changed on encoding"
            )
            return
        headers = _request_headers(request, scope)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        upstream_request = self.client.build_request(
            request.method,
            url,
            headers=headers,
            content=request.stream() if has_body else None,
        )
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except ClientDisconnect:
            LOG.info("client %s went away while sending %r", client, raw_path.decode())
            return
        except httpx.HTTPError as exc:
            self.stats.upstream_errors += 1
            LOG.error("upstream error for %r from %s: %s", raw_path.decode(), client, _reason(exc))
            status = 504 if isinstance(exc, httpx.TimeoutException) else 502
            text = "504 Gateway Timeout\n" if status == 504 else "502 Bad Gateway\n"
            await PlainTextResponse(text, status_code=status)(scope, receive, send)
            return
        self.stats.forwarded[raw_path.decode()] += 1
        response = StreamingResponse(
            _relay(upstream, raw_path, self.stats), status_code=upstream.status_code
        )
        response.raw_headers = _response_headers(upstream.headers.raw)
        try:
            await response(scope, receive, send)
        except ClientDisconnect:
            LOG.info("client %s went away during the answer to %r", client, raw_path.decode())
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()


async def _relay(upstream: httpx.Response, raw_path: bytes, stats: Stats) -> AsyncIterator[bytes]:
    """The upstream's body as it arrives, undecoded (its content-length/-encoding still hold)."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        stats.upstream_errors += 1
        LOG.error("upstream broke off the answer to %r: %s", raw_path.decode(), _reason(exc))
        raise


def _client_address(scope: Scope) -> str:
    peer = scope.get("client")
    return f"{url_host(peer[0])}:{peer[1]}" if peer else "unknown"


def _connection_tokens(values: Sequence[str]) -> set[str]:
    """Header names listed in ``Connection`` (hop-by-hop for this connection only)."""
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def _request_headers(request: Request, scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers for the upstream: hop-by-hop and forwarding ones replaced."""
    drop = HOP_BY_HOP | FORWARDING | _connection_tokens(request.headers.getlist("connection"))
    headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in drop]
    peer = scope.get("client")
    if peer:
        headers.append((b"x-forwarded-for", peer[0].encode("latin-1")))
    headers.append((b"x-forwarded-proto", b"https"))
    if "host" in request.headers:
        headers.append((b"x-forwarded-host", request.headers["host"].encode("latin-1")))
    return headers


def _response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's answer headers for the client, hop-by-hop ones dropped."""
    tokens = _connection_tokens([v.decode("latin-1") for k, v in raw if k.lower() == b"connection"])
    drop = (HOP_BY_HOP - {"host"}) | tokens
    return [(k.lower(), v) for k, v in raw if k.decode("latin-1").lower() not in drop]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _readable(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise SystemExit(f"fleet_proxy: error: {what} {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise SystemExit(f"fleet_proxy: error: {what} {path!r} is not readable")
    return path


def check_tls_files(certfile: str, keyfile: str, ca_certfile: str) -> None:
    """Load the TLS files once up front, to fail with a clear message instead of a traceback.

    Parameters
    ----------
    certfile, keyfile : str
        The proxy's certificate (chain) and private key, PEM.
    ca_certfile : str
        The CA certificate(s) that the upstream's certificate must chain to, PEM.

    Raises
    ------
    SystemExit
        With a one-line message naming the file at fault.
    """
    for path, what in (
        (certfile, "--certfile"),
        (keyfile, "--keyfile"),
        (ca_certfile, "--ca-certfile"),
    ):
        _readable(path, what)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SystemExit(
            f"fleet_proxy: error: --certfile {certfile!r} / --keyfile {keyfile!r} do not load "
            f"as a PEM certificate and its private key: {exc}"
        ) from exc
    try:
        ssl.create_default_context(cafile=ca_certfile)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SystemExit(
            f"fleet_proxy: error: --ca-certfile {ca_certfile!r} holds no PEM CA certificate: {exc}"
        ) from exc


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6).

    Raises
    ------
    SystemExit
        When the address cannot be resolved or bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise SystemExit(
            f"fleet_proxy: error: cannot resolve --listen host {host!r}: {exc}"
        ) from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"fleet_proxy: error: cannot listen on {url_host(host)}:{port}: {exc.strerror or exc}"
        ) from exc
    return sock


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="fleet_proxy.py",
        description="TLS reverse proxy forwarding only the Fleet API (/v1/fleet/) of a Flower "
        "SuperLink; every other path gets 403.",
    )
    parser.add_argument(
        "--listen",
        required=True,
        type=parse_address,
        metavar="HOST:PORT",
        help="public address to serve HTTPS on (the sites' --superlink)",
    )
    parser.add_argument(
        "--upstream",
        required=True,
        type=parse_address,
        metavar="HOST:PORT",
        help="the SuperLink (--host/--port), reached over HTTPS, e.g. 127.0.0.1:8000",
    )
    parser.add_argument(
        "--certfile",
        required=True,
        help="PEM certificate (chain) the proxy presents to the SuperNodes",
    )
    parser.add_argument("--keyfile", required=True, help="its PEM private key")
    parser.add_argument(
        "--ca-certfile",
        required=True,
        help="PEM CA certificate the SuperLink's certificate must chain to",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds the SuperLink may stay silent on a request (default 300)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM, seconds given to requests in flight (default 10)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def _exit_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT outside uvicorn's own handling (before it starts, and the signal it
    re-raises after its graceful shutdown): a clean exit."""
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 after a clean shutdown.
    """
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every upstream request at INFO: only with --log-level debug
    logging.getLogger("httpx").setLevel(max(logging.getLogger().level, logging.WARNING))
    check_tls_files(args.certfile, args.keyfile, args.ca_certfile)
    host, port = args.listen
    sock = listen_socket(host, port)
    app = FleetProxy(args.upstream, args.ca_certfile, args.read_timeout)
    config = uvicorn.Config(
        app,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan="on",
        proxy_headers=False,  # the client's address is the TCP peer, whatever it claims
        server_header=False,  # the SuperLink's own server/date headers pass through
        date_header=False,
        access_log=False,  # refusals are logged by the proxy, one line each
        log_config=None,
        timeout_graceful_shutdown=args.grace,
    )
    LOG.info(
        "serving https://%s:%d, forwarding POST /v1/fleet/* to %s (CA %s)",
        url_host(host),
        port,
        app.base_url,
        args.ca_certfile,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
