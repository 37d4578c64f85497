"""flexproj.tokens: nesting, threads and asyncio tasks each see their own budget."""

import asyncio
import threading

import pytest

import flexproj
from flexproj import current_tokens


def test_nested_blocks_restore_the_outer_budget():
    assert current_tokens() is None
    assert current_tokens(default=144) == 144
    with flexproj.tokens(64):
        assert current_tokens(144) == 64
        with flexproj.tokens(16):
            assert current_tokens(144) == 16
        assert current_tokens(144) == 64
    assert current_tokens() is None


def test_restored_after_an_exception():
    with pytest.raises(RuntimeError), flexproj.tokens(9):
        raise RuntimeError("boom")
    assert current_tokens() is None


def test_threads_do_not_leak_into_each_other():
    seen: dict[str, list[int | None]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def worker(name, n):
        with flexproj.tokens(n):
            for _ in range(50):
                barrier.wait()  # interleave the two threads step by step
                seen[name].append(current_tokens())
        seen[name].append(current_tokens())

    threads = [
        threading.Thread(target=worker, args=("a", 4)),
        threading.Thread(target=worker, args=("b", 9)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"] == [4] * 50 + [None]
    assert seen["b"] == [9] * 50 + [None]


def test_asyncio_tasks_do_not_leak_into_each_other():
    async def task(n):
        with flexproj.tokens(n):
            values = []
            for _ in range(20):
                await asyncio.sleep(0)  # yield to the other task
                values.append(current_tokens())
            return values

    async def main():
        return await asyncio.gather(task(16), task(36))

    a, b = asyncio.run(main())
    assert a == [16] * 20 and b == [36] * 20


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_budget_raises(bad):
    with pytest.raises(flexproj.BudgetError, match="positive"), flexproj.tokens(bad):
        pass


@pytest.mark.parametrize("bad", [2.5, "64", None, True])
def test_non_integer_budget_raises(bad):
    with pytest.raises(flexproj.BudgetError, match="positive int"), flexproj.tokens(bad):
        pass


def test_one_instance_shared_by_threads_restores_each_threads_budget():
    """A module-level ``flexproj.tokens(n)`` used as ``with BUDGET:`` by two threads at once:
    a enters, b enters, a exits, b exits. Each block must exit with its own thread's reset;
    a stack on the instance would hand a the token b pushed."""
    shared = flexproj.tokens(64)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with flexproj.tokens(4):
            with shared:
                a_in.set()
                b_in.wait(5)
                seen["a", "inside"] = current_tokens()
            seen["a", "after"] = current_tokens()
            a_out.set()

    def b():
        a_in.wait(5)
        with flexproj.tokens(9):
            with shared:
                b_in.set()
                a_out.wait(5)
                seen["b", "inside"] = current_tokens()
            seen["b", "after"] = current_tokens()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {("a", "inside"): 64, ("a", "after"): 4, ("b", "inside"): 64, ("b", "after"): 9}


def test_one_instance_nested_in_itself():
    shared = flexproj.tokens(16)
    with flexproj.tokens(4), shared:
        with shared:
            assert current_tokens() == 16
        assert current_tokens() == 16
    assert current_tokens() is None
