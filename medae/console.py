"""What the `medae` command shows: its consoles, progress displays, tables, and how library output is kept quiet.

Presentation only: nothing here decides or computes; `medae.cli` calls it
with the core's results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medae_core.config import RunConfig

# No markup in what is printed: paths and reasons such as scans/a[/b] must print as they are;
# styles are set with style= or Text.
console = Console(stderr=True, markup=False, width=None if sys.stderr.isatty() else 160)
# Not a terminal (a log file, a pipe): no 80-column limit that would cut the results table.
out = Console(markup=False, width=None if sys.stdout.isatty() else 160)


@contextlib.contextmanager
def progress_bar(description: str):
    """Yield a ``progress(done, total)`` callback drawn as a rich progress bar."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and os.environ.get("MEDAE_PROGRESS") != "1",
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_json(data) -> None:
    out.print_json(json.dumps(data, default=str))


def check_data_tables(report: dict):
    """What a folder holds (per part: train / test, with labels), then why files were skipped, with examples."""
    from rich.console import Group

    parts = report.get("parts", {})
    summary = Table(title=f"medae check-data {report['root']}")
    for col in ("part", "usable images", "patients", "anomalous", "healthy", "unlabelled", "with mask",
                "files skipped"):
        summary.add_column(col, justify="left" if col == "part" else "right")
    for name, part in parts.items():
        summary.add_row(name, *(str(part.get(k, "–")) for k in ("usable_images", "patients", "anomalous",
                                                                  "healthy", "unlabelled", "with_mask",
                                                                  "files_skipped")))
    formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(report.get("by_format", {}).items())) or "none"
    summary.caption = f"layout: {report.get('layout', '')} · usable by format: {formats}"
    if "by_contrast" in report:
        summary.caption += " · by contrast: " + ", ".join(f"{c} {n}" for c, n in report["by_contrast"].items())
    if not report["skipped"]:
        return summary
    reasons = Table(title="skipped files")
    reasons.add_column("reason", overflow="fold")
    reasons.add_column("files", justify="right")
    reasons.add_column("for example", overflow="fold", no_wrap=False)
    for reason, n in report.get("skipped_by_reason", {}).items():
        examples = [sk["path"] for sk in report["skipped"] if sk["reason"].split(": ", 1)[0] == reason][:2]
        reasons.add_row(reason, str(n), "\n".join(examples))
    return Group(summary, reasons)


def results_table(rows: dict[str, dict]) -> Table:
    from medae_core.report import LABELS, RESULT_KEYS

    table = Table(title="test set")
    table.add_column("scorer")
    for k in RESULT_KEYS:
        table.add_column(LABELS[k].replace(" at threshold", "\nat threshold"))
    for name, values in rows.items():
        table.add_row(name, *(_fmt((values or {}).get(k)) for k in RESULT_KEYS))
    return table


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


# More sites than this are followed on one line (a 1,000-site simulation would not fit a screen).
MAX_SITE_ROWS = 8


@contextlib.contextmanager
def follow_simulation(run_dir: Path, cfg: RunConfig):
    """Live display of a simulation: rounds (with the time left), then each site's steps and ε so far.

    Polls RUN/state.json (the ServerApp rewrites it after every round) and
    RUN/progress/<site>.json (the simulated ClientApps' steps). Off when the
    output is not a terminal: a log file gets the ServerApp's one line per round.
    """
    if not console.is_terminal and os.environ.get("MEDAE_PROGRESS") != "1":
        yield
        return
    import threading

    from rich.progress import TimeRemainingColumn

    from medae_core.federated import STATE, read_progress

    rounds = cfg.federation.rounds
    stop = threading.Event()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as bar:
        federation = bar.add_task("federation: starting (data, Ray)", total=rounds, count="")
        sites: dict[str, int] = {}

        def poll() -> None:
            while not stop.wait(0.5):
                try:
                    state = json.loads((run_dir / STATE).read_text())
                except (OSError, ValueError):
                    state = {}
                done = int(state.get("rounds_done", 0))
                current = min(done + 1, rounds)
                spent = {name: s.get("epsilon") for name, s in (state.get("sites") or {}).items()}
                fractions, rows = [], []
                for site, p in read_progress(run_dir).items():
                    here = p.get("round") == current and done < rounds
                    frac = (p["done"] / p["total"]) if here and p.get("total") else (1.0 if done >= rounds else 0.0)
                    fractions.append(frac)
                    eps = spent.get(site)
                    label = f"  {site}" + (f" · ε {eps:.2f}" if eps is not None and cfg.privacy.enabled else "")
                    steps = f"{p['done']}/{p['total']} steps" if here else ("done" if done >= rounds else "waiting")
                    rows.append((site, label, frac, steps))
                if len(rows) > MAX_SITE_ROWS:  # a large federation: one line for all its sites
                    known = [e for e in spent.values() if e is not None]
                    rows = [("all sites", f"  {len(rows)} sites" + (f" · ε ≤ {max(known):.2f}" if known and
                                                                   cfg.privacy.enabled else ""),
                             sum(fractions) / len(fractions),
                             f"{sum(f >= 1.0 for f in fractions)} trained, {sum(0 < f < 1 for f in fractions)} "
                             f"training")]
                for site, label, frac, steps in rows:
                    if site not in sites:
                        sites[site] = bar.add_task(label, total=1.0, count="")
                    bar.update(sites[site], completed=frac, description=label, count=steps)
                training = fractions and done < rounds and min(fractions) < 1.0
                phase = "training" if training else ("evaluating" if fractions and done < rounds else "")
                progress_now = done + (sum(fractions) / len(fractions) * 0.8 if fractions and done < rounds else 0)
                title = (f"federation: round {current}/{rounds} {phase}" if done < rounds
                         else f"federation: {rounds} rounds done; report")
                bar.update(federation, completed=min(progress_now, rounds), description=title,
                           count=f"{done}/{rounds} rounds")

        thread = threading.Thread(target=poll, name="medae-follow", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5)


class _FlowerWarningsOnly(logging.Filter):
    """On Flower's own console handler: its warnings and errors, not its INFO lines.

    (The actors' end-of-run "Manually terminating" notice is dropped on the flwr
    logger itself, by `client.app`, in every process that runs the ClientApp.)
    """

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.levelno >= logging.WARNING


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


class PlainStream:
    """A text stream that drops ANSI escape sequences: what a log file or pipe gets.

    Ray colours its "[repeated Nx across cluster]" notes whatever its output
    is; wrapping sys.stdout and sys.stderr is the one place that catches every
    library's colours.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_ANSI_ESCAPE.sub("", text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def plain_output() -> None:
    """When stdout or stderr is not a terminal, nothing written to it carries colour codes."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, PlainStream) and not stream.isatty():
            setattr(sys, name, PlainStream(stream))


def quiet_flower(verbose: bool) -> None:
    """Flower's console lines: plain text when not a terminal, and without its end-of-run actor notices."""
    from flwr.common.logger import update_console_handler

    update_console_handler(colored=console.is_terminal)
    if not console.is_terminal:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(ClientAppActor pid=...)" prefix, uncoloured
        plain_output()
    with contextlib.suppress(ImportError):  # Ray's once-per-process advice about its own log settings
        from ray.util.debug import log_once

        log_once("log_dedup_warning")

    from flwr.supercore.logger import ConsoleHandler

    for handler in logging.getLogger("flwr").handlers:  # Flower's simulation raises its own level to INFO
        if isinstance(handler, ConsoleHandler) and not any(isinstance(f, _FlowerWarningsOnly) for f in handler.filters):
            handler.addFilter(_FlowerWarningsOnly(verbose))


def flower_echo(verbose: bool):
    """Flower's own output: every line with -v, else only its warnings and errors."""
    from rich.text import Text

    def echo(line: str) -> None:
        if verbose or "ERROR" in line or "WARN" in line:
            text = Text.from_ansi(line)
            text.stylize("dim")
            console.print(text, soft_wrap=True, highlight=False)
    return echo


def configure_logging(verbose: bool) -> None:
    """medae's own messages at INFO (DEBUG with -v); other libraries only warn.

    Flower logs through its own handler; it is kept from propagating so that
    its records are not printed twice, and held at WARNING unless -v.
    """
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    level = logging.DEBUG if verbose else logging.INFO
    for name in ("medae", "medae_core", "server", "client"):
        logging.getLogger(name).setLevel(level)
    flwr = logging.getLogger("flwr")
    flwr.propagate = False
    flwr.setLevel(logging.DEBUG if verbose else logging.WARNING)
