"""What the coordinator and a site share: ports, Flower's tools and environment, and how child processes are run."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import psutil

from medae_core.errors import MedaeError

DEFAULT_PORT = 9092
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
RESTART_DELAY_S = 10.0
CONNECTION = "medae"  # the name of the loopback SuperLink connection in RUN/.flower/config.toml
INSECURE_WARNING = (
    "INSECURE MODE: no TLS and no site authentication. Model updates cross the network in clear text and any "
    "machine that reaches the server can join the federation. Use only for a test on a closed network."
)


class DeployError(MedaeError):
    """A server or site cannot start, or the run failed."""


def flower_tool(name: str) -> str:
    """Path of a Flower console script installed next to this Python (``flower-superlink``...)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    from shutil import which

    found = which(name)
    if not found:
        raise DeployError(f"{name} not found; is flwr installed in this environment?")
    return found


def flower_env(flower_home: Path) -> dict[str, str]:
    """Environment for Flower processes: own home, no telemetry, and this Python's scripts first on PATH.

    Flower starts its helpers (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``) by name, so they must resolve to this environment's
    copies even when the virtualenv is not activated.
    """
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)
    env.update({
        "PATH": os.pathsep.join([scripts, env.get("PATH", "")]),
        "FLWR_HOME": str(flower_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise DeployError(f"server address {address!r}: expected HOST:PORT, e.g. fl.example.org:{DEFAULT_PORT}")
    return host.strip("[]"), int(port)


class ManagedProcess:
    """A child process in its own process group; output to a log file and a ring buffer."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 echo: Callable[[str], None] | None = None):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.tail: deque[str] = deque(maxlen=200)
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", start_new_session=True, preexec_fn=_die_with_parent,
        )
        self._echo = echo
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = ANSI_ESCAPE.sub("", line)  # Flower colours its output; log files stay plain text
            self._log.write(line)
            self._log.flush()
            line = line.rstrip("\n")
            self.tail.append(line)
            if self._echo:
                self._echo(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return "\n".join(self.tail)

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout=5)
        return rc

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the process and everything it started, in any session.

        Flower starts its helpers (SuperExec, ServerApp, ClientApps) in sessions
        of their own, out of reach of a process-group signal; they are found as
        descendants before the parent goes (after that they are re-parented).
        """
        family = descendants(self.proc.pid)
        if self.alive():
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)  # children that outlived their parent
        if self.alive():
            self.proc.wait(5)
        stop_processes(family, grace_s=5.0)
        self._reader.join(timeout=5)
        self._log.close()


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (empty when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_processes(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL what is left."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _die_with_parent() -> None:
    """In the child, before exec (Linux): get SIGTERM when medae dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
