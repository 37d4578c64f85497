"""Token schedule: frequencies match the weights; every rank draws the same budget."""

import math
import random

import pytest

from flexproj.schedule import TokenSchedule, parse_schedule


def test_paper_defaults():
    s = TokenSchedule()
    assert s.tokens == (64, 144, 256)
    assert s.probabilities == pytest.approx((0.2, 0.3, 0.5))
    assert s.expected_tokens == pytest.approx(0.2 * 64 + 0.3 * 144 + 0.5 * 256)


def test_empirical_frequencies_match_weights():
    """Each budget's count over n draws is Binomial(n, p): |count - np| stays within
    5 standard deviations (a false failure has probability below 1e-6 per budget)."""
    s = TokenSchedule(seed=1234)
    n = 20_000
    draws = [s.budget_at(step) for step in range(n)]
    for t, p in zip(s.tokens, s.probabilities):
        count = draws.count(t)
        assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (t, count, n * p)


def test_every_rank_draws_the_same_budget():
    # ranks build their schedule independently from the same config
    ranks = [TokenSchedule(seed=7) for _ in range(4)]
    for step in range(500):
        assert len({r.budget_at(step) for r in ranks}) == 1
    # and the sequence is not constant, and depends on the seed
    seq = [ranks[0].budget_at(i) for i in range(50)]
    assert len(set(seq)) == 3
    assert seq != [TokenSchedule(seed=8).budget_at(i) for i in range(50)]


def test_draw_is_a_function_of_seed_and_step_alone():
    """budget_at(step) does not depend on what was asked before, nor in which order: a
    run resumed at step k, or a rank that skipped ahead, draws what a fresh run draws."""
    steps = range(300)
    forward = [TokenSchedule(seed=11).budget_at(s) for s in steps]
    s = TokenSchedule(seed=11)
    backward = [s.budget_at(step) for step in reversed(steps)][::-1]
    assert backward == forward
    shuffled = list(steps)
    random.Random(0).shuffle(shuffled)
    s = TokenSchedule(seed=11)
    assert {step: s.budget_at(step) for step in shuffled} == dict(zip(steps, forward))
    # one step asked again and again, with other steps drawn in between, never changes
    s = TokenSchedule(seed=11)
    for other in range(200):
        assert s.budget_at(137) == forward[137]
        s.budget_at(other)
    # a schedule resumed at step 250 continues the sequence
    assert [TokenSchedule(seed=11).budget_at(k) for k in range(250, 300)] == forward[250:]
    # and the step matters: the sequence is not one value repeated, per seed
    for seed in range(5):
        assert len({TokenSchedule(seed=seed).budget_at(k) for k in range(1000)}) == 3


def test_fixed_schedule_and_per_sample():
    assert {TokenSchedule.fixed(256).budget_at(i) for i in range(100)} == {256}
    s = TokenSchedule(per_sample=True, seed=3)
    batch = s.budgets_for(5, 64)
    assert len(batch) == 64 and len(set(batch)) > 1
    assert batch == TokenSchedule(per_sample=True, seed=3).budgets_for(5, 64)
    assert TokenSchedule(seed=3).budgets_for(5, 4) == [TokenSchedule(seed=3).budget_at(5)] * 4


def test_parse_schedule():
    assert parse_schedule("64:2,144:3,256:5") == TokenSchedule()
    assert parse_schedule("paper", seed=2) == TokenSchedule(seed=2)
    assert parse_schedule("fixed:256").tokens == (256,)
    assert parse_schedule(144).tokens == (144,)
    with pytest.raises(ValueError, match="cannot parse token schedule"):
        parse_schedule("64:two")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tokens=(64, 144), weights=(1.0,)), "2 budgets but 1 weights"),
        (dict(tokens=(64,), weights=(-1.0,)), "non-negative"),
        (dict(tokens=(0,), weights=(1.0,)), "positive"),
        (dict(tokens=(64, 64), weights=(1.0, 1.0)), "distinct"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenSchedule(**kwargs)


def test_per_sample_draws_are_a_function_of_seed_step_and_index():
    schedule = TokenSchedule(seed=5, per_sample=True)
    table = {(s, i): schedule.budget_for_sample(s, i) for s in range(50) for i in range(8)}
    shuffled = list(table)
    random.Random(0).shuffle(shuffled)
    assert all(schedule.budget_for_sample(s, i) == table[s, i] for s, i in shuffled)
    assert schedule.budgets_for(7, 3, first=2) == [table[7, 2], table[7, 3], table[7, 4]]
    assert len({table[s, i] for s in range(50) for i in range(8)}) == 3
    assert any(len({table[s, i] for i in range(8)}) > 1 for s in range(50))  # batches mix
    step_wise = TokenSchedule(seed=5)
    assert step_wise.budgets_for(7, 3, first=2) == [step_wise.budget_at(7)] * 3


def test_max_and_expected_tokens_by_hand():
    """max_tokens is the largest budget that can be drawn (a zero weight is never drawn)."""
    s = TokenSchedule((64, 144, 256), (1.0, 1.0, 0.0))
    assert s.max_tokens == 144
    assert {s.budget_at(k) for k in range(500)} == {64, 144}  # the draws agree
    assert s.expected_tokens == pytest.approx((64 + 144) / 2)
    assert TokenSchedule().expected_tokens == pytest.approx((2 * 64 + 3 * 144 + 5 * 256) / 10)


def test_fixed_keeps_its_seed():
    """The seed goes into checkpoints (``to_dict``) and per-sample draws."""
    s = TokenSchedule.fixed(64, seed=7)
    assert s.seed == 7 and s.to_dict() == {
        "tokens": [64], "weights": [1.0], "seed": 7, "per_sample": False,
    }  # fmt: skip
