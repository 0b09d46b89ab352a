"""lr_factor: warmup, step decay at the milestones, cosine to zero."""

import pytest

from sge_repro.classification.schedule import lr_factor
from sge_repro.params_sections import TrainClsParams


def test_lr_schedules():
    step_params = TrainClsParams(epochs=6, lr_schedule="step", milestones=[2, 4], warmup_epochs=0)
    step = [lr_factor(i, 10, step_params) for i in (0, 19, 20, 39, 40, 59)]
    assert step == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine_params = TrainClsParams(epochs=6, lr_schedule="cosine", milestones=[], warmup_epochs=1)
    warm = [lr_factor(i, 10, cosine_params) for i in (0, 4, 9, 10, 59)]
    assert warm[:3] == pytest.approx([0.1, 0.5, 1.0]) and warm[3] == pytest.approx(1.0)
    assert warm[4] < 0.01
