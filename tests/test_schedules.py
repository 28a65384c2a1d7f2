import math
import warnings

import pytest

from plugins.core.errors import ConfigError, ScheduleWarning
from plugins.core.schedules import Schedule, build_schedule, shape
from runner.validation import check_schedule_windows
from tests.conftest import compose_config


@pytest.mark.parametrize(
    "kind,t,expected",
    [
        ("constant", 0.3, 0.9),
        ("linear", 0.0, 0.0),
        ("linear", 0.25, 0.225),
        ("linear", 1.0, 0.9),
        ("cosine", 0.5, 0.45),
        ("cosine", 1.0, 0.9),
        ("cubic", 0.0, 0.0),
        ("cubic", 0.5, 0.9 - 0.9 * 0.125),
        ("cubic", 1.0, 0.9),
        ("step", 0.24, 0.0),
        ("step", 0.25, 0.225),
        ("step", 0.99, 0.675),
        ("step", 1.0, 0.9),
    ],
)
def test_shapes_exact(kind, t, expected):
    assert shape(kind, 0.0, 0.9, t) == pytest.approx(expected, abs=1e-12)


def test_exponential_is_geometric():
    assert shape("exponential", 1e-3, 1e-1, 0.5) == pytest.approx(1e-2)


def test_cubic_matches_zhu_gupta():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 with t0 = 2, n dt = 10
    sched = Schedule("cubic", start=0.1, end=0.8, begin_epoch=2, end_epoch=12)
    for epoch in range(2, 13):
        expected = 0.8 + (0.1 - 0.8) * (1 - (epoch - 2) / 10) ** 3
        assert sched.value_at(epoch, 0, 10) == pytest.approx(expected, abs=1e-12)


def test_epoch_mode_updates_at_epoch_starts_inside_window():
    sched = Schedule("linear", 0.0, 1.0, begin_epoch=1, end_epoch=3)
    due = [e for e in range(6) if sched.due(e, e * 10, 10, epoch_start=True)]
    assert due == [1, 2, 3]
    assert not sched.due(2, 25, 10, epoch_start=False)
    assert sched.value_at(0, 0, 10) == 0.0 and sched.value_at(5, 50, 10) == 1.0


def test_step_mode_updates_every_n_steps():
    sched = Schedule("linear", 0.0, 1.0, begin_epoch=1, end_epoch=2, every_n_steps=4)
    due = [s for s in range(0, 30) if sched.due(s // 10, s, 10, epoch_start=s % 10 == 0)]
    assert due == [10, 14, 18, 20]
    assert sched.value_at(1, 14, 10) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"kind": "quadratic"}, "schedule.kind"),
        ({"begin_epoch": 5, "end_epoch": 2}, "schedule.end_epoch"),
        ({"begin_epoch": -1}, "schedule.begin_epoch"),
        ({"every_n_steps": 0}, "schedule.every_n_steps"),
        ({"start": math.nan}, "schedule.start"),
        ({"kind": "exponential", "start": 0.0, "end": 1.0}, "schedule.start"),
    ],
)
def test_bad_schedules_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        Schedule(**kwargs)
    assert err.value.key == key


def test_build_schedule_names_the_callers_key():
    with pytest.raises(ConfigError, match=r"sparsity\.schedule\.end_epoch"):
        build_schedule({"begin_epoch": 3, "end_epoch": 1}, key="sparsity.schedule")
    with pytest.raises(ConfigError, match=r"pruning\.schedule\.speed"):
        build_schedule({"speed": 3}, key="pruning.schedule")


def test_a_schedule_that_ends_after_the_run_is_named_in_a_warning():
    late = compose_config(["sparsity=gmp", "trainer.max_epochs=3", "sparsity.schedule.end_epoch=50"])
    with pytest.warns(ScheduleWarning, match=r"sparsity.schedule.end_epoch=50 is not before trainer.max_epochs=3.*sparsity.schedule.end=0.8"):
        check_schedule_windows(late)
    within = compose_config(["sparsity=gmp", "trainer.max_epochs=3", "sparsity.schedule.end_epoch=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleWarning)
        check_schedule_windows(within)
