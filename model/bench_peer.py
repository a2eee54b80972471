"""The PyTorch peer of `python -m model bench`: the same decoder written plainly in PyTorch (packed
sequences, logits for real tokens only, dropout 0.3 on the LSTM's input and output, Adam, gradient
clipping at 5), timed on the very batches our step was timed on. Optional: PyTorch is not a
dependency of this project (`pip install torch --index-url https://download.pytorch.org/whl/cpu`).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(data, vocab: int, size: int, feature_dim: int, dropout: float = 0.3, warmup: int = 2) -> dict:
    """data: [(features [B, F] float32, ids [B, T] int32 padded with 0, real target count)];
    -> {"ms_per_step", "real_tokens_s", "torch"} (medians over the batches after the warm-up)."""
    import torch
    from torch import nn
    torch.manual_seed(0)

    class Peer(nn.Module):
        def __init__(self):
            super().__init__()
            self.image = nn.Linear(feature_dim, size)
            self.embed = nn.Embedding(vocab, size)
            self.lstm = nn.LSTM(size, size, batch_first=True)
            self.drop = nn.Dropout(dropout)
            self.logits = nn.Linear(size, vocab)

        def forward(self, f, ids, lengths):
            x = self.drop(torch.cat([self.image(f)[:, None], self.embed(ids[:, :-1])], 1))   # [B, T, E]
            pack = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(pack)
            tgt = nn.utils.rnn.pack_padded_sequence(ids, lengths, batch_first=True, enforce_sorted=False)
            b = int(out.batch_sizes[0])                       # drop the output after the image
            return nn.functional.cross_entropy(self.logits(self.drop(out.data[b:])), tgt.data[b:])

    model = Peer()
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    times, toks = [], []
    for k, (f, ids, n_real) in enumerate(data):
        lengths = torch.as_tensor((ids > 0).sum(1))                # <start> ... <end>: the LSTM's steps
        f, ids = torch.from_numpy(f), torch.from_numpy(ids.astype(np.int64))
        t = time.perf_counter()
        opt.zero_grad()
        loss = model(f, ids, lengths)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        loss.item()
        if k >= warmup:
            times.append(time.perf_counter() - t)
            toks.append(n_real)
    sec = statistics.median(times)
    return {"ms_per_step": 1000 * sec, "real_tokens_s": statistics.median(toks) / sec, "torch": torch.__version__}
