"""A site runs only the medae it installed, whatever its coordinator sends.

A SuperNode runs the app package (FAB) that the SuperLink hands it, and
Flower puts the unpacked FAB first on ``sys.path``: a compromised or malicious
coordinator could ship a ``client/app.py`` and run any code on every
hospital's machine. medae's own FABs carry no code (`medae.app_manifest.write_app`:
a manifest naming the installed ``server.app`` and ``client.app``), so a site
can refuse every FAB that does:

- `check_fab` accepts only a zip holding ``pyproject.toml`` and Flower's
  ``.info/CONTENT``, whose manifest names exactly medae's components (and,
  when the site keeps a list of approved FAB hashes, one of those);
- ``medae client`` runs its SuperNode with ``--isolation process`` and starts
  the SuperExec itself (`superexec_main`), which launches `clientapp_main`
  instead of ``flwr-clientapp``; `clientapp_main` is Flower's own
  ``flwr-clientapp`` with `check_fab` in front of the FAB installation, so a
  refused FAB is never written to disk, imported or run.

Flower's own FAB signing relies on its Hub and does not work offline, hence
this check. It keeps the coordinator from running code at a site; it does not
make the run's settings trustworthy (the site's own policy checks do that:
`client.app.check_site_policy`, the privacy ledger).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
import tomllib
import zipfile
from pathlib import Path

from medae_core.errors import MedaeError

log = logging.getLogger("medae.site_guard")

ALLOWED_MEMBERS = frozenset({"pyproject.toml", ".info/CONTENT"})
COMPONENTS = {"serverapp": "server.app:app", "clientapp": "client.app:app"}
APPROVED_FABS_ENV = "MEDAE_APPROVED_FABS"  # a file of approved FAB SHA-256 hashes, one per line
CLIENTAPP_COMMAND = "medae-clientapp"  # console script: `clientapp_main`


class FabRefused(MedaeError):
    """The coordinator sent an app package this site does not run."""


def check_fab(content: bytes, approved: frozenset[str] | None = None) -> str:
    """The FAB's SHA-256 if this site may run it; else `FabRefused` saying why."""
    digest = hashlib.sha256(content).hexdigest()
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = fab.namelist()
            extra = sorted(set(names) - ALLOWED_MEMBERS)
            if extra:
                raise FabRefused(
                    f"the coordinator's app package {digest[:12]} carries files ({', '.join(extra[:5])}): this "
                    "site runs only the medae installed here, from a package that holds nothing but its manifest"
                )
            if "pyproject.toml" not in names:
                raise FabRefused(f"the coordinator's app package {digest[:12]} has no manifest")
            manifest = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FabRefused(f"the coordinator's app package {digest[:12]} is not a readable FAB ({exc})") from None
    components = manifest.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components != COMPONENTS:
        raise FabRefused(
            f"the coordinator's app package {digest[:12]} names components {components}; this site runs only "
            f"medae's own ({COMPONENTS})"
        )
    if approved is not None and digest not in approved:
        raise FabRefused(
            f"the coordinator's app package {digest} is not on this site's list of approved packages "
            f"({os.environ.get(APPROVED_FABS_ENV, 'none')})"
        )
    return digest


def approved_hashes() -> frozenset[str] | None:
    """The approved FAB hashes from the file `APPROVED_FABS_ENV` names; None when no list is kept."""
    path = os.environ.get(APPROVED_FABS_ENV)
    if not path:
        return None
    lines = Path(path).read_text().split()
    return frozenset(line.strip().lower() for line in lines if line.strip() and not line.startswith("#"))


def clientapp_main() -> None:
    """``flwr-clientapp`` with `check_fab` before the FAB is installed (console script ``medae-clientapp``)."""
    import importlib

    from flwr.supernode.cli import flwr_clientapp

    run_clientapp = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    install = run_clientapp.install_from_fab

    def guarded_install(fab_content: bytes, *args, **kwargs):
        try:
            digest = check_fab(fab_content, approved_hashes())
        except FabRefused as exc:
            log.error("refused: %s", exc)
            raise
        log.info("app package %s checked: manifest only, medae's own components", digest[:12])
        return install(fab_content, *args, **kwargs)

    run_clientapp.install_from_fab = guarded_install
    sys.argv[0] = "flwr-clientapp"  # Flower's exit handling looks for its own name
    flwr_clientapp()


def superexec_main() -> None:
    """``flower-superexec`` whose ClientApp processes are `clientapp_main` (``python -m medae.site_guard``)."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    command = Path(sys.executable).parent / CLIENTAPP_COMMAND
    if not command.exists():
        raise SystemExit(f"{command} not found: reinstall medae (pip install .) so that its scripts exist")
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(command)
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    superexec_main()
