"""A site runs only its own medae: app packages that carry code are refused before anything runs.

Unit tests check `check_fab` on FABs built by Flower's own builder. The
end-to-end test runs a real SuperLink (loopback, insecure) and a real
``medae client``, submits a FAB whose ``client/app.py`` writes a file when
imported, and checks the site refused it and nothing from it ran. The same
FAB against a plain Flower SuperNode (no medae guard) writes the file: the
attack is real, and the test could fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medae.deploy import CONNECTION, flower_env, flower_tool, free_port, write_connection
from medae.app_manifest import write_app
from medae.site_guard import FabRefused, check_fab

# The attacker's client/app.py: a valid ClientApp (`flwr run` checks that on the coordinator) that
# writes a file when imported anywhere but on the coordinator that submits it.
PAYLOAD = """import os
from pathlib import Path
from flwr.clientapp import ClientApp

app = ClientApp()
if os.environ.get("FLWR_HOME") != {coordinator!r}:
    Path({marker!r}).write_text("the coordinator ran code at this site")
"""


def _fab(app_dir: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def _medae_app(tmp_path: Path, cfg) -> Path:
    return write_app(cfg, tmp_path / "run")


def _hostile_app(tmp_path: Path, cfg, marker: Path, coordinator: Path | None = None) -> Path:
    app = write_app(cfg, tmp_path / "hostile-run")
    (app / "client").mkdir()
    (app / "client" / "__init__.py").write_text("")
    (app / "client" / "app.py").write_text(PAYLOAD.format(marker=str(marker), coordinator=str(coordinator)))
    return app


def test_medaes_own_package_is_accepted_and_one_with_code_is_refused(tmp_path, tiny_cfg):
    own = _fab(_medae_app(tmp_path, tiny_cfg))
    digest = check_fab(own)
    assert len(digest) == 64
    assert check_fab(own, approved=frozenset({digest})) == digest
    with pytest.raises(FabRefused, match="not on this site's list"):
        check_fab(own, approved=frozenset({"0" * 64}))
    hostile = _fab(_hostile_app(tmp_path, tiny_cfg, tmp_path / "marker"))
    with pytest.raises(FabRefused, match="carries files .*client/app.py"):
        check_fab(hostile)
    with pytest.raises(FabRefused, match="not a readable FAB"):
        check_fab(b"not a zip")


def test_a_manifest_pointing_at_other_code_is_refused(tmp_path, tiny_cfg):
    app = _medae_app(tmp_path, tiny_cfg)
    manifest = app / "pyproject.toml"
    manifest.write_text(manifest.read_text().replace('clientapp = "client.app:app"', 'clientapp = "os:system"'))
    with pytest.raises(FabRefused, match="names components"):
        check_fab(_fab(app))


def _wait_for(predicate, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[:3]} exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _stop(*procs) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        if proc is None:
            continue
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _submit(flower_home: Path, app: Path) -> None:
    done = subprocess.run([flower_tool("flwr"), "run", str(app), CONNECTION, "--format", "json"],
                          env=flower_env(flower_home), capture_output=True, text=True, timeout=120, cwd=app)
    assert done.returncode == 0 and "\"success\": true" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_site_refuses_a_package_with_code_and_nothing_from_it_runs(tmp_path, tiny_benchmark, tiny_cfg):
    cfg = tiny_cfg.with_overrides({"federation.rounds": 1, "federation.min_sites": 1})
    port = free_port()
    coordinator = tmp_path / "coordinator"
    write_connection(coordinator, f"127.0.0.1:{port}", None)
    logs = tmp_path / "logs"
    logs.mkdir()

    def spawn(name: str, argv: list[str], env: dict) -> subprocess.Popen:
        return subprocess.Popen(argv, env=env, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    superlink = spawn("superlink", [flower_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                    str(port), "--isolation", "subprocess",
                                    "--disable-runtime-dependency-installation"], flower_env(coordinator))
    site = client = None
    try:
        _wait_for(lambda: "Starting" in (logs / "superlink.log").read_text() or
                  "running" in (logs / "superlink.log").read_text().lower(), 60, "the SuperLink", [superlink])
        time.sleep(2)
        # 1. A medae site: the package is refused, the payload never runs.
        marker = tmp_path / "guarded-marker"
        home = tmp_path / "site-home"
        client = spawn("client", [sys.executable, "-m", "medae", "client", "--insecure", "--server",
                                  f"127.0.0.1:{port}", "--site-name", "hospital-x", "--data",
                                  str(tiny_benchmark / "site-1")],
                       dict(os.environ, MEDAE_HOME=str(home)))
        superexec_log = home / "logs" / "hospital-x-superexec.log"
        _wait_for(superexec_log.exists, 120, "the site's SuperExec", [client])
        _submit(coordinator, _hostile_app(tmp_path, cfg, marker, coordinator))
        _wait_for(lambda: "refused" in superexec_log.read_text(), 180, "the refusal", [client])
        time.sleep(3)
        assert not marker.exists()
        assert "client/app.py" in superexec_log.read_text()
        assert not list((home / "flower").rglob("client/app.py"))  # not even unpacked
        _stop(client)
        client = None

        # 2. The same package at a plain Flower SuperNode (no guard) runs its payload.
        unguarded = tmp_path / "unguarded-marker"
        site_home = tmp_path / "plain-site"
        site = spawn("plain-supernode", [flower_tool("flower-supernode"), "--insecure", "--superlink",
                                         f"127.0.0.1:{port}", "--isolation", "subprocess", "--port",
                                         str(free_port())], flower_env(site_home))
        time.sleep(3)
        _submit(coordinator, _hostile_app(tmp_path / "again", cfg, unguarded, coordinator))
        _wait_for(unguarded.exists, 180, "the unguarded site to run the payload", [site])
    finally:
        _stop(client, site, superlink)

