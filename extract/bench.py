"""Benchmark: end-to-end images/s from JPEG files vs model-only images/s on in-memory tensors.

Both at the same batch size and image size, in one run; medians over repeats. The ratio
end-to-end / model-only says how much the input pipeline costs (target: >= 0.9).
"""
from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def run(image_size: int | None = None, batch_size: int = 32, batches: int = 24, repeats: int = 3,
        images: str | None = None, encoder: str = "inception_v3", log=print) -> dict:
    import tensorflow as tf

    from extract import encoder as enc
    from extract.images import image_dataset
    from prepare import synth
    image_size = image_size or enc.get_spec(encoder).default_image_size
    n = batch_size * batches
    with tempfile.TemporaryDirectory() as tmp:
        if images:
            paths = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        else:
            synth.generate(tmp, {"train": n}, size=max(image_size, 128), seed=0, progress=False)
            paths = sorted((Path(tmp) / "images" / "train").glob("*.jpg"))
        if len(paths) < n:
            raise SystemExit(f"need {n} images, found {len(paths)}")
        model, _ = enc.build_encoder(encoder, "none", image_size)
        forward = enc.compiled_forward(model)
        x = tf.constant(np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3)),
                        tf.uint8)
        forward(x).numpy()  # trace + warm up
        for _ in image_dataset(paths[:batch_size], image_size, batch_size):
            pass
        model_only, e2e = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(batches):
                forward(x).numpy()
            model_only.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            for imgs, ok, _ in image_dataset(paths, image_size, batch_size):
                forward(imgs).numpy()
            e2e.append(n / (time.perf_counter() - t))
    res = {"encoder": encoder, "image_size": image_size, "batch_size": batch_size, "images": n, "repeats": repeats,
           "model_only_img_s": statistics.median(model_only), "end_to_end_img_s": statistics.median(e2e),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    res["ratio"] = res["end_to_end_img_s"] / res["model_only_img_s"]
    log(f"extract bench: {encoder} (TensorFlow {tf.__version__}, CPU, {image_size}px, batch {batch_size}, "
        f"{n} images x {repeats} repeats, medians)")
    log(f"  model only (in-memory tensors): {res['model_only_img_s']:8.1f} img/s")
    log(f"  end to end (JPEG files):        {res['end_to_end_img_s']:8.1f} img/s")
    log(f"  ratio end-to-end / model-only:  {res['ratio']:8.3f}   (target >= 0.9)")
    log(f"  peak memory (RSS):              {res['peak_rss_mib']:8.0f} MiB")
    return res
