"""LR schedules: values at the key steps for every kind and decay shape, and no climb after the end."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.train.schedules import SHAPES, lr_at, make_schedule

PEAK = 3e-3


def test_warmup_ramps_linearly_to_the_peak_on_its_last_step():
    s = make_schedule("constant", PEAK, total=100, warmup=10)
    assert [lr_at(i, s) for i in range(10)] == pytest.approx([PEAK * (i + 1) / 10 for i in range(10)])
    assert lr_at(0, s) > 0  # no step trains at LR 0
    assert lr_at(9, s) == PEAK
    assert all(lr_at(i, s) == PEAK for i in range(10, 100))


def test_warmup_fraction_is_a_share_of_the_steps():
    assert make_schedule("constant", PEAK, total=200, warmup=0.05).warmup_steps == 10
    assert make_schedule("constant", PEAK, total=200, warmup=7).warmup_steps == 7
    assert make_schedule("constant", PEAK, total=5, warmup=50).warmup_steps == 5  # never longer than the run


def test_cosine_key_steps():
    total, w, ratio = 110, 10, 0.1
    s = make_schedule("cosine", PEAK, total=total, warmup=w, final_lr_ratio=ratio)
    final = PEAK * ratio
    # Progress p = (step - w + 1) / (total - w): the middle of the decay is p = 1/2.
    assert lr_at(w + 49, s) == pytest.approx(final + (PEAK - final) * 0.5)
    assert lr_at(w, s) == pytest.approx(final + (PEAK - final) * 0.5 * (1 + math.cos(math.pi / 100)))
    assert lr_at(total - 1, s) == pytest.approx(final)  # the last step trains at the final LR


def test_linear_decays_to_the_floor():
    s = make_schedule("linear", PEAK, total=101, warmup=1, final_lr_ratio=0.2)
    floor = PEAK * 0.2
    assert lr_at(0, s) == PEAK
    assert lr_at(50, s) == pytest.approx(PEAK + (floor - PEAK) * 0.5)
    assert lr_at(100, s) == pytest.approx(floor)


@pytest.mark.parametrize("shape", SHAPES)
def test_wsd_phases_and_shapes(shape: str):
    total, ratio = 100, 1 / 3
    s = make_schedule("wsd", PEAK, total=total, warmup=5, decay_fraction=0.2, decay_shape=shape, final_lr_ratio=ratio)
    final = PEAK * ratio
    assert s.decay_start == 80
    assert lr_at(4, s) == PEAK  # end of warmup
    assert all(lr_at(i, s) == PEAK for i in range(5, 80))  # stable phase
    r = (89 - 80 + 1) / 20  # halfway through the decay
    expected = {
        "linear": PEAK + (final - PEAK) * r,
        "cosine": final + (PEAK - final) * 0.5 * (1 + math.cos(math.pi * r)),
        "1-sqrt": PEAK * (1 - math.sqrt(r)) + final * math.sqrt(r),
    }[shape]
    assert lr_at(89, s) == pytest.approx(expected)
    assert lr_at(99, s) == pytest.approx(final)
    decay = [lr_at(i, s) for i in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing during the decay


def test_one_minus_sqrt_drops_faster_early_than_linear():
    kw = dict(total=100, warmup=0, decay_fraction=0.5, final_lr_ratio=0.0)
    sqrt_s = make_schedule("wsd", PEAK, decay_shape="1-sqrt", **kw)
    lin_s = make_schedule("wsd", PEAK, decay_shape="linear", **kw)
    # r = 0.25 -> 1 - sqrt(0.25) = 0.5 of the peak, against 0.75 for linear.
    assert lr_at(50 + 12, sqrt_s) == pytest.approx(PEAK * (1 - math.sqrt(13 / 50)))
    assert lr_at(62, sqrt_s) < lr_at(62, lin_s)


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_no_climb_after_the_last_step(kind: str):
    s = make_schedule(kind, PEAK, total=50, warmup=5, final_lr_ratio=0.01)
    last = lr_at(49, s)
    after = [lr_at(i, s) for i in range(50, 400)]
    assert all(v == last for v in after)  # HF's cosine would climb back toward the peak here


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["constant", "cosine", "linear", "wsd"]),
    shape=st.sampled_from(SHAPES),
    total=st.integers(1, 500),
    warmup=st.integers(0, 50),
    decay_fraction=st.floats(0, 1, exclude_min=True),
    ratio=st.floats(0, 1),
)
def test_schedule_is_bounded_and_never_rises_after_warmup(kind, shape, total, warmup, decay_fraction, ratio):
    s = make_schedule(kind, PEAK, total=total, warmup=warmup, final_lr_ratio=ratio,
                      decay_fraction=decay_fraction, decay_shape=shape)
    values = [lr_at(i, s) for i in range(total + 20)]
    assert all(0 <= v <= PEAK * (1 + 1e-12) for v in values)
    post = values[s.warmup_steps:]
    assert all(b <= a + 1e-15 for a, b in zip(post, post[1:]))
    if kind != "constant" and s.warmup_steps < total:  # a step after warmup: the last one is at the final LR
        assert values[total - 1] == pytest.approx(PEAK * ratio, abs=1e-15)


def test_wsd_decays_on_at_least_the_last_step_and_refuses_no_decay():
    # 0.1% of 200 steps rounds to no step at all: the run would end at the peak, not at the final LR.
    s = make_schedule("wsd", PEAK, total=200, warmup=0, decay_fraction=0.001, final_lr_ratio=1 / 3)
    assert s.decay_start == 199 and lr_at(198, s) == PEAK
    assert lr_at(199, s) == pytest.approx(PEAK / 3)
    with pytest.raises(ValueError, match="decay_fraction"):
        make_schedule("wsd", PEAK, total=200, decay_fraction=0.0)


def test_wsd_without_decay_is_a_config_error_naming_the_key():
    from pipeline.core.errors import ConfigError
    from pipeline.engine.config import validate_config

    with pytest.raises(ConfigError, match=r"train\.schedule\.decay_fraction: wsd with decay_fraction 0 never decays"):
        validate_config({"train": {"schedule": {"kind": "wsd", "decay_fraction": 0}}})
    with pytest.raises(ConfigError, match=r"train\.schedule\.decay_fraction"):
        validate_config({"train": {"schedule": {"decay_fraction": 0}}})  # wsd is the default kind
    validate_config({"train": {"schedule": {"kind": "constant", "decay_fraction": 0}}})  # unused there: fine


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        make_schedule("step", PEAK, total=10)
    with pytest.raises(ValueError, match="decay_shape"):
        make_schedule("wsd", PEAK, total=10, decay_shape="exp")
    with pytest.raises(ValueError, match="at least one step"):
        make_schedule("wsd", PEAK, total=0)
