"""``last.ckpt`` at the end of every training epoch, the file a resume reads.

``ModelCheckpoint(save_last=True)`` in Lightning 2.6 rewrites ``last.ckpt`` only when it also writes a best
checkpoint, so once the monitored metric stops improving ``last.ckpt`` falls behind the run and a resume repeats
epochs. This one keeps the latest state whatever the metrics do; as its own class it has its own checkpoint state
key beside any ``ModelCheckpoint`` (two of those with equal settings may not share a Trainer).
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/<filename>.ckpt`` at every training epoch's end, replacing the previous one."""

    def __init__(self, dirpath: str, filename: str = "last"):
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, save_on_train_epoch_end=True,
                         enable_version_counter=False)
