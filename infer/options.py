"""The flags infer's commands share (caption, evaluate, export, serve, bench): their valid ranges
and the run's own --max-len default."""
from __future__ import annotations

from prepare.errors import UserError, check_range

MAX_LEN_SLACK = 2       # tokens allowed beyond the longest training caption
LIMITS = {"beam_size": ("--beam-size", 1, 100), "top": ("--top", 1, 100), "max_len": ("--max-len", 2, 1000),
          "batch_size": ("--batch-size", 1, 4096), "limit": ("--limit", 0, None)}


def check_flags(**values) -> None:
    """UserError naming the flag and its valid range for any value out of range (None: not given)."""
    for k, v in values.items():
        if v is not None:
            flag, lo, hi = LIMITS[k]
            check_range(flag, v, lo, hi)


def run_max_len(run) -> tuple[int, str]:
    """Default --max-len for a run: its longest training caption (tokens incl. <start>/<end>) + 2,
    recorded by training in config.json's data.train_max_length. -> (max_len, where it came from)."""
    from model.run import CONFIG, Run
    r = Run(run)
    if not r.file(CONFIG).is_file():
        r.verify()                       # one line: not a run directory, or the file that is missing
    n = (r.config().get("data") or {}).get("train_max_length")
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise UserError(f"{r.file(CONFIG)}: records no data.train_max_length: the run was made by an older "
                        f"version; pass --max-len N (e.g. 30) or retrain it")
    return n + MAX_LEN_SLACK, f"the longest training caption ({n} tokens, recorded in the run) + {MAX_LEN_SLACK}"
