"""The Flower app manifest of one run, the same for `medae simulate` and `medae server`.

Flower hands apps their settings as ``run_config``, fused from an app's
``pyproject.toml`` defaults and the run's overrides. medae writes a minimal
manifest into the run folder whose defaults are this run's `RunConfig`
(flattened, plus the keys of `medae_core.contract`), so both apps receive
exactly the object the command line built. The manifest names the installed
``server.app`` and ``client.app``; it carries no code (`medae.site_guard`).
"""

from __future__ import annotations

from pathlib import Path

from medae_core.config import RunConfig
from medae_core.contract import RUN_DIR


def app_manifest(flat: dict) -> str:
    """A Flower app pyproject.toml whose run_config defaults are ``flat``."""
    lines = [
        "[project]",
        'name = "medae-run"',
        'version = "1.0.0"',
        'description = "One medae run: the installed server.app and client.app with this run\'s settings"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "medae"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server.app:app"',
        'clientapp = "client.app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    for key, value in flat.items():
        lines.append(f'"{key}" = {toml_value(value)}')
    return "\n".join(lines) + "\n"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_app(cfg: RunConfig, run_dir: Path, extra: dict[str, str | int] | None = None) -> Path:
    """RUN/.flwr-app/pyproject.toml: the app manifest whose run_config is ``cfg`` (+ ``run-dir``, ``extra``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    app_dir = run_dir / ".flwr-app"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "pyproject.toml").write_text(app_manifest(run_config(cfg, run_dir) | (extra or {})))
    return app_dir


def run_config(cfg: RunConfig, run_dir: Path) -> dict:
    """The run_config both apps receive: the flat `RunConfig` and the run folder."""
    return cfg.to_flat() | {RUN_DIR: str(run_dir.resolve())}
