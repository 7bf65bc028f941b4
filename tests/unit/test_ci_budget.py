"""The CI scheduler's budget: jobs start while memory and CPUs last, in order."""

import asyncio

import pytest

from pinnace.ci.budget import Budget, available_memory
from pinnace.errors import ConfigError

G = 1 << 30


def plenty() -> int:
    """Free memory on the host, as these tests need it (whatever the host has)."""
    return 1 << 40


def run_jobs(budget, jobs):
    """Run jobs (name, memory, cpus, seconds); the names in start order, and the most
    memory and CPUs held at once."""
    started, peak = [], {"memory": 0, "cpus": 0}

    async def job(name, memory, cpus, seconds):
        async with budget.take(memory, cpus):
            started.append(name)
            peak["memory"] = max(peak["memory"], budget.used_memory)
            peak["cpus"] = max(peak["cpus"], budget.used_cpus)
            await asyncio.sleep(seconds)

    async def main():
        tasks = []
        for spec in jobs:
            tasks.append(asyncio.ensure_future(job(*spec)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    return started, peak


def test_memory_is_never_oversubscribed():
    budget = Budget(memory=3 * G, cpus=64, jobs=64, free=plenty)
    started, peak = run_jobs(budget, [(f"j{i}", G, 1, 0.01) for i in range(8)])
    assert peak["memory"] == 3 * G and len(started) == 8
    assert budget.used_memory == budget.running == 0


def test_cpus_and_the_job_count_limit_too():
    _, peak = run_jobs(Budget(memory=64 * G, cpus=2, jobs=64, free=plenty),
                             [(f"j{i}", G, 1, 0.01) for i in range(5)])
    assert peak["cpus"] == 2
    _, peak = run_jobs(Budget(memory=64 * G, cpus=64, jobs=1, free=plenty),
                             [(f"j{i}", G, 1, 0.01) for i in range(3)])
    assert peak["memory"] == G


def test_jobs_start_in_the_order_they_asked_so_a_big_one_is_not_starved():
    budget = Budget(memory=4 * G, cpus=64, jobs=64, free=plenty)
    started, _ = run_jobs(budget, [("small1", G, 1, 0.05), ("big", 4 * G, 1, 0.01),
                                   ("small2", G, 1, 0.01)])
    assert started == ["small1", "big", "small2"]


def test_a_job_asking_more_cpus_than_the_host_has_runs_alone():
    started, peak = run_jobs(Budget(memory=8 * G, cpus=2, jobs=8, free=plenty),
                             [("a", G, 1, 0.02), ("wide", G, 4, 0.01), ("b", G, 1, 0.01)])
    assert started == ["a", "wide", "b"] and peak["cpus"] == 4


def test_a_job_bigger_than_the_whole_budget_fails_at_once_saying_what_to_change():
    budget = Budget(memory=2 * G, cpus=2, jobs=2, free=plenty)

    async def main():
        async with budget.take(3 * G, 1):
            pass

    with pytest.raises(ConfigError, match=r"limits\.memory"):
        asyncio.run(main())
    assert budget.running == 0


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 2048 kB\n")
    assert available_memory(str(meminfo)) == 2048 * 1024
    assert available_memory(str(tmp_path / "none")) > 0


def test_memory_another_run_took_since_holds_a_job_back():
    free = {"now": 64 * G}
    budget = Budget(memory=8 * G, cpus=64, jobs=64, free=lambda: free["now"])

    async def main():
        order = []

        async def job(name, hold):
            async with budget.take(G, 1):
                order.append(name)
                await hold.wait()

        first, second = asyncio.Event(), asyncio.Event()
        a = asyncio.ensure_future(job("a", first))
        await asyncio.sleep(0.01)
        free["now"] = G + (1 << 29)  # another run took the rest (a reserve of 1 GiB kept)
        b = asyncio.ensure_future(job("b", second))
        await asyncio.sleep(0.01)
        assert order == ["a"]
        free["now"] = 64 * G
        first.set()  # (re-checked when a job ends)
        await asyncio.sleep(0.01)
        assert order == ["a", "b"]
        second.set()
        await asyncio.gather(a, b)

    asyncio.run(main())
