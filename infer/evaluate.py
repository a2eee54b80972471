"""python -m infer evaluate: caption a split, score it with the official COCO caption metrics,
the human-agreement ceiling, and (where the dataset records its objects) content accuracy."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from extract.cache import MANIFEST, FeatureArray, feature_file, feature_kind, read_manifest
from infer.captioner import Captioner
from model.metrics import content_accuracy, image_size_of
from prepare import captions_h5
from prepare.errors import UserError
from prepare.files import PENDING, Publication, exclusive_lock, finish_pending, publish, sha256_file, write_json_atomic

METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def java_available() -> bool:
    return shutil.which("java") is not None


class Scorer:
    """Scores many candidate sets against subsets of one reference set (the leave-one-out columns:
    11 scorings in all) with each distinct caption tokenized once (one PTB tokenizer run for all of
    them, `prime`) and one METEOR process for every scoring, instead of three Java start-ups a
    scoring. A caption's tokens do not depend on the captions around it, so the scores are those of
    separate runs (tested)."""

    def __init__(self):
        self.java = java_available()
        self._tokens: dict[str, str] = {}
        self._meteor = None

    def prime(self, *caption_sets: dict[int, list[str]]) -> None:
        """Tokenize every caption not seen yet, in one run."""
        new = sorted({c for caps in caption_sets for v in caps.values() for c in v} - set(self._tokens))
        if not new:
            return
        if self.java:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
            with _java_chatter_hidden():
                out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(new)})
            self._tokens.update((c, out[i][0]) for i, c in enumerate(new))
        else:
            from prepare.vocabulary import tokenize
            self._tokens.update((c, " ".join(t for t in tokenize(c) if t.isalnum())) for c in new)

    def tokenized(self, caps: dict[int, list[str]]) -> dict[int, list[str]]:
        self.prime(caps)
        return {k: [self._tokens[c] for c in v] for k, v in caps.items()}

    def score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> dict[str, float]:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        gts, res = self.tokenized(gts), self.tokenized(res)
        out = {}
        b, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"Bleu_{i + 1}": float(x) for i, x in enumerate(b)})
        if self.java:
            if self._meteor is None:
                from pycocoevalcap.meteor.meteor import Meteor
                self._meteor = Meteor()
            out["METEOR"] = float(self._meteor.compute_score(gts, res)[0])
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        return out

    def close(self) -> None:
        self._meteor = None        # its __del__ ends the Java process (pycocoevalcap has no close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def coco_scores(gts: dict[int, list[str]], res: dict[int, list[str]], scorer: Scorer | None = None) -> dict[str, float]:
    """Official COCO caption metrics (pycocoevalcap). METEOR and the PTB tokenizer need Java;
    without it, captions are lower-cased and split on our tokenizer and METEOR is left out."""
    if scorer is not None:
        return scorer.score(gts, res)
    with Scorer() as s:
        return s.score(gts, res)


@contextlib.contextmanager
def _java_chatter_hidden():
    """The PTB tokenizer's Java process writes a "tokenized N tokens" line to the inherited stderr on
    every call (22 lines an evaluation): send file descriptor 2 to a temporary file meanwhile, and
    show what it caught only if the call fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def leave_one_out(refs: dict[int, list[str]], hyp: dict[int, str] | None = None,
                  scorer: Scorer | None = None) -> dict[str, float]:
    """For each reference position j < k (k: the fewest references any image has), score a
    candidate against each image's references without its j-th one, and average over j.
    The candidate is the j-th reference itself (hyp None: the human ceiling) or the model's caption
    (hyp given: the model scored exactly like the humans, with one reference fewer than all)."""
    k = min((len(v) for v in refs.values()), default=0)
    if k < 2:
        return {}
    runs = []
    for j in range(k):
        res = {i: [v[j] if hyp is None else hyp[i]] for i, v in refs.items()}
        gts = {i: v[:j] + v[j + 1:] for i, v in refs.items()}
        runs.append(coco_scores(gts, res, scorer))
    return {m: float(np.mean([r[m] for r in runs])) for m in runs[0]}


def human_ceiling(refs: dict[int, list[str]], scorer: Scorer | None = None) -> dict[str, float]:
    """Each reference scored against the other references (leave-one-out), averaged over the
    reference positions: how well people agree with each other on this split."""
    return leave_one_out(refs, None, scorer)


def model_leave_one_out(refs: dict[int, list[str]], hyp: dict[int, str], scorer: Scorer | None = None) -> dict[str, float]:
    """The model's captions scored over the same reference subsets as human_ceiling: the score
    to compare with the human ceiling (the standard score uses one reference more)."""
    return leave_one_out(refs, hyp, scorer)


def evaluate(run, data, *, split: str = "test", beam_size: int = 3, max_len: int | None = None, features=None,
             out=None, batch_size: int = 32, overwrite: bool = False, limit: int = 0, progress: bool = True,
             attention_maps: int = 0, guards=None, log=print) -> dict:
    """Caption a split and score it; writes OUT/results.json and OUT/metrics.json (metrics.json last:
    it exists only beside the results.json it scored, even after a kill during --overwrite). Two
    publications (prepare.files, label "evaluate"): results.json and the attention strips replace
    the old outputs and remove metrics.json together; after scoring, metrics.json.
    max_len None: the run's own (infer.options.run_max_len). guards: model.decoding.Guards (None: the
    defaults, on); metrics.json records them, and counts the best captions that are degenerate
    (model.metrics.degenerate) and unsure."""
    from infer.options import check_flags, run_max_len
    check_flags(beam_size=beam_size, max_len=max_len, batch_size=batch_size, limit=limit)
    if attention_maps < 0:
        raise UserError(f"--attention-maps {attention_maps}: must be 0 (none) or more")
    data, run = Path(data), Path(run)
    captions = data / "captions.h5"
    out = _open_out(Path(out) if out else run / f"eval-{split}", overwrite)
    sp = captions_h5.read_split(captions, split)
    if max_len is None:
        max_len, why = run_max_len(run)
        log(f"--max-len {max_len}: {why}")
    cap = Captioner(run, beam_size=beam_size, max_len=max_len, guards=guards)
    if attention_maps:
        cap.check_attention()
    n = len(sp.image_ids) if not limit else min(limit, len(sp.image_ids))
    t0 = time.time()
    paths = sp.image_paths(Path(cap.manifest.get("images_root") or captions.parent))
    grounded = cap.has_attention and any(sp.objects[:n])      # pointing accuracy needs every caption's maps
    source, beams, maps, failed = _caption_split(cap, sp, split, n, paths, Path(features) if features else
                                                 data / "features", captions, batch_size, progress,
                                                 len(sp.image_ids) if grounded else attention_maps, log)
    seconds = time.time() - t0
    truth = {r: json.loads(sp.objects[r]) for r in beams if sp.objects[r]}
    strips = {r: maps[r] for r in sorted(maps)[:attention_maps]}
    sizes = {r: image_size_of(t, paths[r]) for r, t in truth.items() if r in maps}   # strips and pointing: read once
    boxes = {r: _named_boxes(cap.vocab, beams[r][0].ids, truth[r]["objects"], sizes[r])
             for r in strips if sizes.get(r)}
    hyp = {int(sp.image_ids[r]): cap.text(b[0]) for r, b in beams.items()}
    refs: dict[int, list[str]] = defaultdict(list)
    for text, row in zip(sp.texts, sp.image_index):
        if row < n and row in beams:
            refs[int(sp.image_ids[row])].append(text)
    with exclusive_lock(out):                  # one process writes this --out at a time
        with Publication(out, "evaluate") as pub:
            if strips:
                _write_attention_maps(cap, beams, strips, paths, pub, boxes, log)
            write_json_atomic(pub.path("results.json"), [{"image_id": i, "caption": c} for i, c in hyp.items()])
            pub.discard("metrics.json")                       # never an old metrics.json beside new results
        if strips:
            log(f"wrote {len(strips)} attention strips to {out / 'attention'}")
        log(f"captioned {len(hyp)} {split} images from the {source} in {seconds:.1f}s "
            f"({len(hyp) / max(seconds, 1e-9):.1f} captions/s); scoring...")
        metrics = {"split": split, "images": len(hyp), "failed_images": len(failed), "beam_size": beam_size,
                   "max_len": max_len, "results_sha256": sha256_file(out / "results.json"), "source": source,
                   "guards": cap.guards.record(), "degenerate": sum(cap.degenerate(t) for t in hyp.values()),
                   "unsure": sum(cap.unsure(b[0]) for b in beams.values()),
                   "word_log_prob": _word_log_probs([b[0] for b in beams.values()]),
                   **_scores(dict(refs), hyp, {int(sp.image_ids[r]): t["objects"] for r, t in truth.items()}),
                   "pointing": _pointing(cap, beams, maps, truth, sizes) if grounded else None}
        publish(out, {"metrics.json": lambda p: write_json_atomic(p, metrics)}, label="evaluate")
    log(format_table(metrics))
    log(f"wrote {out / 'metrics.json'} and {out / 'results.json'}")
    return metrics


def _open_out(out: Path, overwrite: bool) -> Path:
    """The evaluation's --out: a folder (new or existing) whose interrupted publication is finished
    first; an existing metrics.json is replaced only with --overwrite."""
    from infer.files import check_out_folder
    check_out_folder(out)
    if (out / PENDING).exists():                # a publication a kill interrupted: finish or discard it first
        with exclusive_lock(out):
            finish_pending(out, "evaluate")
    if (out / "metrics.json").exists() and not overwrite:
        raise UserError(f"{out / 'metrics.json'} already exists; pass --overwrite or choose another --out")
    return out


def _caption_split(cap, sp, split: str, n: int, paths: list, feats_dir: Path, captions: Path, batch_size: int,
                   progress: bool, attention_maps: int, log) -> tuple[str, dict, dict, set]:
    """The first n images of the split captioned from the feature cache when it holds this run's
    features, else from the images. -> (source, row -> beams, row -> attention maps, failed rows)."""
    if (feats_dir / MANIFEST).is_file():
        m = read_manifest(feats_dir)
        if (m["weights"]["sha256"] == cap.encoder_sha256() and m["image_size"] == cap.image_size
                and feature_kind(m) == cap.features_kind and m["captions"]["sha256"] == sha256_file(captions)
                and feature_file(feats_dir, split, cap.features_kind).is_file()):
            feats = FeatureArray(feats_dir, split, m)
            failed = {f["row"] for f in m["failed"].get(split, []) if f["row"] < n}
            good = [r for r in range(n) if r not in failed]
            beams = dict(zip(good, cap.caption_features(feats[good], batch_size)))
            shown, maps = sorted(beams)[:attention_maps], {}
            for k in range(0, len(shown), batch_size):               # in batches: memory stays flat
                rows = shown[k:k + batch_size]
                maps.update(zip(rows, cap.attention_maps(feats[rows], [beams[r][0] for r in rows])))
            return "cache", beams, maps, failed
    log(f"{feats_dir} does not hold this run's features ({cap.features_kind}, from its encoder): captioning "
        f"from the images")
    res = cap.caption_files(paths[:n], batch_size, progress, attention=bool(attention_maps))
    beams = {r: x.captions for r, x in enumerate(res) if not x.error}
    maps = {r: res[r].attention for r in sorted(beams)[:attention_maps]}
    return "images", beams, maps, {r for r, x in enumerate(res) if x.error}


def _scores(refs: dict[int, list[str]], hyp: dict[int, str], truth: dict) -> dict:
    """COCO metrics of the model, its leave-one-out scores and the human ceiling; content accuracy
    where the dataset records its objects."""
    res = {i: [c] for i, c in hyp.items()}
    with Scorer() as s:
        s.prime(refs, res)                                        # one tokenizer run for all 11 scorings
        scores = {"model": coco_scores(refs, res, s),
                  "model_leave_one_out": model_leave_one_out(refs, hyp, s), "human_ceiling": human_ceiling(refs, s)}
    return {**scores,
            "content": content_accuracy({i: hyp[i] for i in truth}, truth) if truth else None,
            "java": java_available(),
            "notes": ["SPICE is left out: it needs Stanford CoreNLP models downloaded at run time"] +
                     ([] if java_available() else ["METEOR left out and a simple tokenizer used: no Java found"])}


def _word_log_probs(best: list) -> dict | None:
    """The best captions' mean log-probabilities per word (<end> counted): the figures to choose
    --unsure-below from for this run (its in-domain captions should sit above the threshold)."""
    from model.decoding import mean_word_log_prob
    lp = np.array([c.logprob for c in best if np.isfinite(c.logprob)], np.float64)
    if not len(lp):
        return None
    per = mean_word_log_prob(lp, np.array([len(c.ids) for c in best if np.isfinite(c.logprob)]))
    return {"min": float(per.min()), "p01": float(np.percentile(per, 1)), "p05": float(np.percentile(per, 5)),
            "median": float(np.median(per))}


def _named_boxes(vocab, ids: list[int], objects: list[dict], size: tuple[int, int]) -> list:
    """Per word of a caption (ids from <start>), the box of the true object it names, as fractions
    of the (width, height) image (x0, y0, x1, y1), or None."""
    from infer.attention_maps import caption_words
    from model.metrics import named_objects
    w, h = size
    return [None if o is None else
            ((o["cx"] - o["r"]) / w, (o["cy"] - o["r"]) / h, (o["cx"] + o["r"]) / w, (o["cy"] + o["r"]) / h)
            for o in named_objects(caption_words(vocab, ids, len(ids)), objects)]


def _pointing(cap, beams: dict, maps: dict, truth: dict, sizes: dict) -> dict:
    """Pointing accuracy over the split (model.metrics.pointing): the share of the words naming a
    true object whose attention peaks inside that object's box; images of unknown size (image_size_of)
    are left out and counted."""
    from infer.attention_maps import caption_words
    from model.metrics import pointing
    hits = scored = unsized = 0
    for r, t in truth.items():
        if r not in maps:
            continue
        if sizes.get(r) is None:
            unsized += 1
        else:
            words = caption_words(cap.vocab, beams[r][0].ids, len(maps[r]))
            h, s = pointing(words, maps[r], t["objects"], *sizes[r])
            hits, scored = hits + h, scored + s
    return {"words": scored, "hits": hits, "accuracy": hits / scored if scored else None,
            "images_of_unknown_size": unsized}


def _write_attention_maps(cap, beams: dict, maps: dict, paths: list, pub: Publication, boxes: dict, log) -> None:
    """OUT/attention/<image>.png for the rows of `maps` (row -> the best caption's maps), staged in `pub`;
    boxes (row -> per word a box or None, model.metrics.named_objects) are drawn on their words' tiles."""
    from infer.attention_maps import attention_strip, caption_words
    for r, m in maps.items():
        try:
            attention_strip(paths[r], caption_words(cap.vocab, beams[r][0].ids, len(m)), m,
                            pub.path(f"attention/{Path(paths[r]).stem}.png"), boxes=boxes.get(r))
        except Exception as e:  # noqa: BLE001 - a picture that fails is reported, never fatal
            log(f"warning: {paths[r]}: no attention strip ({type(e).__name__}: {e})")


def format_table(m: dict) -> str:
    names = [k for k in METRICS if k in m["model"]]
    cell = lambda x: f"{'-':>20s}" if x is None else f"{x:20.3f}"  # noqa: E731
    lines = [f"{'metric':10s} {'model (all refs)':>20s} {'model (leave-one-out)':>22s} {'human (leave-one-out)':>22s}"]
    for k in names:
        loo, h = m.get("model_leave_one_out", {}).get(k), m["human_ceiling"].get(k)
        lines.append(f"{k:10s} {cell(m['model'][k])}   {cell(loo)}   {cell(h)}")
    lines.append("(compare the model with humans in the leave-one-out columns: both are scored against the "
                 "same references, one fewer than all)")
    if "degenerate" in m:
        lines.append(f"degenerate captions (a word 3 times in a row, a repeated trigram, a bad last word): "
                     f"{m['degenerate']} of {m['images']}; unsure: {m.get('unsure', 0)}")
    if m.get("word_log_prob"):
        w = m["word_log_prob"]
        lines.append(f"log-probability per word of the best captions: min {w['min']:.3f}, 1% {w['p01']:.3f}, "
                     f"5% {w['p05']:.3f}, median {w['median']:.3f} (--unsure-below: set it under this split's 1%)")
    if m.get("content"):
        c = m["content"]
        lines.append(f"content accuracy (exact objects and relations): {100 * c['exact']:.1f}% of {c['images']} images")
        lines.append("  per attribute: " + ", ".join(f"{k} {100 * c[k]:.1f}%" for k in
                                                    ("colour", "shape", "count", "size", "relation") if k in c))
        lines.append("  by objects in the image: " + ", ".join(
            f"{k}: {100 * v['exact']:.1f}% of {v['images']}" for k, v in c.get("by_objects", {}).items()))
    if (m.get("pointing") or {}).get("accuracy") is not None:
        p = m["pointing"]
        lines.append(f"pointing accuracy (attention peak inside the object a colour or shape word names): "
                     f"{100 * p['accuracy']:.1f}% of {p['words']} words"
                     + (f" ({p['images_of_unknown_size']} images of unknown size left out)"
                        if p.get("images_of_unknown_size") else ""))
    return "\n".join(lines)
