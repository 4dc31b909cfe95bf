"""Learning-rate schedules: their shape over a run and clear errors for impossible settings."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import ConfigError
from zoo.optim import WarmupCosine, WarmupStableDecay


def _rates(schedule_cls, total: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = schedule_cls(optimizer, total, **kwargs)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_warmup_stable_decay_holds_the_base_rate_until_the_decay():
    rates = _rates(WarmupStableDecay, 100, warmup=0.1, decay=0.2, min_ratio=0.1)
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert all(r == 1.0 for r in rates[10:80])  # stable
    assert all(a > b for a, b in zip(rates[80:], rates[81:], strict=False))  # decaying
    assert rates[-1] == pytest.approx(0.1, abs=0.01)


def test_warmup_stable_decay_spends_longer_at_the_full_rate_than_cosine():
    wsd, cosine = _rates(WarmupStableDecay, 100), _rates(WarmupCosine, 100)
    assert sum(wsd) > sum(cosine)
    assert wsd[:5] == cosine[:5]  # the same warm-up


@pytest.mark.parametrize("kwargs", [{"decay": 0.0}, {"decay": 1.5}, {"warmup": 0.5, "decay": 0.6}, {"warmup": 1.0}])
def test_impossible_fractions_fail_naming_them(kwargs):
    with pytest.raises(ConfigError, match="WarmupStableDecay: (decay|warmup)="):
        _rates(WarmupStableDecay, 10, **kwargs)
