"""The public gateway forwards the Fleet API and nothing else (fast; a real upstream HTTP server)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time

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


# -- load and attacks: all on loopback, each bounded by a few seconds ----------------------
LIMIT = 2**20
REQUEST_TIMEOUT = 1.5
ATTACKER, BYSTANDER = "127.0.0.2", "127.0.0.3"  # other loopback addresses, each its own client


@pytest.fixture
def guarded(tmp_path):
    """A gateway with small limits, plain HTTP and over TLS."""
    from medae.pki import make_certs

    _Recorder.seen = []
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    certs = make_certs(tmp_path / "certs", ["127.0.0.1"])
    common = dict(host="127.0.0.1", upstream=f"http://127.0.0.1:{upstream.server_address[1]}",
                  max_body_bytes=LIMIT, request_timeout_s=REQUEST_TIMEOUT, idle_timeout_s=1.0,
                  handshake_timeout_s=1.0, max_connections_per_client=4)
    plain = Gateway(GatewayConfig(port=free_port(), **common))
    tls = Gateway(GatewayConfig(port=free_port(), certfile=certs["server_cert"], keyfile=certs["server_key"],
                                **common))
    plain.start()
    tls.start()
    yield plain.config.port, tls.config.port
    plain.stop()
    tls.stop()
    upstream.shutdown()


def _connect(port: int, source: str = ATTACKER) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.settimeout(10)
    return s


def _closed_after(s: socket.socket, keep_sending: bytes = b"", every: float = 0.2) -> float:
    """Seconds until the server closes ``s`` (trickling ``keep_sending`` a byte at a time meanwhile)."""
    start = time.monotonic()
    s.settimeout(every if keep_sending else 10)
    for i in range(10_000):
        try:
            if keep_sending:
                s.send(keep_sending[i % len(keep_sending):][:1])
            if s.recv(65536) == b"":
                break
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            break
        if time.monotonic() - start > 20:
            break
    return time.monotonic() - start


def _status(s: socket.socket) -> bytes:
    answer = b""
    while b"\r\n" not in answer:
        chunk = s.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer.split(b" ", 2)[1] if answer else b""


def test_an_oversized_body_gets_413_before_any_of_it_is_read(guarded):
    port, _ = guarded
    with _connect(port) as s:
        s.sendall(b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\nabc")
        assert _status(s) == b"413"
    with _connect(port) as s:  # chunked: counted as it arrives, cut off at the limit
        s.sendall(b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
        with contextlib.suppress(OSError):
            for _ in range(2 * LIMIT // 65536):
                s.sendall(chunk)
        assert _status(s) == b"413"
    assert _Recorder.seen == []


def test_idle_slowloris_and_stalled_body_connections_are_closed_within_the_timeout(guarded):
    port, tls_port = guarded
    idle = _connect(port)
    slow = _connect(port)
    stalled = _connect(port)
    tls_idle = _connect(tls_port)  # TCP open, no ClientHello
    stalled.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
    results = {}
    threads = [threading.Thread(target=lambda n=n, s=s, k=k: results.__setitem__(n, _closed_after(s, k)))
               for n, s, k in (("idle", idle, b""), ("slowloris", slow, b"GET /health HTTP/1.1\r\nX-a: "),
                               ("stalled body", stalled, b""), ("TLS idle", tls_idle, b""))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in (idle, slow, stalled, tls_idle):
        s.close()
    assert set(results) == {"idle", "slowloris", "stalled body", "TLS idle"}
    assert all(seconds < REQUEST_TIMEOUT + 2.0 for seconds in results.values()), results


def test_one_address_cannot_take_all_connections_and_health_answers_during_the_attack(guarded):
    port, _ = guarded
    held = [_connect(port) for _ in range(4)]
    try:
        extra = _connect(port)
        assert _closed_after(extra) < 1.0  # the fifth from the same address is dropped at once
        extra.close()
        with _connect(port, source=BYSTANDER) as s:  # another site still gets in
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _status(s) == b"200"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        for s in held:
            s.close()


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_returns_near_its_baseline_after_large_bodies(guarded):
    port, _ = guarded
    httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    baseline = _rss_mb()
    block = b"\0" * 2**20
    for _ in range(3):  # the 200 MB POST of the issue, three times
        with _connect(port) as s:
            s.sendall(b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n")
            with contextlib.suppress(OSError):
                for _ in range(200):
                    s.sendall(block)
    time.sleep(0.5)
    assert _rss_mb() - baseline < 64
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
