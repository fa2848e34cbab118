"""docker/: the image and the one-host federation (server + three sites) in docker/compose.yaml.

No Docker engine is needed: the compose file is read with PyYAML, its variables are replaced by their
defaults the way Compose does, and the result is checked for structure, isolation (what each container
sees and may write) and against the Compose Specification schema shipped in docker/compose-spec.json.
The commands the containers run are parsed with medae's own argument parser, so a flag the CLI does not
have fails here rather than in a container.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from medae.cli import build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
SCHEMA = DOCKER / "compose-spec.json"
ENV_EXAMPLE = DOCKER / ".env.example"
README = DOCKER / "README.md"

SITES = {"site-a": "site-1", "site-b": "site-2", "site-c": "site-3"}
PORT = 9092

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?-)?(?P<default>[^}]*)\})")


def interpolate(value, env: dict[str, str] | None = None):
    """Replace ${VAR:-default} as Compose does, here with the defaults (or `env`); recursive."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name")
        if name in env and (env[name] or m.group("op") != ":-"):
            return env[name]
        if m.group("op") is None:
            raise AssertionError(f"${{{name}}} in compose.yaml has no default: `docker compose config` needs it set")
        return m.group("default")

    return _VAR.sub(sub, value)


def variables(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("default") for m in _VAR.finditer(text) if m.group("name")}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return interpolate(raw)


def mounts(service: dict) -> list[dict]:
    """Every volume of a service in long form: type, source, target, read_only."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            mode = parts[2].split(",") if len(parts) > 2 else []
            kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode})
        else:
            out.append({"type": v["type"], "source": v.get("source"), "target": v["target"],
                        "read_only": bool(v.get("read_only", False))})
    return out


def host_path(source: str) -> Path:
    """A bind source as the host path Compose uses (relative to the compose file's folder)."""
    return (DOCKER / source).resolve()


def bind(service: dict, suffix: str) -> dict:
    """The one bind mount whose host path ends with `suffix` (e.g. 'certs/ca.crt')."""
    found = [m for m in mounts(service) if m["type"] == "bind" and host_path(m["source"]).as_posix().endswith(suffix)]
    assert len(found) == 1, f"expected one bind mount of .../{suffix}, found {found}"
    return found[0]


def parse(service: dict):
    """The service's command as `medae COMMAND ...`, parsed by medae's real parser."""
    assert "entrypoint" not in service, "the image's ENTRYPOINT (medae) must not be overridden"
    command = service["command"]
    if isinstance(command, str):
        command = shlex.split(command)
    argv = [str(c) for c in command]
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's error (printed above): a flag or subcommand medae does not have
        raise AssertionError(f"`medae {shlex.join(argv)}` is rejected by medae's argument parser") from exc


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not current):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current.strip())
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for inst, args in dockerfile_instructions():
        if inst == "ENV":
            env.update(dict(tok.split("=", 1) for tok in shlex.split(args)))
    return env


# -- the compose file ---------------------------------------------------------------
def test_compose_spec_file_has_four_services_and_no_version_key(raw):
    assert "version" not in raw, "the top-level `version:` key is obsolete in the Compose Specification"
    assert set(raw["services"]) == {"server", *SITES}


def test_compose_validates_against_the_compose_spec_schema(compose):
    schema = json.loads(SCHEMA.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    # The schema does reject what Compose rejects: a misspelt key, a wrong type.
    broken = copy.deepcopy(compose)
    broken["services"]["server"]["read_onyl"] = True
    broken["services"]["site-a"]["depends_on"] = {"server": {"condition": "when_ready"}}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_one_image_built_from_docker_dockerfile(compose):
    for name, service in compose["services"].items():
        assert service["image"] == "medae:cpu", name
        build = service["build"]
        assert build["context"] == ".." and build["dockerfile"] == "docker/Dockerfile", name
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert "entrypoint" not in service, name


def test_only_the_server_publishes_a_port_and_only_the_gateway(compose):
    services = compose["services"]
    for site in SITES:
        assert not services[site].get("ports"), f"{site} must not publish a port (sites only dial out)"
        assert services[site].get("network_mode") != "host", site
    ports = services["server"]["ports"]
    assert len(ports) == 1
    port = ports[0]
    if isinstance(port, str):
        host, container = port.rsplit(":", 1)
        host_port = int(host.rsplit(":", 1)[-1])
    else:
        host_port, container = int(port["published"]), port["target"]
    assert int(container) == PORT, "only the Fleet API gateway (9092) may be published, never the SuperLink"
    assert host_port == PORT
    assert services["server"].get("network_mode") != "host"


def test_data_certificates_and_keys_are_mounted_read_only(compose):
    writable = []
    for name, service in compose["services"].items():
        for m in mounts(service):
            if m["type"] == "bind" and not m["read_only"]:
                writable.append((name, m["target"]))
    assert writable == [("server", "/runs")], f"only the server's run folder may be a writable bind: {writable}"
    runs = bind(compose["services"]["server"], "deploy/runs")
    assert host_path(runs["source"]) == ROOT / "deploy" / "runs"


def test_each_site_sees_only_ca_crt_its_own_key_and_its_data(compose):
    for site, folder in SITES.items():
        service = compose["services"][site]
        binds = {host_path(m["source"]) for m in mounts(service) if m["type"] == "bind"}
        deploy = ROOT / "deploy"
        expected = {deploy / "certs" / "ca.crt", deploy / "site-keys" / f"{site}.key", deploy / "data" / folder}
        assert binds == expected, site
        for m in mounts(service):
            assert m["type"] in ("bind", "volume"), (site, m)
            assert not any(secret in m["source"] for secret in ("ca.key", "server.key", "server.crt")), (site, m)
            others = [o for o in SITES if o != site]
            assert not any(o in m["source"] or o in m["target"] for o in others), (site, m)


def test_server_sees_its_certificate_the_ca_crt_and_the_public_keys_only(compose):
    service = compose["services"]["server"]
    deploy = ROOT / "deploy"
    binds = {host_path(m["source"]) for m in mounts(service) if m["type"] == "bind"}
    assert binds == {deploy / "certs" / "ca.crt", deploy / "certs" / "server.crt", deploy / "certs" / "server.key",
                     deploy / "keys", deploy / "runs"}
    assert not any(m["source"].endswith("ca.key") or "site-keys" in m["source"] for m in mounts(service))


def test_ledgers_are_named_volumes_at_medae_home(raw, compose):
    home = dockerfile_env()["MEDAE_HOME"]
    declared = raw["volumes"]
    seen = set()
    for site in SITES:
        ledgers = [m for m in mounts(compose["services"][site]) if m["target"] == home]
        assert len(ledgers) == 1, site
        (ledger,) = ledgers
        assert ledger["type"] == "volume" and ledger["source"] in declared, f"{site}: ledger must be a named volume"
        assert not ledger["read_only"]
        seen.add(ledger["source"])
        # A fixed name: the ledger survives a change of compose project name (-p) or of this folder's name.
        assert (declared[ledger["source"]] or {}).get("name"), f"{ledger['source']} needs a fixed `name:`"
    assert len(seen) == len(SITES), "each site needs its own ledger volume"


def test_no_insecure_mode_anywhere():
    for path in (COMPOSE, ENV_EXAMPLE):
        assert "--insecure" not in path.read_text(), path


def test_site_commands_are_medae_client_with_tls_and_their_own_key(compose):
    services = compose["services"]
    for site in SITES:
        service = services[site]
        args = parse(service)
        assert args.command == "client"
        assert args.server == f"server:{PORT}"
        assert args.server.split(":")[0] in services, "the sites dial the server by its compose service name"
        assert not args.insecure
        assert str(args.ca) == bind(service, "certs/ca.crt")["target"]
        key = bind(service, f"site-keys/{site}.key")
        assert str(args.key) == key["target"] and PurePosixPath(key["target"]).name == f"{site}.key"
        assert str(args.data) == bind(service, f"data/{SITES[site]}")["target"]
        assert args.site_name == site
        assert args.ledger is None, "the ledger must go to MEDAE_HOME, the named volume"
        depends = service["depends_on"]
        assert "server" in depends
        assert service["restart"] == "on-failure"


def test_server_command_is_medae_server_with_certs_and_authorized_keys(compose):
    service = compose["services"]["server"]
    args = parse(service)
    assert args.command == "server"
    assert not args.insecure
    assert args.port == PORT
    assert args.host == "0.0.0.0", "the gateway must listen on the container's network, not its loopback"
    certs = PurePosixPath(str(args.certs))
    for name in ("ca.crt", "server.crt", "server.key"):
        assert bind(service, f"certs/{name}")["target"] == str(certs / name)
    assert str(args.authorized_keys) == bind(service, "deploy/keys")["target"]
    runs = bind(service, "deploy/runs")
    assert PurePosixPath(str(args.out)).is_relative_to(runs["target"]), "the run folder must be on the bind mount"
    # The health check probes the published gateway port.
    assert str(PORT) in " ".join(service["healthcheck"]["test"])
    for site in SITES:
        assert compose["services"][site]["depends_on"]["server"]["condition"] == "service_healthy"


def test_env_example_lists_every_variable_with_the_compose_default():
    used = variables(COMPOSE.read_text())
    example = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            example[key.strip()] = value.strip()
    assert set(example) == set(used)
    assert example == used


def test_deploy_defaults_point_at_the_repository_deploy_folder(compose):
    # The README's commands run from the repository root and write deploy/...; compose resolves its
    # relative paths from docker/, so ../deploy must be the same folder.
    for name, service in compose["services"].items():
        for m in mounts(service):
            if m["type"] == "bind":
                assert host_path(m["source"]).is_relative_to(ROOT / "deploy"), (name, m)


# -- the Dockerfile -----------------------------------------------------------------
def test_dockerfile_entrypoint_is_medae_and_base_is_python_slim():
    inst = dockerfile_instructions()
    entry = [args for i, args in inst if i == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["medae"]
    assert [args for i, args in inst if i == "FROM"] == ["python:3.11-slim"]
    assert any(i == "EXPOSE" and args.split() == [str(PORT)] for i, args in inst)


def test_dockerfile_runs_as_an_unprivileged_user_and_disables_telemetry():
    inst = dockerfile_instructions()
    users = [args for i, args in inst if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    env = dockerfile_env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["MEDAE_HOME"] == "/var/lib/medae"
    # The user owns MEDAE_HOME, which must exist before VOLUME (named volumes copy its owner).
    names = [i for i, _ in inst]
    chown = next(n for n, (i, a) in enumerate(inst) if i == "RUN" and "chown" in a and "/var/lib/medae" in a)
    assert chown < names.index("VOLUME")


def test_dockerfile_installs_cpu_torch_by_default_and_never_torchvision():
    inst = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in inst if i == "ARG" and "=" in a)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(a for i, a in inst if i == "RUN")
    assert "torchvision" not in runs and "torchaudio" not in runs
    assert "${TORCH_INDEX}" in runs
    assert "pip install ." in runs


def test_dockerfile_copies_every_package_pyproject_installs():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {p.rstrip("*").rstrip(".") for p in patterns}
    copied = {src for i, a in dockerfile_instructions() if i == "COPY" for src in a.split()[:-1]}
    for top in tops:
        assert (ROOT / top / "__init__.py").is_file(), top
        assert top in copied, f"Dockerfile does not COPY {top}/ (a package in pyproject.toml)"
    assert "pyproject.toml" in copied and "README.md" in copied


def test_readme_documents_the_certificate_name_the_sites_dial():
    text = README.read_text()
    assert "medae certs --out deploy/certs --server-name server" in text
    assert "docker compose -f docker/compose.yaml up" in text
    for site in SITES:
        assert f"--site {site}" in text or "for s in site-a site-b site-c" in text
