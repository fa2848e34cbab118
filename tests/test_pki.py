"""`medae certs` and `medae keys`: valid, verifiable material, owner-only keys, never overwritten."""

import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from medae.cli import main


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_make_a_ca_that_signs_the_server_certificate(tmp_path):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--server-name", "fl.hospital.example", "--server-name",
                 "127.0.0.1"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The given names, plus the loopback names the coordinator's own processes use (no duplicates).
    assert names.get_values_for_type(x509.DNSName) == ["fl.hospital.example", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key((out / "server.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in ("ca.key", "server.key"):
        assert _mode(out / private) == 0o600


def test_site_keys_are_what_a_flower_supernode_loads(tmp_path):
    assert main(["keys", "--out", str(tmp_path), "--site", "hospital-a"]) == 0
    private = load_ssh_private_key((tmp_path / "hospital-a.key").read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    public = load_ssh_public_key((tmp_path / "hospital-a.pub").read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert _mode(tmp_path / "hospital-a.key") == 0o600


def test_nothing_is_overwritten_and_bad_input_is_refused(tmp_path, capsys):
    assert main(["keys", "--out", str(tmp_path), "--site", "hospital-a"]) == 0
    before = (tmp_path / "hospital-a.key").read_bytes()
    assert main(["keys", "--out", str(tmp_path), "--site", "hospital-a"]) == 2
    assert (tmp_path / "hospital-a.key").read_bytes() == before
    assert "never overwrites" in capsys.readouterr().err
    assert main(["keys", "--out", str(tmp_path), "--site", "../etc"]) == 2
    assert main(["certs", "--out", str(tmp_path / "c")]) == 2
