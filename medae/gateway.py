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
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
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


def fleet_calls() -> frozenset[str]:
    """The call names of the installed Flower's Fleet router (``pull-messages``, ...)."""
    from flwr.superlink.routers.fleet.router import router

    calls = {route.path.removeprefix(router.prefix + "/") for route in router.routes}
    if not calls:
        raise RuntimeError("Flower's Fleet router lists no routes; the gateway cannot serve sites")
    return frozenset(calls)


@dataclass(frozen=True)
class GatewayConfig:
    host: str
    port: int
    upstream: str  # https://127.0.0.1:PORT or http://... (insecure)
    certfile: Path | None = None  # None: plain HTTP (insecure mode)
    keyfile: Path | None = None
    ca_certfile: Path | None = None  # verifies the SuperLink's certificate


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

    async def forward(request: Request, path: str) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if request.client:
            headers["x-forwarded-for"] = request.client.host
        try:
            upstream = await client.request(request.method, path, headers=headers, content=await request.body())
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
        ))
        self._thread = threading.Thread(target=self._server.run, name="medae-gateway", daemon=True)

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
