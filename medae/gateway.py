"""The server's public address: a reverse proxy that serves only the Fleet API.

Flower 1.41's SuperLink serves its Fleet API (what SuperNodes use), its Control
API (start, stop and list runs, pull artifacts, register nodes) and its
runtime API on one HTTP port, and the open-source Control API has no account
authentication. Whoever reaches that port can submit a run, that is code that
every hospital's SuperNode executes. So `medae server` binds the SuperLink to
127.0.0.1 (reachable only from the coordinator's own machine) and puts this
gateway on the public address:

- it terminates TLS with the server certificate,
- forwards ``POST /v1/fleet/<call>`` for exactly the calls of the installed
  Flower's Fleet router (and ``GET /health``) to the SuperLink over TLS,
  with the SuperNode's signed authentication headers untouched,
- and answers everything else (``/v1/control/...``, ``/v1/runtime/...``,
  ``/docs``, other methods, paths with tricks) with 403, without contacting
  the SuperLink.

The request path sent upstream is rebuilt from the allow-list, never copied
from the request, so encoded or dotted paths cannot reach another route.

It is the part of the federation anyone on the network can reach, so it also
holds against load (`GatewayConfig`):

- a body larger than ``max_body_bytes`` (derived from the run's model, see
  `body_limit`) is answered 413 from its Content-Length, before any of it is
  read; a chunked body is counted as it arrives and cut off at the limit;
- a connection must finish its TLS handshake within ``handshake_timeout_s``
  and deliver each whole request (headers and body) within
  ``request_timeout_s``; idle keep-alive connections close after
  ``idle_timeout_s`` (idle, slowloris and stalled-body connections end);
- one client address holds at most ``max_connections_per_client``
  connections, and the gateway at most ``max_connections`` (503 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("medae.gateway")

FLEET_PREFIX = "/v1/fleet/"
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}
REFUSAL = (
    "medae gateway: this address serves only the Fleet API that sites use. Runs are started, listed and "
    "stopped by the coordinator on the server machine itself."
)
UPSTREAM_TIMEOUT_S = 120.0  # SuperNodes' own requests time out after 30 s
BODY_MARGIN = 2.0  # a message's arrays as float32, twice over ...
BODY_OVERHEAD = 4 * 2**20  # ... plus metrics, histograms and protobuf framing


def fleet_calls() -> frozenset[str]:
    """The call names of the installed Flower's Fleet router (``pull-messages``, ...)."""
    from flwr.superlink.routers.fleet.router import router

    calls = {route.path.removeprefix(router.prefix + "/") for route in router.routes}
    if not calls:
        raise RuntimeError("Flower's Fleet router lists no routes; the gateway cannot serve sites")
    return frozenset(calls)


def body_limit(num_parameters: int) -> int:
    """Largest request body a run needs: the model's arrays (float32) with margin, plus metrics."""
    return int(BODY_MARGIN * 4 * num_parameters) + BODY_OVERHEAD


@dataclass(frozen=True)
class GatewayConfig:
    host: str
    port: int
    upstream: str  # https://127.0.0.1:PORT or http://... (insecure)
    certfile: Path | None = None  # None: plain HTTP (insecure mode)
    keyfile: Path | None = None
    ca_certfile: Path | None = None  # verifies the SuperLink's certificate
    max_body_bytes: int = 64 * 2**20  # `medae server` sets it from the model (`body_limit`)
    handshake_timeout_s: float = 10.0  # TLS handshake
    request_timeout_s: float = 60.0  # headers and body of one request, from its first byte or the last reply
    idle_timeout_s: float = 30.0  # a kept-alive connection with no new request
    max_connections_per_client: int = 16  # SuperNodes hold one or two
    max_connections: int = 512


def build_app(config: GatewayConfig):
    """The gateway as an ASGI app (Starlette, as Flower's own server uses)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    allowed = fleet_calls()
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(config.ca_certfile)) if config.ca_certfile else True
    )
    client = httpx.AsyncClient(base_url=config.upstream, verify=verify, timeout=UPSTREAM_TIMEOUT_S)

    def refuse(request: Request) -> Response:
        log.warning("refused %s %s from %s", request.method, request.url.path,
                    request.client.host if request.client else "?")
        return JSONResponse({"detail": REFUSAL}, status_code=403)

    def too_large() -> Response:
        return JSONResponse({"detail": f"medae gateway: request body over {config.max_body_bytes} bytes"},
                            status_code=413, headers={"connection": "close"})

    async def bounded_body(request: Request) -> bytes | None:
        """The body, or None when it is over the limit (from Content-Length before reading, else as it arrives)."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > config.max_body_bytes:
                return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                return None
        return bytes(body)

    async def forward(request: Request, path: str) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if request.client:
            headers["x-forwarded-for"] = request.client.host
        body = await bounded_body(request)
        if body is None:
            log.warning("refused a body over %d bytes from %s", config.max_body_bytes,
                        request.client.host if request.client else "?")
            return too_large()
        try:
            upstream = await client.request(request.method, path, headers=headers, content=body)
        except httpx.HTTPError as exc:
            log.error("SuperLink unreachable for %s: %s", path, exc)
            return JSONResponse({"detail": "medae gateway: the SuperLink is not reachable"}, status_code=502)
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(upstream.content, status_code=upstream.status_code, headers=out_headers)

    async def fleet(request: Request) -> Response:
        call = request.path_params["call"]
        raw = request.scope.get("raw_path", b"").decode("latin-1")
        if call not in allowed or raw != FLEET_PREFIX + call:
            return refuse(request)
        return await forward(request, FLEET_PREFIX + call)

    async def health(request: Request) -> Response:
        return await forward(request, "/health")

    async def everything_else(request: Request) -> Response:
        return refuse(request)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    return Starlette(
        routes=[
            Route(FLEET_PREFIX + "{call}", fleet, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/{rest:path}", everything_else, methods=methods),
        ],
        lifespan=lifespan,
    )


def guarded_protocol(config: GatewayConfig):
    """uvicorn's h11 protocol with a per-request deadline and a per-client connection cap.

    uvicorn closes idle kept-alive connections (``timeout_keep_alive``) but waits
    for a request's headers and body for ever; this subclass gives each request
    ``request_timeout_s`` from its first byte (or from the previous response) to
    arrive whole, and refuses a client address its ``max_connections_per_client + 1``-th
    connection. Everything else is uvicorn's.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_per_client: Counter[str] = Counter()  # used only on the gateway's event loop thread

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._peer = self.client[0] if self.client else "?"
            self._deadline = None
            if open_per_client[self._peer] >= config.max_connections_per_client:
                log.warning("refused a connection from %s: %d already open", self._peer,
                            open_per_client[self._peer])
                self._peer = None
                transport.abort()
                return
            open_per_client[self._peer] += 1
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if getattr(self, "_peer", None) is not None:
                open_per_client[self._peer] -= 1
                if open_per_client[self._peer] <= 0:
                    del open_per_client[self._peer]
                self._peer = None
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                self._disarm()  # the whole request is in; the reply is the SuperLink's business

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request, if any, gets its own deadline

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(config.request_timeout_s, self._expire)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                log.warning("closed a connection from %s: no complete request within %.0f s", self._peer,
                            config.request_timeout_s)
                self.transport.abort()

    return GuardedH11Protocol


class Gateway:
    """The gateway running in a background thread of `medae server`."""

    def __init__(self, config: GatewayConfig):
        import uvicorn

        self.config = config
        self._server = uvicorn.Server(uvicorn.Config(
            build_app(config),
            host=config.host,
            port=config.port,
            ssl_certfile=str(config.certfile) if config.certfile else None,
            ssl_keyfile=str(config.keyfile) if config.keyfile else None,
            log_level="warning",
            access_log=False,
            lifespan="on",
            http=guarded_protocol(config),
            timeout_keep_alive=int(max(1, config.idle_timeout_s)),
            limit_concurrency=config.max_connections,
        ))
        self._thread = threading.Thread(target=self._run, name="medae-gateway", daemon=True)

    def _run(self) -> None:
        """uvicorn's own loop, with a TLS handshake timeout (asyncio's default is 60 s; uvicorn sets none)."""
        loop = asyncio.new_event_loop()
        if self.config.certfile:
            loop.create_server = functools.partial(loop.create_server,
                                                   ssl_handshake_timeout=self.config.handshake_timeout_s)
        try:
            loop.run_until_complete(self._server.serve())
        finally:
            loop.close()

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"the gateway could not listen on {self.config.host}:{self.config.port} "
                              "(port in use, or not allowed)")
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
