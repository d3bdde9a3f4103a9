"""The pure token lifecycle: every timing rule on both sides of its deadline."""

from __future__ import annotations

import pytest

from wsgate.session.lifecycle import Action, LifecycleConfig, TokenLifecycle

T0 = 1_000_000.0


@pytest.mark.parametrize(
    ("lifetime", "ahead", "warn_at"),
    [(900, None, 840), (300, None, 270), (3, None, 2.7), (900, 5.0, 895), (60, 0.0, 60)],
)
def test_warning_time(lifetime: float, ahead: float | None, warn_at: float) -> None:
    life = TokenLifecycle(LifecycleConfig(refresh_ahead=ahead), T0 + lifetime, T0, T0)
    assert life.next_deadline() == pytest.approx(T0 + warn_at)
    assert life.due(T0 + warn_at - 0.001) == []
    assert life.due(T0 + warn_at) == ([Action.WARN] if warn_at < lifetime else [Action.EXPIRE])


def test_warns_once_then_expires_at_exp_plus_grace() -> None:
    life = TokenLifecycle(LifecycleConfig(grace=5), T0 + 100, T0, T0)
    assert life.due(T0 + 90) == [Action.WARN]
    assert life.due(T0 + 95) == []
    assert life.next_deadline() == T0 + 105
    assert life.due(T0 + 104.999) == []
    assert life.due(T0 + 105) == [Action.EXPIRE]


@pytest.mark.parametrize(("now", "accepted"), [(T0 + 99.999, True), (T0 + 100, False), (T0 + 101, False)])
def test_refresh_racing_the_deadline(now: float, accepted: bool) -> None:
    life = TokenLifecycle(LifecycleConfig(), T0 + 100, T0, T0)
    assert life.accepts_refresh(now) is accepted


def test_refresh_rearms_the_warning_and_moves_the_deadline() -> None:
    life = TokenLifecycle(LifecycleConfig(), T0 + 100, T0, T0)
    assert life.due(T0 + 90) == [Action.WARN]
    life.on_refresh(T0 + 300, T0 + 95, T0 + 95)
    assert life.deadline == T0 + 300
    assert life.next_deadline() == pytest.approx(T0 + 300 - 20.5)
    assert life.due(T0 + 100) == []
    assert life.due(T0 + 280) == [Action.WARN]
    assert life.refreshes == 1


def test_revalidation_repeats_at_its_interval() -> None:
    life = TokenLifecycle(LifecycleConfig(revalidate_interval=30), T0 + 1000, T0, T0)
    assert life.next_deadline() == T0 + 30
    assert life.due(T0 + 29.9) == []
    assert life.due(T0 + 30) == [Action.REVALIDATE]
    assert life.next_deadline() == T0 + 60


def test_token_issued_in_the_past_warns_immediately_when_due() -> None:
    life = TokenLifecycle(LifecycleConfig(), T0 + 10, T0 - 890, T0)
    assert life.due(T0) == [Action.WARN]
