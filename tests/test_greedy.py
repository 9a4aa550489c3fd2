"""The greedy pick with logit_bias: the shortcut that skips the biased copy of the logits must
choose what argmax of the biased copy chooses, ties and odd values included."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.engines.chat import biased_argmax, greedy_token


def test_random_rows_and_biases_agree() -> None:
    rng = np.random.default_rng(7)
    for _ in range(3000):
        # small integer logits and biases: ties between a biased token and the maximum are common
        row = rng.integers(-4, 4, size=int(rng.integers(2, 40))).astype(np.float32)
        tokens = rng.choice(len(row), size=int(rng.integers(1, len(row) + 1)), replace=False)
        bias = {int(t): float(rng.integers(-5, 6)) for t in tokens}
        assert greedy_token(row, bias) == biased_argmax(row, bias), (row, bias)


@pytest.mark.parametrize(("row", "bias", "want"), [
    ([1.0, 3.0, 2.0], {0: 2.0}, 0),  # ties the maximum from an earlier index: the earlier wins
    ([1.0, 3.0, 2.0], {2: 1.0}, 1),  # ties it from a later index: the maximum stays
    ([1.0, 3.0, 2.0], {1: -100.0}, 2),  # the maximum itself forbidden (end of sequence)
    ([1.0, float("nan"), 2.0], {0: 1.0}, 1),  # NaN wins argmax, as in numpy
    ([float("inf"), 1.0, 2.0], {0: float("-inf")}, 0),  # inf - inf is NaN
    ([0.1, 0.2, 0.3], {0: 0.2 + 1e-9}, 0),  # a tie in float32 (in float64 it would not be)
])
def test_edge_cases(row: list[float], bias: dict[int, float], want: int) -> None:
    values = np.array(row, dtype=np.float32)
    assert biased_argmax(values, bias) == want
    assert greedy_token(values, bias) == want


def test_float32_rounding_of_the_bias() -> None:
    rng = np.random.default_rng(3)
    for _ in range(2000):
        row = rng.standard_normal(8).astype(np.float32)
        best = int(row.argmax())
        other = (best + 1) % 8
        # a bias that brings `other` to within float32 rounding of the maximum
        bias = {other: float(row[best]) - float(row[other]) + float(rng.normal(0, 1e-7))}
        assert greedy_token(row, bias) == biased_argmax(row, bias), (row, bias)
