"""Write configs/default.toml from RunConfig() and the field comments in medae_core/config.py."""

import json
import re
from pathlib import Path

from medae_core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    comments, section = {}, None
    for line in (ROOT / "medae_core" / "config.py").read_text().splitlines():
        if m := re.match(r"class (\w+)Config", line):
            section = m.group(1).lower()
        elif (m := re.match(r"\s+(\w+): .*?=.*?#\s*(.*)$", line)) and section:
            comments[(section, m.group(1))] = m.group(2)
    lines = [
        "# medae run configuration: every key with its default (this file equals RunConfig()).",
        "# Copy it, change what you need and pass it with --config; command-line options override it.",
        '# Keys shown as "(unset)" are not set by default. Regenerate after changing defaults:',
        "#   python scripts/write_default_config.py",
        "",
    ]
    for name, values in RunConfig().to_dict().items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            note = comments.get((name, key))
            suffix = f"  # {note}" if note else ""
            if value is None:
                lines.append(f"# {key} = (unset){suffix}")
            else:
                text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
                lines.append(f"{key} = {text}{suffix}")
        lines.append("")
    (ROOT / "configs" / "default.toml").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
