"""Rank 0's progress lines and epoch means (xbt_ray.train.distributed.Progress), by hand."""
import logging

import pytest
import torch

from xbt_ray.train.distributed import Progress, Reporting


class _Engine:
    def get_lr(self):
        return [2.5e-4]


def test_progress_logs_every_n_steps_and_averages_each_epoch(caplog):
    reporting = Reporting(label="stage1", every_steps=2)
    progress = Progress(reporting, rank=0, steps_per_epoch=3, epochs=2, start_epoch=0,
                        global_batch=128)
    with caplog.at_level(logging.INFO, logger="xbt_ray.train.distributed"):
        for loss in (1.0, 2.0, 3.0):
            progress.step(_Engine(), loss=torch.tensor(loss), cosine=torch.tensor(loss / 10))
        metrics = progress.end_epoch(0)
    assert metrics == {"loss": 2.0, "cosine": pytest.approx(0.2), "epoch": 0, "steps": 3}
    lines = [r.getMessage() for r in caplog.records]
    # step 2 of 6: the window's means (1 + 2) / 2 and (0.1 + 0.2) / 2, the lr, rows/s, ETA
    assert lines[0].startswith("stage1 step 2/6 loss 1.5000 cosine 0.1500 lr 2.50e-04 ")
    assert "rows/s ETA " in lines[0]
    assert lines[1] == "stage1 epoch 0: loss 2.0000 cosine 0.2000 over 3 steps"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xbt_ray.train.distributed"):
        progress.step(_Engine(), loss=torch.tensor(5.0), cosine=torch.tensor(0.0))
    # step 4 closes a window that began with epoch 1 (not with epoch 0's checkpoint): step 4 only
    assert caplog.records[0].getMessage().startswith("stage1 step 4/6 loss 5.0000 cosine 0.0000")
    assert progress.end_epoch(1)["loss"] == 5.0   # the epoch's own steps only


def test_other_ranks_and_every_steps_zero_log_nothing_between_epochs(caplog):
    with caplog.at_level(logging.INFO, logger="xbt_ray.train.distributed"):
        for rank, every in ((1, 2), (0, 0)):
            progress = Progress(Reporting("stage2", every), rank, 4, 1, 0, 64)
            for _ in range(4):
                progress.step(_Engine(), loss=torch.tensor(1.0))
            assert progress.end_epoch(0)["loss"] == 1.0
    assert [r.getMessage() for r in caplog.records] == ["stage2 epoch 0: loss 1.0000 over 4 steps"]


def test_resumed_run_counts_steps_from_its_start_epoch(caplog):
    progress = Progress(Reporting("demo-clip", 1), 0, steps_per_epoch=5, epochs=3, start_epoch=2,
                        global_batch=32)
    with caplog.at_level(logging.INFO, logger="xbt_ray.train.distributed"):
        progress.step(_Engine(), loss=torch.tensor(0.5))
    assert caplog.records[0].getMessage().startswith("demo-clip step 11/15 loss 0.5000")
