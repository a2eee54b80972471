"""python -m infer {caption,evaluate,export,serve,serve-bench,bench,rehearse} ..."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from infer.options import add_guard_flags, guards_of  # noqa: E402
from prepare.cli import run_cli  # noqa: E402
from prepare.errors import check_range  # noqa: E402

MAX_LEN_HELP = ("tokens per caption incl. <start>, 2-1000 (default: the run's longest training caption + 2, "
                "when config.json records it or the run's captions.h5 is at hand; else 30)")


def _add_caption(sub) -> None:
    c = sub.add_parser("caption", help="caption images; write annotated copies, captions.jsonl, results.json")
    c.add_argument("--run", required=True, help="run directory made by `python -m model train`")
    c.add_argument("images", nargs="+", help="image files, folders or globs")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--beam-size", type=int, default=3, help="1-100 (default 3)")
    c.add_argument("--max-len", type=int, default=None, help=MAX_LEN_HELP)
    c.add_argument("--length-norm", type=float, default=0.0, help="rank by logprob / length ** this")
    c.add_argument("--top", type=int, default=3, help="at most this many captions printed and kept per image "
                   "(fewer when fewer complete), 1-100 (default 3)")
    c.add_argument("--batch-size", type=int, default=32, help="images per batch, 1-4096 (default 32)")
    c.add_argument("--attention", action="store_true", help="attention-decoder runs: also write "
                   "OUT/attention/<name>.png, the image with a heat map of where it looked for each word")
    c.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    c.add_argument("--quiet", action="store_true")
    add_guard_flags(c)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="COCO metrics, human ceiling and content accuracy on a split")
    e.add_argument("--run", required=True)
    e.add_argument("--data", required=True, help="dataset folder with captions.h5 (and features/)")
    e.add_argument("--features", help="feature cache (default DATA/features; used when it matches the run)")
    e.add_argument("--split", default="test")
    e.add_argument("--beam-size", type=int, default=3, help="1-100 (default 3)")
    e.add_argument("--max-len", type=int, default=None, help=MAX_LEN_HELP)
    e.add_argument("--batch-size", type=int, default=32, help="images per batch, 1-4096 (default 32)")
    e.add_argument("--limit", type=int, default=0, help="only the first N images (default 0: all)")
    e.add_argument("--out", help="output folder (default RUN/eval-SPLIT)")
    e.add_argument("--attention-maps", type=int, default=0, help="attention-decoder runs: write attention strips "
                   "of the first N images into OUT/attention/ (default 0)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--quiet", action="store_true")
    add_guard_flags(e)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="a TensorFlow SavedModel that captions encoded image bytes (all in-graph)")
    x.add_argument("--run", required=True, help="run directory")
    x.add_argument("--out", required=True, help="SavedModel folder (refused if it holds files, unless --overwrite)")
    x.add_argument("--beam-size", type=int, default=3, help="1-100 (default 3)")
    x.add_argument("--top", type=int, default=3, help="captions returned per image, 1..beam size (default 3)")
    x.add_argument("--max-len", type=int, default=None, help=MAX_LEN_HELP)
    x.add_argument("--length-norm", type=float, default=0.0, help="rank by logprob / length ** this")
    x.add_argument("--overwrite", action="store_true", help="replace the SavedModel in --out")
    add_guard_flags(x)


def _add_serve(sub) -> None:
    v = sub.add_parser("serve", help="a web page and JSON API captioning uploaded images")
    v.add_argument("--run", required=True, help="run directory")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="1-65535 (default 8000)")
    v.add_argument("--beam-size", type=int, default=3, help="1-100 (default 3)")
    v.add_argument("--max-mb", type=float, default=10.0, help="largest upload in MB (default 10): larger -> 413")
    v.add_argument("--max-batch", type=int, default=16, help="images captioned together at most (default 16)")
    v.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request's whole body may take to arrive (default 30): slower -> 408")
    add_guard_flags(v)


def _add_serve_bench(sub) -> None:
    sb = sub.add_parser("serve-bench", help="bounded load on `infer serve` over localhost: captions/s, latency")
    sb.add_argument("--run", required=True)
    sb.add_argument("images", nargs="+", help="image files sent in turn (one per request)")
    sb.add_argument("--requests", type=int, default=200, help="requests in all (default 200)")
    sb.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="captions/s: batched beam search vs one image at a time")
    b.add_argument("--vocab", type=int, default=12000)
    b.add_argument("--size", type=int, default=512)
    b.add_argument("--images", type=int, default=64)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--beam-size", type=int, default=3)
    b.add_argument("--max-len", type=int, default=20)
    b.add_argument("--run", help="also time end-to-end captioning from JPEG files with this run")


def _add_rehearse(sub) -> None:
    r = sub.add_parser("rehearse", help="time and measure every stage on a caption set of MS-COCO's size "
                       "(prepare synth-coco) at several fractions of it")
    r.add_argument("--out", required=True, help="folder for the data made and rehearsal.json")
    r.add_argument("--fractions", default="1/16,1/4,1", help="comma-separated shares of COCO 2014's size "
                   "(default 1/16,1/4,1)")
    r.add_argument("--stages", default="write,prepare,extract,features,datapath,scoring",
                   help="comma-separated, from write,prepare,extract,features,datapath,scoring (default all)")
    r.add_argument("--grid", default="lite0", help="the synthetic grid's shape: lite0 (49 x 1,280, default) "
                   "or inception (64 x 2,048)")
    r.add_argument("--extract-up-to", default="1/16", help="run the real extraction up to this fraction; "
                   "above it, extrapolate from its rate (default 1/16)")
    r.add_argument("--keep", action="store_true", help="keep each fraction's data (default: removed when measured)")
    r.add_argument("--overwrite", action="store_true", help="replace a previous rehearsal in --out")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer", description="caption images with a trained run")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_caption, _add_evaluate, _add_export, _add_serve, _add_serve_bench, _add_bench,
                _add_rehearse):
        add(sub)
    return p


def _caption(a) -> None:
    from infer.caption import caption_images
    caption_images(a.run, a.images, a.out, beam_size=a.beam_size, max_len=a.max_len, top=a.top,
                   batch_size=a.batch_size, length_norm=a.length_norm, overwrite=a.overwrite,
                   attention=a.attention, progress=not a.quiet, guards=guards_of(a))


def _evaluate(a) -> None:
    from infer.evaluate import evaluate
    evaluate(a.run, a.data, split=a.split, beam_size=a.beam_size, max_len=a.max_len, features=a.features,
             out=a.out, batch_size=a.batch_size, limit=a.limit, overwrite=a.overwrite, progress=not a.quiet,
             attention_maps=a.attention_maps, guards=guards_of(a))


def _export(a) -> None:
    from infer.export import export
    export(a.run, a.out, beam_size=a.beam_size, top_k=a.top, max_len=a.max_len, length_norm=a.length_norm,
           overwrite=a.overwrite, guards=guards_of(a))


def _serve(a) -> None:
    from infer.serve import serve
    serve(a.run, a.host, a.port, beam_size=a.beam_size, max_mb=a.max_mb, max_batch=a.max_batch,
          body_timeout=a.body_timeout, guards=guards_of(a))


def _serve_bench(a) -> None:
    from pathlib import Path

    from infer import serve_bench
    check_range("--requests", a.requests, 1)
    check_range("--clients", a.clients, 1, 256)
    serve_bench.run(a.run, [Path(p) for p in a.images], a.requests, a.clients)


def _bench(a) -> None:
    from infer import bench
    from infer.options import check_flags
    check_flags(beam_size=a.beam_size, max_len=a.max_len, batch_size=a.batch_size)
    for flag, v, lo in (("--vocab", a.vocab, 5), ("--size", a.size, 1), ("--images", a.images, 1)):
        check_range(flag, v, lo)
    bench.run(a.vocab, a.size, a.images, a.batch_size, a.beam_size, a.max_len, a.run)


def _rehearse(a) -> None:
    from infer.rehearsal import rehearse
    from prepare.synth_coco import parse_fraction
    fractions = [parse_fraction(f, "--fractions") for f in a.fractions.split(",") if f.strip()]
    if not fractions:
        from prepare.errors import UserError
        raise UserError("--fractions is empty; give e.g. 1/16,1/4,1")
    rehearse(a.out, fractions, stages=[s.strip() for s in a.stages.split(",") if s.strip()], grid=a.grid,
             extract_up_to=parse_fraction(a.extract_up_to, "--extract-up-to"), keep=a.keep, overwrite=a.overwrite)


COMMANDS = {"caption": _caption, "evaluate": _evaluate, "export": _export, "serve": _serve,
            "serve-bench": _serve_bench, "bench": _bench,
            "rehearse": _rehearse}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    COMMANDS[a.cmd](a)
    return 0


if __name__ == "__main__":
    run_cli(main)
