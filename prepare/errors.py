"""The one kind of error a user causes, and the checks that raise it. Every stage imports this;
it imports nothing of the project.

A UserError is printed as one line (`error: ...`, exit code 2) by prepare.cli.run_cli: it names
the flag, file or key at fault and what to do.
"""
from __future__ import annotations

class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


def check_range(flag: str, value, lo=None, hi=None, why: str = "") -> None:
    """UserError naming the flag and its valid range unless lo <= value <= hi (None: unbounded).

    check_range("--top", 0, 1) -> "--top must be at least 1 (got 0)".
    """
    if (lo is None or value >= lo) and (hi is None or value <= hi):
        return
    rng = (f"between {lo} and {hi}" if lo is not None and hi is not None else
           f"at least {lo}" if lo is not None else f"at most {hi}")
    raise UserError(f"{flag} must be {rng} (got {value}){f'; {why}' if why else ''}")


def differences(old: dict, new: dict, ignore: set = frozenset(), prefix: str = "", was: str = "run has") -> list[str]:
    """Saved settings vs now, nested dicts flattened to dotted keys: ['train.lr: run has 0.1, now 0.2']."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, ignore, f"{prefix}{k}.", was)
        elif a != b:
            out.append(f"{prefix}{k}: {was} {a!r}, now {b!r}")
    return out
