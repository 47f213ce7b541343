"""Training progress lines (nidl_dino.training.progress): one per epoch, with the numbers people need."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from nidl_dino import DINO
from nidl_dino.training.progress import EpochProgress, format_duration, quiet_lightning

from dino_fixtures import QUIET_TRAINER, SMALL_HEAD, TinyConv3d, views_loader


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (7620, "2h07m"), (-3, "0s")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def _three_epochs(*callbacks):
    """A tiny DINO for 3 epochs of 2 steps (with ``views_loader(batch_size=4, n=8)``)."""
    return DINO(
        TinyConv3d,
        encoder_kwargs={"dim": 8},
        **SMALL_HEAD,
        num_local_crops=2,
        max_epochs=3,
        random_state=0,
        **QUIET_TRAINER,
        callbacks=list(callbacks),
    )


def test_one_line_per_epoch_with_step_loss_entropy_lr_speed_and_time_left(caplog):
    logger = logging.getLogger("test_progress")
    model = _three_epochs(EpochProgress(logger))
    with caplog.at_level(logging.INFO, logger="test_progress"):
        model.fit(views_loader(batch_size=4, n=8))  # 2 steps per epoch
    lines = [r.getMessage() for r in caplog.records if r.name == "test_progress"]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 3, lines
    pattern = re.compile(
        r"epoch (\d+)/3  step (\d+)  loss ([\d.]+)  teacher entropy ([\d.]+)  lr (\S+)  "
        r"([\d.]+) steps/s  (\S+) left"
    )
    for i, line in enumerate(epochs, start=1):
        match = pattern.fullmatch(line)
        assert match, line
        assert int(match.group(1)) == i and int(match.group(2)) == 2 * i
        assert 0 < float(match.group(3)) < 10 and float(match.group(6)) > 0
    assert epochs[-1].endswith(" 0s left")
    assert lines[0].startswith("training: 3 of 3 epochs to go, 2 batches per epoch")


def test_quiet_lightning_drops_only_the_named_noise(caplog):
    quiet_lightning()
    quiet_lightning()  # idempotent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_lightning()  # filters are (re)installed after simplefilter
        warnings.warn(
            "The `srun` command is available on your system but is not used.", stacklevel=1
        )
        warnings.warn("something else", stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        rank_zero.info("GPU available: False")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["GPU available: False"]


def test_a_non_finite_epoch_loss_stops_training_with_one_line():
    import math

    import pytorch_lightning as pl
    import torch

    from nidl_dino.errors import UserError

    class Diverge(pl.Callback):
        """Weights gone to NaN after the first step, as a bad bf16 gradient leaves them."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                with torch.no_grad():
                    for p in pl_module.student.parameters():
                        p.fill_(math.nan)

    model = _three_epochs(EpochProgress(logging.getLogger("test_progress")), Diverge())
    with pytest.raises(UserError, match=r"training loss is not finite \(nan\) in epoch 1 \(step 2"):
        model.fit(views_loader(batch_size=4, n=8))
    assert model.trainer.current_epoch == 0  # stopped at the end of the first epoch


def test_the_diverged_epoch_leaves_the_last_finite_checkpoint(tmp_path):
    import math

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from nidl_dino.errors import UserError

    class Diverge(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # in the second epoch
                with torch.no_grad():
                    for p in pl_module.student.parameters():
                        p.fill_(math.nan)

    # the checkpoint callback listed first, as in training.run: Lightning still runs it last
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_epochs=1, save_top_k=1)
    model = DINO(
        TinyConv3d,
        encoder_kwargs={"dim": 8},
        **SMALL_HEAD,
        num_local_crops=2,
        max_epochs=3,
        random_state=0,
        **{**QUIET_TRAINER, "enable_checkpointing": True},
        callbacks=[last, EpochProgress(logging.getLogger("test_progress")), Diverge()],
    )
    with pytest.raises(UserError, match=r"not finite \(nan\) in epoch 2 "):
        model.fit(views_loader(batch_size=4, n=8))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0 and saved["global_step"] == 2  # the first epoch's, not the NaN one
    assert all(
        torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point()
    )
