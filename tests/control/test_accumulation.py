"""Dynamic gradient accumulation: the noise signal and the controller on synthetic streams."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deepsynapse.control.accumulation import (
    AccumulationConfig,
    AccumulationController,
    MicrobatchGradients,
    microbatch_gradient_cosine,
)
from deepsynapse.control.knobs import Knobs


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_cosine_by_hand():
    assert microbatch_gradient_cosine([[t(1, 0), t(0.0)], [t(0, 1), t(0.0)]]) == 0.0
    assert microbatch_gradient_cosine([[t(1, 2), t(3.0)], [t(2, 4), t(6.0)]]) == pytest.approx(1)
    assert microbatch_gradient_cosine([[t(1, 2)], [t(-1, -2)]]) == pytest.approx(-1)
    # three pieces: pairs (a,b)=1, (a,c)=0, (b,c)=0 -> mean 1/3; the vector spans both params
    a, b, c = [t(1, 0), t(0.0)], [t(2, 0), t(0.0)], [t(0, 0), t(5.0)]
    assert microbatch_gradient_cosine([a, b, c]) == pytest.approx(1 / 3)
    # None counts as a zero gradient; a zero piece is left out of the pairs
    assert microbatch_gradient_cosine([[t(1, 1), None], [t(1, 1), t(1.0)]]) == pytest.approx(
        2 / math.sqrt(2 * 3)
    )
    assert microbatch_gradient_cosine([[t(1, 0)], [t(0, 0)], [t(1, 0)]]) == pytest.approx(1)
    assert math.isnan(microbatch_gradient_cosine([[t(1, 0)]]))
    with pytest.raises(ValueError):
        microbatch_gradient_cosine([[t(1, 0)], [t(1, 0), t(1.0)]])


def test_recorder_recovers_each_microbatch_gradient_from_accumulated_grads():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    xs = [torch.randn(5, 4) for _ in range(3)]

    def grads_of(x):
        layer.zero_grad(set_to_none=True)
        layer(x).pow(2).sum().backward()
        return [p.grad.clone() for p in layer.parameters()]

    separate = [grads_of(x) for x in xs]
    layer.zero_grad(set_to_none=True)
    rec = MicrobatchGradients(layer.parameters())
    for x in xs:  # accumulate as the trainer does, capturing after each backward
        layer(x).pow(2).sum().backward()
        rec.capture()
    for got, want in zip(rec.pieces, separate, strict=True):
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))
    assert rec.cosine() == pytest.approx(microbatch_gradient_cosine(separate), abs=1e-6)
    rec.reset()
    assert rec.pieces == [] and math.isnan(rec.cosine())


def stream(ctl, values, start=0):
    out = []
    for i, v in enumerate(values):
        k = Knobs(temperature=1.0, beta=0.0, reward_weights={}, max_new_tokens=8)
        ctl.apply(k)
        events = ctl.observe(start + i, {} if v is None else {"grad/microbatch_cosine": v})
        out.append((k.accumulation_steps, events))
    return out


def cfg(**kw) -> AccumulationConfig:
    return AccumulationConfig(
        **{"enabled": True, "min_steps": 1, "max_steps": 3, "initial": 1, "low": 0.1,
           "high": 0.3, "cooldown": 2, "warmup": 3, "ewma": 0.5, **kw}
    )  # fmt: skip


def test_noisy_gradients_raise_accumulation_within_bounds_with_cooldown():
    rows = stream(AccumulationController(cfg()), [0.0] * 12)
    steps = [s for s, _ in rows]
    # decision after 3 measurements (step 2), then 2 quiet steps of cooldown each time
    assert steps == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    changes = [e for _, evs in rows for e in evs]
    assert [(e.evidence["old"], e.evidence["new"]) for e in changes] == [(1, 2), (2, 3)]
    assert changes[0].kind == "accumulation_changed" and changes[0].evidence["reason"] == "noisy"
    assert changes[0].evidence["threshold"] == 0.1 and changes[0].evidence["bounds"] == [1, 3]


def test_consistent_gradients_lower_it_and_the_band_holds():
    ctl = AccumulationController(cfg(initial=3))
    assert [s for s, _ in stream(ctl, [0.9] * 12)][-1] == 1
    ctl = AccumulationController(cfg(initial=2))
    rows = stream(ctl, [0.2, 0.25, 0.15, 0.2] * 5)  # always inside (low, high)
    assert {s for s, _ in rows} == {2} and all(not evs for _, evs in rows)


def test_ewma_smooths_a_single_outlier_and_nan_is_ignored():
    ctl = AccumulationController(cfg(initial=2, ewma=0.2))
    rows = stream(ctl, [0.2, 0.2, 0.2, -1.0, None, float("nan"), 0.2, 0.2])
    # one -1.0 pulls the EWMA to 0.2*(-1) + 0.8*0.2 = -0.04 < 0.1: noisy -> up once
    assert [s for s, _ in rows] == [2, 2, 2, 2, 3, 3, 3, 3]
    assert ctl.observations == 6
    ctl = AccumulationController(cfg(initial=2, ewma=0.2, low=-0.5))
    assert {s for s, _ in stream(ctl, [0.2, 0.2, 0.2, -1.0, 0.2])} == {2}


def test_noise_scale_signal_is_read_the_other_way_round():
    ctl = AccumulationController(cfg(signal="noise_scale", low=10.0, high=100.0))
    for i in range(5):  # up at the third measurement, then two steps of cooldown
        ctl.observe(i, {"grad/noise_scale": 500.0})
    assert ctl.steps == 2
    for i in range(5, 20):
        ctl.observe(i, {"grad/noise_scale": 1.0})
    assert ctl.steps == 1


def test_same_metrics_same_decisions_and_state_round_trip():
    values = [0.0, 0.05, 0.5, 0.0, -0.2, 0.4, 0.9, 0.8, 0.0, 0.0, 0.6, 0.95, 0.9]
    a, b = AccumulationController(cfg()), AccumulationController(cfg())
    ra, rb = stream(a, values), stream(b, values)  # two ranks seeing the all-reduced metric
    assert [(s, [e.evidence for e in evs]) for s, evs in ra] == [
        (s, [e.evidence for e in evs]) for s, evs in rb
    ]
    c = AccumulationController(cfg())
    stream(c, values[:5])
    d = AccumulationController(cfg())
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    rc, rd = stream(c, values[5:], start=5), stream(d, values[5:], start=5)
    assert [(s, len(e)) for s, e in rc] == [(s, len(e)) for s, e in rd]
    assert [s for s, _ in rc] == [s for s, _ in ra[5:]]
    assert c.state_dict() == d.state_dict() and c.metrics() == d.metrics()


def test_config_validation():
    with pytest.raises(ValueError, match="min_steps <= initial <= max_steps"):
        AccumulationConfig(min_steps=2, initial=1)
    with pytest.raises(ValueError, match="low < high"):
        AccumulationConfig(low=0.5, high=0.5)
    with pytest.raises(ValueError, match="ewma"):
        AccumulationConfig(ewma=0.0)
