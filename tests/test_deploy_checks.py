"""`medae server` / `medae client` checks that need no running federation (fast)."""

from __future__ import annotations

import pytest

from medae.cli import main
from medae.deploy import (
    ClientOptions,
    DeployError,
    ServerOptions,
    check_server_files,
    prepare_site,
    supernode_argv,
)


@pytest.fixture
def certs(tmp_path):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--server-name", "127.0.0.1"]) == 0
    return out


def test_the_supernode_gets_tls_its_key_and_a_node_config_flower_parses(tmp_path, tiny_benchmark, certs, tiny_cfg):
    from flwr.common.config import parse_config_args

    data = tiny_benchmark / "site-1"
    opts = ClientOptions(server="fl.example.org:9092", data=data, ca=certs / "ca.crt", key=tmp_path / "site-a.key")
    cfg = tiny_cfg.with_overrides({"train.device": "cuda:1"})
    argv = supernode_argv(opts, "site-a", tmp_path / "ledger's path.jsonl", tmp_path / "flower", cfg)
    assert argv[argv.index("--superlink") + 1] == "fl.example.org:9092"
    assert argv[argv.index("--root-certificates") + 1] == str((certs / "ca.crt").resolve())
    assert "--auth-supernode-private-key" in argv and "--insecure" not in argv
    assert not any("runtime-dependency" in a for a in argv)  # offline: Flower's default (no installs) is kept
    node = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert node == {"data-path": str(data.resolve()), "ledger-path": str(tmp_path / "ledger's path.jsonl"),
                    "site-name": "site-a", "allow-no-dp": False, "privacy-unit": "patient", "device": "cuda:1",
                    "image-cache": False}


@pytest.mark.parametrize("name", ['a "quoted" name', "back\\slash and space", "it's"])
def test_awkward_paths_survive_flowers_node_config_parser(tmp_path, name):
    from flwr.common.config import parse_config_args

    from medae.deploy import node_config

    ledger = tmp_path / name / "ledger.jsonl"
    parsed = parse_config_args([node_config("s", tmp_path, ledger, True)])
    assert parsed["ledger-path"] == str(ledger) and parsed["allow-no-dp"] is True


def test_a_path_flower_cannot_carry_is_a_clear_error(tmp_path):
    from medae.deploy import node_config

    with pytest.raises(DeployError, match="both kinds of quote"):
        node_config("s", tmp_path, tmp_path / "it's \"odd\"" / "l.jsonl", False)


def test_the_server_needs_certificates_and_authorized_keys(tmp_path, certs):
    with pytest.raises(DeployError, match="--certs DIR is required"):
        check_server_files(ServerOptions(run_dir=tmp_path / "run", certs=None, authorized_keys=None))
    with pytest.raises(DeployError, match="has no ca.crt"):
        check_server_files(ServerOptions(run_dir=tmp_path / "run", certs=tmp_path, authorized_keys=tmp_path))
    keys = tmp_path / "authorized"
    keys.mkdir()
    with pytest.raises(DeployError, match="no .pub files"):
        check_server_files(ServerOptions(run_dir=tmp_path / "run", certs=certs, authorized_keys=keys))
    assert main(["keys", "--out", str(tmp_path / "k"), "--site", "hospital-a"]) == 0
    (keys / "hospital-a.pub").write_bytes((tmp_path / "k" / "hospital-a.pub").read_bytes())
    files = check_server_files(ServerOptions(run_dir=tmp_path / "run", certs=certs, authorized_keys=keys))
    assert list(files.site_keys) == ["hospital-a"] and files.key.name == "server.key"
    # --insecure needs neither (and says so loudly on the command line)
    assert check_server_files(ServerOptions(run_dir=tmp_path, certs=None, authorized_keys=None, insecure=True)).ca is None


def test_a_site_without_usable_images_does_not_join(tmp_path, tiny_cfg):
    site = tmp_path / "site"
    (site / "train").mkdir(parents=True)
    (site / "train" / "broken.dcm").write_bytes(b"not a dicom file")
    opts = ClientOptions(server="127.0.0.1:1", data=site, ca=None, key=None, site_name="hospital-a", insecure=True)
    with pytest.raises(DeployError, match="no usable training image"):
        prepare_site(tiny_cfg, opts)


def test_the_ledger_may_not_live_in_the_data_folder(tmp_path, tiny_benchmark, tiny_cfg):
    from medae_core.errors import PrivacyError

    data = tiny_benchmark / "site-2"
    opts = ClientOptions(server="127.0.0.1:1", data=data, ca=None, key=None, site_name="hospital-b",
                         ledger=data / "ledger.jsonl", insecure=True)
    with pytest.raises(PrivacyError, match="inside the data folder"):
        prepare_site(tiny_cfg, opts)
    assert not (data / "ledger.jsonl").exists()


def test_the_client_creates_the_sites_ledger_with_its_own_budget_before_joining(tmp_path, tiny_benchmark, tiny_cfg):
    from medae_core.privacy import PrivacyLedger

    opts = ClientOptions(server="127.0.0.1:1", data=tiny_benchmark / "site-3", ca=None, key=tmp_path / "hosp-c.key",
                         ledger=tmp_path / "ledgers" / "c.jsonl")
    site, ledger, report = prepare_site(tiny_cfg.with_overrides({"privacy.budget_epsilon": 3.0}), opts)
    assert site == "hosp-c"  # from the key file's name
    assert PrivacyLedger.open(ledger).budget_epsilon == 3.0
    assert report["parts"]["train"]["usable_images"] > 0


def test_cli_refuses_to_start_a_client_without_ca_or_key(tmp_path, tiny_benchmark, capsys):
    rc = main(["client", "--server", "127.0.0.1:1", "--data", str(tiny_benchmark / "site-1")])
    assert rc == 2
    assert "--ca is required" in capsys.readouterr().err


def test_sigterm_to_medae_client_stops_its_supernode(tmp_path, tiny_benchmark):
    """`docker stop` / kill send SIGTERM to medae only; the SuperNode it started (own session) must go too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from medae.deploy import free_port

    home = tmp_path / "home"
    env = dict(os.environ, MEDAE_HOME=str(home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "medae", "client", "--insecure", "--site-name", "s", "--server",
         f"127.0.0.1:{free_port()}", "--data", str(tiny_benchmark / "site-1")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def supernodes() -> list[int]:
        pids = []
        for p in os.listdir("/proc"):
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read()
                environ = open(f"/proc/{p}/environ", "rb").read()
            except OSError:
                continue
            if b"flower-supernode" in cmd and f"MEDAE_HOME={home}".encode() in environ:
                pids.append(int(p))
        return pids

    try:
        deadline = time.monotonic() + 60
        while not supernodes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert supernodes(), "the client never started its SuperNode"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 15
        while supernodes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert supernodes() == []
    finally:
        for pid in supernodes():
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
