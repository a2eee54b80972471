"""prepare/captions_h5.py: the format version and the vocabulary's tokenizer are checked on every read."""
import shutil

import h5py
import pytest

from prepare import captions_h5
from prepare.errors import UserError


def test_a_newer_or_missing_format_version_is_refused_in_one_line(tiny_dataset, tmp_path):
    path = tmp_path / "captions.h5"
    shutil.copy(tiny_dataset / "captions.h5", path)
    assert captions_h5.read_attrs(path)["format_version"] == captions_h5.FORMAT_VERSION
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = captions_h5.FORMAT_VERSION + 1
    with pytest.raises(UserError, match=rf"{path}: format version {captions_h5.FORMAT_VERSION + 1}, newer than this "
                                        r"version reads .*update this project, or re-create it with "
                                        r"`python -m prepare captions --overwrite`"):
        captions_h5.read_split(path, "train")
    with h5py.File(path, "r+") as f:
        del f.attrs["format_version"]
    for read in (captions_h5.read_vocab, captions_h5.split_names, captions_h5.read_attrs):
        with pytest.raises(UserError, match=rf"{path}: made by an older version \(format version None.*--overwrite"):
            read(path)


def test_an_unknown_tokenizer_in_the_file_is_a_one_line_error(tiny_dataset, tmp_path):
    path = tmp_path / "captions.h5"
    shutil.copy(tiny_dataset / "captions.h5", path)
    with h5py.File(path, "r+") as f:
        f["vocab"].attrs["tokenizer"] = "bpe"
    with pytest.raises(UserError, match=rf"{path}: its vocabulary is damaged \(unknown tokenizer 'bpe'.*--overwrite"):
        captions_h5.read_vocab(path)
