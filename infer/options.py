"""The flags infer's commands share (caption, evaluate, export, serve, bench): their valid ranges,
the run's own --max-len default and the decoding guards' flags (--no-guards, --no-end-after,
--unsure-below)."""
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


def add_guard_flags(parser) -> None:
    """--no-guards, --no-end-after, --unsure-below (caption, evaluate, export, serve)."""
    from model.decoding import NO_END_AFTER, UNSURE_BELOW
    parser.add_argument("--no-guards", action="store_true", help="let beam search repeat a word, repeat a trigram "
                        "and end after 'the', 'of', ','... (default: forbidden inside the search)")
    parser.add_argument("--no-end-after", metavar="WORDS", default=None,
                        help="space-separated words after which a caption may not end, replacing the default "
                        f"list ('{' '.join(NO_END_AFTER)}'); '' for none; words not in the vocabulary are ignored")
    parser.add_argument("--unsure-below", type=float, default=UNSURE_BELOW, metavar="LOGP",
                        help="mark captions whose mean log-probability per word is below this as unsure "
                        f"(default {UNSURE_BELOW}; -inf: never)")


def guards_of(args):
    """The model.decoding.Guards that parsed --no-guards / --no-end-after / --unsure-below ask for."""
    import math

    from model.decoding import NO_END_AFTER, Guards
    if math.isnan(args.unsure_below) or args.unsure_below == math.inf:
        raise UserError(f"--unsure-below {args.unsure_below}: must be a number (a log-probability, e.g. -1.5) "
                        f"or -inf")
    words = NO_END_AFTER if args.no_end_after is None else tuple(args.no_end_after.split())
    return Guards(on=not args.no_guards, no_end_after=words, unsure_below=args.unsure_below)
