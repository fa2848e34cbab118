"""The ledger's record format: JSON lines in a SHA-256 hash chain, parsed and checked field by field."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from medae_core.errors import LedgerError, PrivacyError
from medae_core.privacy.accounting import HistoryEntry, _check_accountant, _check_delta, _check_run

Unit = Literal["patient", "image"]
UNITS = ("patient", "image")
LEDGER_VERSION = 1
RESET_HINT = "An administrator can reset it with `medae privacy reset-ledger {path} --yes`"


# -- record format ---------------------------------------------------------------------
_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "header": {"version": int, "seq": int, "site": str, "budget_epsilon": float, "delta": float,
               "accountant": str, "created": str},
    "reservation": {"seq": int, "time": str, "run_id": str, "round": int, "noise_multiplier": float,
                    "sample_rate": float, "steps": int, "unit": str, "delta": float, "status": str},
    "budget": {"seq": int, "time": str, "budget_epsilon": float, "previous_budget_epsilon": float, "reason": str},
}


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _seal(record: dict[str, Any], prev: str | None) -> dict[str, Any]:
    body = {k: v for k, v in record.items() if k != "hash"}
    body["prev"] = prev
    return {**body, "hash": hashlib.sha256(_canonical(body)).hexdigest()}


def _line(record: dict[str, Any]) -> bytes:
    return _canonical(record) + b"\n"


def _parse(data: bytes, path: Path, *, partial: bool = False) -> list[dict[str, Any]]:
    """Parse and verify a ledger; with ``partial`` return the verified prefix instead of raising."""
    records: list[dict[str, Any]] = []

    def fail(problem: str) -> list[dict[str, Any]]:
        if partial:
            return records
        raise LedgerError(f"the privacy ledger {path} is corrupted: {problem}. " + RESET_HINT.format(path=path))

    if not data:
        return fail("the file is empty")
    *lines, tail = data.split(b"\n")
    if tail and not partial:
        return fail(f"its last line (line {len(lines) + 1}) is incomplete: the file was truncated or a write "
                    "was interrupted")
    for number, line in enumerate(lines):
        try:
            record = json.loads(line, parse_constant=_reject_constant)
        except ValueError as exc:
            return fail(f"line {number + 1} is not valid JSON ({exc})")
        problem = _record_problem(record, number, records)
        if problem:
            return fail(f"line {number + 1}: {problem}")
        records.append(record)
    return records


def _record_problem(record: Any, number: int, previous: list[dict[str, Any]]) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    kind = record.get("kind")
    if (number == 0) != (kind == "header"):
        return "the first line must be the header, and only the first"
    if kind not in _FIELDS:
        return f"unknown entry kind {kind!r}"
    for name, expected in _FIELDS[kind].items():
        value = record.get(name)
        ok = isinstance(value, int | float) if expected is float else isinstance(value, expected)
        if not ok or isinstance(value, bool):
            return f"field {name!r} is missing or not a {expected.__name__}"
    if kind == "header" and record["version"] != LEDGER_VERSION:
        return f"ledger version {record['version']} is not supported (this medae reads version {LEDGER_VERSION})"
    if record["seq"] != number:
        return f"sequence number {record['seq']} where {number} was expected (entries missing or reordered)"
    expected_prev = previous[-1]["hash"] if previous else None
    if record.get("prev") != expected_prev:
        return "the hash chain is broken (an entry before it was removed, added or changed)"
    body = {k: v for k, v in record.items() if k != "hash"}
    if record.get("hash") != hashlib.sha256(_canonical(body)).hexdigest():
        return "its content does not match its hash (the entry was edited)"
    try:
        if kind == "header":
            _check_delta(record["delta"])
            _check_accountant(record["accountant"])
            if not record["budget_epsilon"] > 0:
                raise PrivacyError("the budget must be positive")
        elif kind == "reservation":
            _check_run(record["noise_multiplier"], record["sample_rate"], record["steps"])
            if record["unit"] not in UNITS:
                raise PrivacyError(f"unknown privacy unit {record['unit']!r}")
            if record["delta"] != previous[0]["delta"]:
                raise PrivacyError("its δ differs from the header's")
        elif not record["budget_epsilon"] > 0:
            raise PrivacyError("the budget must be positive")
    except PrivacyError as exc:
        return str(exc)
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _salvage(path: Path) -> list[dict[str, Any]]:
    try:
        return _parse(path.read_bytes(), path, partial=True)
    except OSError:
        return []


def _history(records: list[dict[str, Any]]) -> list[HistoryEntry]:
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in records[1:] if e["kind"] == "reservation"]


def _budget(records: list[dict[str, Any]]) -> float:
    budget = records[0]["budget_epsilon"]
    for e in records[1:]:
        if e["kind"] == "budget":
            budget = e["budget_epsilon"]
    return float(budget)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be fsync'ed on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
