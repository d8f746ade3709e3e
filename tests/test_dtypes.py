"""spo.dtypes: the precision names and stochastic rounding to bf16 (bf16 master weights, `--full-bf16`)."""

from __future__ import annotations

import pytest
import torch

from spo.dtypes import stochastic_round_bf16


def test_rounds_to_a_neighbour_with_the_probability_of_the_gap():
    g = torch.Generator().manual_seed(0)
    x = torch.full((100_000,), 1.0 + 2**-10)  # 1/8 of the way from 1 to the next bf16 (1 + 2**-7)
    y = stochastic_round_bf16(x, g)
    assert y.dtype == torch.bfloat16 and set(y.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs((y.float() > 1).double().mean().item() - 0.125) < 0.005
    negative = stochastic_round_bf16(-x, g).float()
    assert set(negative.unique().tolist()) == {-1.0, -1.0 - 2**-7}  # the magnitude rounds, the sign stays


def test_representable_values_and_specials_are_kept():
    x = torch.cat([torch.randn(1000).bfloat16().float(), torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])
    assert torch.equal(stochastic_round_bf16(x, torch.Generator().manual_seed(1)), x.bfloat16())
    assert stochastic_round_bf16(torch.tensor([float("nan")])).isnan().all()


def test_small_updates_survive_where_round_to_nearest_loses_them():
    """1000 steps of +1e-4 on a weight of 1 (a bf16 step there is 2**-7 = 0.0078): round to nearest never moves it;
    stochastic rounding ends near 1.1, the fp32 result."""
    g = torch.Generator().manual_seed(2)
    nearest = stochastic = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(1000):
        nearest = (nearest.float() + 1e-4).bfloat16()
        stochastic = stochastic_round_bf16(stochastic.float() + 1e-4, g)
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert abs(stochastic.float().mean().item() - 1.1) < 0.005


def test_only_fp32_in():
    with pytest.raises(ValueError, match="fp32"):
        stochastic_round_bf16(torch.ones(2, dtype=torch.float16))
