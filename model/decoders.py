"""The decoder registry: the class each config.decoder name stands for (model/config.py's DECODERS
lists the names), and build_decoder, the one way every stage makes a decoder."""
from __future__ import annotations


def decoder_class(name: str):
    """config.decoder -> its Decoder subclass (imported on demand: each module imports model.decoder)."""
    if name == "show_and_tell":
        from model.decoder import ShowAndTell
        return ShowAndTell
    if name == "attention":
        from model.attention import AttendAndTell
        return AttendAndTell
    if name == "transformer":
        from model.transformer import TransformerDecoder
        return TransformerDecoder
    raise ValueError(f"unknown decoder {name!r}")


def build_decoder(config, manifest: dict | None = None, seed: int | None = None):
    """The decoder a config names, with every weight created. With a feature manifest (the cache's,
    or a run's copy of it) it normalises features with the manifest's train statistics."""
    m = decoder_class(config.decoder)(config, seed)
    m.build_all()
    if manifest is not None:
        m.set_feature_stats(manifest["train_stats"]["mean"], manifest["train_stats"]["std"])
    return m
