"""The promotion gate, every mode, as a pure function."""

from __future__ import annotations

import pytest

from lora_service.versions.gate import decide


def test_always_promotes_even_a_worse_version() -> None:
    ok, reason = decide("always", 0.05, 2.0, 1.0)
    assert ok and "2" in reason and "1" in reason


def test_manual_holds_even_a_better_version() -> None:
    ok, reason = decide("manual", 0.05, 0.5, 1.0)
    assert not ok and reason.startswith("promote: manual") and "0.5" in reason


def test_manual_holds_a_first_version() -> None:
    assert decide("manual", 0.05, None, None)[0] is False


@pytest.mark.parametrize(
    ("known", "parent", "promoted"),
    [
        (1.0, 1.0, True),  # equal
        (0.9, 1.0, True),  # better
        (1.05, 1.0, True),  # exactly at the relative tolerance
        (1.0501, 1.0, False),  # just over it
        (2.0, 1.0, False),
        (0.0106, 0.01, False),  # relative: 5 % of a small loss is small
        (0.0104, 0.01, True),
    ],
)
def test_if_not_worse_uses_a_relative_tolerance(
    known: float, parent: float, promoted: bool
) -> None:
    ok, reason = decide("if_not_worse", 0.05, known, parent)
    assert ok is promoted
    assert f"{known:.6g}" in reason and f"{parent:.6g}" in reason
    if not promoted:
        assert reason.startswith("held") and "5% tolerance" in reason


@pytest.mark.parametrize(("known", "parent"), [(None, 1.0), (1.0, None), (None, None)])
def test_if_not_worse_promotes_when_nothing_compares(
    known: float | None, parent: float | None
) -> None:
    ok, reason = decide("if_not_worse", 0.05, known, parent)
    assert ok and "nothing to compare" in reason


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="sometimes"):
        decide("sometimes", 0.05, 1.0, 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_child_is_held_pooled_per_batch_and_as_a_first_version(bad: float) -> None:
    """NaN compares false with everything: without care a diverged child passes every check."""
    assert decide("if_not_worse", 0.05, bad, 1.0)[0] is False
    assert decide("if_not_worse", 0.05, bad, None)[0] is False
    ok, reason = decide("if_not_worse", 0.05, 1.0, 1.0, per_batch={"a": bad},
                        parent_per_batch={"a": 1.0})
    assert not ok and "batch a" in reason
