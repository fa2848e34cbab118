"""Figures for RELIABILITY.md: hostile files and a loaded gateway, with medae's defaults.

    python benchmarks/reliability.py [--out runs/reliability]

1. The hostile corpus (`tests/hostile_corpus.py`: 11 files of 0.5 kB-2 MB that
   claim or inflate to 1-60 GB) scanned by ``medae check-data`` in a
   subprocess: peak resident memory, seconds, every skip reason.
2. The public gateway with its default limits (`medae.gateway.GatewayConfig`)
   in front of a trivial upstream, attacked over loopback: seconds until idle,
   slowloris, stalled-body and TLS-idle connections are closed; the status and
   latency of a 200 MB POST; the gateway process's resident memory before and
   after three of them; whether /health answers while one address holds its
   connection cap.

Writes OUT/reliability.json and prints it. Takes about 2 minutes (the default
request timeout is 60 s). Loopback only; every connection is closed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEASURE = textwrap.dedent(
    """
    import json, sys, time
    from medae.cli import main
    start = time.perf_counter()
    code = main(sys.argv[1:])
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_mb": hwm / 1024}),
          file=sys.stderr)
    """
)


def hostile_files(work: Path) -> dict:
    from tests.hostile_corpus import write_corpus

    site = work / "site"
    corpus = write_corpus(site / "train")
    proc = subprocess.run([sys.executable, "-c", MEASURE, "check-data", str(site), "--json"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    usage = json.loads(proc.stderr.strip().splitlines()[-1])
    report = json.loads(proc.stdout)
    return {
        "files": {name: {"bytes": (site / "train" / name).stat().st_size,
                         "reason": next(s["reason"] for s in report["skipped"] if s["path"].endswith(name))}
                  for name in corpus},
        "peak_mb": round(usage["peak_mb"], 1),
        "seconds": round(usage["seconds"], 2),
    }


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET

    def log_message(self, *args):
        pass


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _closed_after(s: socket.socket, trickle: bytes = b"", limit_s: float = 200.0) -> float:
    start = time.monotonic()
    s.settimeout(0.5 if trickle else limit_s)
    i = 0
    while time.monotonic() - start < limit_s:
        try:
            if trickle:
                s.send(trickle[i % len(trickle):][:1])
                i += 1
            if s.recv(65536) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    return round(time.monotonic() - start, 1)


def gateway_under_attack(work: Path) -> dict:
    from medae.deploy import free_port
    from medae.gateway import Gateway, GatewayConfig
    from medae.pki import make_certs

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    certs = make_certs(work / "certs", ["127.0.0.1"])
    config = GatewayConfig(host="127.0.0.1", port=free_port(), upstream=f"http://127.0.0.1:{upstream.server_address[1]}",
                           certfile=certs["server_cert"], keyfile=certs["server_key"])
    plain = GatewayConfig(host="127.0.0.1", port=free_port(), upstream=config.upstream)
    gateways = [Gateway(config), Gateway(plain)]
    for g in gateways:
        g.start()
    out: dict = {"limits": {k: getattr(config, k) for k in ("max_body_bytes", "handshake_timeout_s",
                                                             "request_timeout_s", "idle_timeout_s",
                                                             "max_connections_per_client", "max_connections")}}
    try:
        def connect(port, source="127.0.0.2"):
            return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))

        attacks = {
            "TLS idle (no ClientHello)": (config.port, b"", b""),
            "idle after connect": (plain.port, b"", b""),
            "slowloris (1 header byte / 0.5 s)": (plain.port, b"", b"GET /health HTTP/1.1\r\nX-a: "),
            "stalled body": (plain.port, b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Length: 1000\r\n\r\n0123", b""),
        }
        closed: dict = {}
        sockets = []

        def run(name, port, first, trickle):
            s = connect(port)
            sockets.append(s)
            if first:
                s.sendall(first)
            closed[name] = _closed_after(s, trickle)

        threads = [threading.Thread(target=run, args=(n, *a)) for n, a in attacks.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        out["seconds_until_closed"] = closed

        baseline = _rss_mb()
        posts = []
        block = b"\0" * 2**20
        for _ in range(3):
            with connect(plain.port) as s:
                start = time.monotonic()
                s.sendall(b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n")
                sent = 0
                with contextlib.suppress(OSError):
                    for _ in range(200):
                        s.sendall(block)
                        sent += 1
                s.settimeout(10)
                try:
                    status = s.recv(4096).split(b" ", 2)[1].decode()
                except (OSError, IndexError):
                    status = "closed"
                posts.append({"status": status, "seconds": round(time.monotonic() - start, 2), "mb_sent": sent})
        time.sleep(1)
        out["post_200mb"] = posts
        out["rss_mb"] = {"before": round(baseline, 1), "after_three_200mb_posts": round(_rss_mb(), 1)}

        held = [connect(plain.port) for _ in range(config.max_connections_per_client)]
        extra = connect(plain.port)
        out["connection_over_the_cap_closed_after_s"] = _closed_after(extra, limit_s=10)
        import httpx

        t = time.monotonic()
        status = httpx.get(f"http://127.0.0.1:{plain.port}/health", timeout=10).status_code
        out["health_while_one_address_holds_its_cap"] = {"status": status,
                                                          "seconds": round(time.monotonic() - t, 3)}
        for s in held + sockets + [extra]:
            s.close()
    finally:
        for g in gateways:
            g.stop()
        upstream.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/reliability"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"hostile_files": hostile_files(Path(tmp)), "gateway": gateway_under_attack(Path(tmp))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
