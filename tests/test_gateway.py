"""The public gateway forwards the Fleet API and nothing else (fast; a real upstream HTTP server)."""

from __future__ import annotations

import http.server
import socket
import threading

import httpx
import pytest

from medae.deploy import free_port
from medae.gateway import FLEET_PREFIX, Gateway, GatewayConfig, fleet_calls


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).seen.append((self.command, self.path, dict(self.headers), body))
        payload = b"upstream:" + body
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def gateway():
    _Recorder.seen = []
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gw = Gateway(GatewayConfig(host="127.0.0.1", port=free_port(),
                               upstream=f"http://127.0.0.1:{upstream.server_address[1]}"))
    gw.start()
    yield f"http://127.0.0.1:{gw.config.port}"
    gw.stop()
    upstream.shutdown()


def test_the_allow_list_is_flowers_fleet_router():
    calls = fleet_calls()
    assert {"pull-messages", "push-messages", "activate-node", "get-fab", "pull-object", "push-object"} <= calls
    assert not any("run" in c and c != "get-run" for c in calls)  # no start-run / list-runs among them


def test_fleet_calls_are_forwarded_with_signed_headers_and_body(gateway):
    headers = {"x-flwr-public-key": "cHVi", "x-flwr-signature": "c2ln", "content-type": "application/protobuf"}
    r = httpx.post(gateway + FLEET_PREFIX + "pull-messages", content=b"\x08\x01", headers=headers)
    assert r.status_code == 200 and r.content == b"upstream:\x08\x01"
    method, path, seen_headers, body = _Recorder.seen[-1]
    assert (method, path, body) == ("POST", "/v1/fleet/pull-messages", b"\x08\x01")
    assert seen_headers["x-flwr-public-key"] == "cHVi" and seen_headers["x-flwr-signature"] == "c2ln"


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/pull-artifacts"),
    ("POST", "/v1/control/stop-run"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/runtime/push-task-output"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/fleet/pull-messages"),
    ("POST", "/v1/fleet/not-a-fleet-call"),
])
def test_everything_else_is_refused_without_reaching_the_superlink(gateway, method, path):
    r = httpx.request(method, gateway + path, content=b"x")
    assert r.status_code == 403
    assert "only the Fleet API" in r.json()["detail"]
    assert _Recorder.seen == []


@pytest.mark.parametrize("raw", [
    b"/v1/fleet/../control/start-run",
    b"/v1/fleet/..%2Fcontrol%2Fstart-run",
    b"/v1/fleet/%70ull-messages",  # an encoded allowed name: refused rather than guessed
    b"/v1/fleet//pull-messages",
])
def test_path_tricks_are_refused(gateway, raw):
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST " + raw + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = answer.split(b" ", 2)[1]
    assert status in (b"403", b"404"), answer[:200]
    assert _Recorder.seen == []
