"""`medae client`: check the site's data and ledger, trust the server, and keep its guarded SuperNode running."""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medae.deploy.common import (
    RESTART_DELAY_S,
    DeployError,
    ManagedProcess,
    flower_env,
    flower_tool,
    free_port,
    split_address,
)
from medae_core.config import RunConfig

log = logging.getLogger("medae.deploy")


@dataclass
class ClientOptions:
    server: str
    data: Path
    ca: Path | None
    key: Path | None
    site_name: str | None = None
    ledger: Path | None = None
    insecure: bool = False
    allow_no_dp: bool = False
    runtime_port: int | None = None  # the SuperNode's local runtime API (loopback); default: a free port
    max_wait_s: float | None = None  # one SuperNode gives up after this long without the server
    once: bool = False  # stop when the SuperNode stops, instead of starting a new one
    approved_fabs: Path | None = None  # a file of app package hashes this site approved (None: any code-free one)
    image_cache: bool = False  # keep decoded images in this machine's image cache (`medae_core.data.cache`)


def site_name_of(opts: ClientOptions) -> str:
    from medae.pki import SITE_NAME

    name = opts.site_name or (opts.key.stem if opts.key else None)
    if not name:
        raise DeployError("--site-name is required without --key (the name the coordinator sees)")
    if not SITE_NAME.match(name):
        raise DeployError(f"site name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def check_server_certificate(server: str, ca: Path, timeout_s: float = 10.0) -> bool:
    """True when the server's TLS certificate is signed by ``ca`` and names the host; False when unreachable.

    Raises DeployError (with what to do) when the certificate is not trusted.
    """
    host, port = split_address(server)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError as exc:
        raise DeployError(
            f"the server at {server} is not trusted: its certificate {exc.verify_message} with the CA "
            f"{ca}. Check that --ca is the federation's ca.crt from the coordinator and that the server "
            f"certificate was made for the name {host!r} (`medae certs --server-name {host}`). Not connecting."
        ) from None
    except ssl.SSLError as exc:
        raise DeployError(f"TLS with the server at {server} failed ({exc.reason}); is it a medae server "
                          "started with --certs (not --insecure)?") from None
    except OSError as exc:
        log.warning("the server at %s is not reachable yet (%s); the site will keep trying", server, exc)
        return False


def prepare_site(cfg: RunConfig, opts: ClientOptions) -> tuple[str, Path, dict]:
    """Check the data and open (or create) the ledger before joining: (site, ledger path, data report)."""

    from medae_core.data import check_data
    from medae_core.privacy import PrivacyLedger, check_ledger_location, default_ledger_path

    site = site_name_of(opts)
    if not opts.data.is_dir():
        raise DeployError(f"--data {opts.data} is not a folder")
    report = check_data(opts.data, cfg.data, cfg.model.image_size)
    train = report["parts"]["train"]["usable_images"]
    if train < 1:
        raise DeployError(
            f"no usable training image in {opts.data} ({len(report['skipped'])} files skipped); this site cannot "
            "train, so it does not join. Run `medae check-data` on the folder for every reason."
        )
    ledger_path = (opts.ledger or default_ledger_path(site)).expanduser().resolve()
    check_ledger_location(ledger_path, opts.data)
    if cfg.privacy.enabled:
        PrivacyLedger.for_config(cfg.privacy, site=site, path=ledger_path)
    return site, ledger_path, report


def node_config(site: str, data: Path, ledger: Path, allow_no_dp: bool, privacy_unit: str = "patient",
                device: str = "auto", image_cache: bool = False) -> str:
    """The SuperNode's ``--node-config`` string: the site's paths, name and privacy policy.

    Paths never leave the site. ``allow-no-dp`` and ``privacy-unit`` are the
    site's own policy, which the ClientApp enforces against the server's run;
    ``device`` (auto, cpu, cuda, cuda:N) is the site's hardware choice, and
    ``image-cache`` whether decoded images may be kept on this machine (the run's
    ``data.cache`` is ignored at a deployed site).
    """
    from medae_core import contract as c

    pairs = {
        c.NODE_DATA_PATH: str(data.resolve()),
        c.NODE_LEDGER_PATH: str(ledger),
        c.NODE_SITE_NAME: site,
        c.NODE_ALLOW_NO_DP: allow_no_dp,
        c.NODE_PRIVACY_UNIT: privacy_unit,
        c.NODE_DEVICE: device,
        c.NODE_IMAGE_CACHE: image_cache,
    }
    return " ".join(f"{k}={_node_value(v)}" for k, v in pairs.items())


def _node_value(value: str | bool) -> str:
    """A TOML value that Flower's ``--node-config`` parser (one quoted string, no escaped quotes) reads back."""
    from medae.app_manifest import toml_value

    if isinstance(value, bool):
        return toml_value(value)
    if "\n" in value or ('"' in value and "'" in value):
        raise DeployError(f"{value!r}: Flower's --node-config cannot carry a path with a line break or with both "
                          "kinds of quote; use another folder name (or a symlink)")
    return f"'{value}'" if '"' in value else toml_value(value)  # a TOML literal string keeps " as it is


# What the SuperNode prints when the SuperLink refuses its key, and when TLS fails.
_REFUSED = ("Failed to activate SuperNode", "Invalid SuperNode authentication", "status code 401")
_TLS = ("CERTIFICATE_VERIFY_FAILED", "SSL/TLS handshake error")


def supernode_argv(opts: ClientOptions, site: str, ledger: Path, flower_home: Path, cfg: RunConfig,
                   runtime_port: int | None = None) -> list[str]:
    """The SuperNode: process isolation, so that its ClientApps are the ones `superexec_argv` starts."""
    node = node_config(site, opts.data, ledger, opts.allow_no_dp, cfg.privacy.unit, cfg.train.device,
                       opts.image_cache)
    argv = [flower_tool("flower-supernode"), "--superlink", opts.server, "--node-config", node,
            "--isolation", "process", "--port", str(runtime_port or opts.runtime_port or free_port())]
    if opts.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(opts.ca.resolve()), "--auth-supernode-private-key", str(opts.key.resolve())]
    if opts.max_wait_s:
        argv += ["--max-wait-time", str(opts.max_wait_s)]
    return argv


def superexec_argv(runtime_port: int, supernode_pid: int) -> list[str]:
    """medae's SuperExec for the SuperNode on ``runtime_port``: it checks every app package first (`medae.site_guard`).

    The SuperNode's runtime API is on loopback; like Flower's own subprocess mode,
    the SuperExec talks to it without TLS.
    """
    return [sys.executable, "-m", "medae.site_guard", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--insecure", "--parent-pid", str(supernode_pid)]


def check_client_files(opts: ClientOptions) -> None:
    if opts.insecure:
        return
    for flag, path in (("--ca", opts.ca), ("--key", opts.key)):
        if path is None:
            raise DeployError(f"{flag} is required (or --insecure for a closed test network)")
        if not path.is_file():
            raise DeployError(f"{flag} {path} does not exist")
    if opts.key.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; `chmod 600 %s`", opts.key, opts.key)


def join(cfg: RunConfig, opts: ClientOptions, *, home: Path, echo=None, on_start=None) -> int:
    """Run this site's SuperNode; start it again whenever it stops, unless ``opts.once``.

    A SuperNode ends when it loses its server (a restart, a network cut); the
    site stays available by starting a new one after `RESTART_DELAY_S`. A
    refused key or an untrusted server certificate ends `join` with an error:
    retrying cannot fix either.
    """
    check_client_files(opts)
    site, ledger, report = prepare_site(cfg, opts)
    if on_start:
        on_start(site, ledger, report)
    flower_home = home / "flower" / site
    flower_home.mkdir(parents=True, exist_ok=True)
    while True:
        if not opts.insecure:
            check_server_certificate(opts.server, opts.ca)
        rc, node = _run_supernode(opts, site, ledger, flower_home, home, echo, cfg)
        text = node.output()
        if any(marker in text for marker in _REFUSED):
            raise DeployError(
                f"the server refused site {site}: its key is not authorized there. Send "
                f"{opts.key.with_suffix('.pub')} to the coordinator, who adds it to the server's --authorized-keys "
                "folder and restarts the server."
            )
        if any(marker in text for marker in _TLS):
            raise DeployError(f"TLS with {opts.server} failed: the server's certificate is not trusted with "
                              f"--ca {opts.ca}")
        if opts.once:
            if rc != 0:
                raise DeployError(f"the SuperNode stopped (exit code {rc}); log: {node.log_path}")
            return 0
        log.warning("the SuperNode stopped (exit code %s: the server is gone or restarting); starting it again in "
                    "%.0f s. Ctrl-C to leave the federation.", rc, RESTART_DELAY_S)
        time.sleep(RESTART_DELAY_S)


def _run_supernode(opts, site, ledger, flower_home, home, echo, cfg) -> tuple[int, ManagedProcess]:
    port = opts.runtime_port or free_port()
    env = flower_env(flower_home)
    if opts.approved_fabs:
        from medae.site_guard import APPROVED_FABS_ENV

        env[APPROVED_FABS_ENV] = str(Path(opts.approved_fabs).resolve())
    node = ManagedProcess("supernode", supernode_argv(opts, site, ledger, flower_home, cfg, port), env,
                          home / "logs" / f"{site}-supernode.log", echo=echo)
    superexec = None
    try:
        superexec = ManagedProcess("superexec", superexec_argv(port, node.proc.pid), env,
                                   home / "logs" / f"{site}-superexec.log", echo=echo)
        rc = node.wait()
    finally:  # after Ctrl-C too: never leave a SuperNode, its SuperExec or their ClientApps behind
        if superexec is not None:
            superexec.stop()
        node.stop()
    return rc, node
