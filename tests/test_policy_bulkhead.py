"""The bulkhead's shared counts, as two worker processes would use them (two mappings of
one file)."""

from __future__ import annotations

from pathlib import Path

from llmux_extproc.policy.bulkhead import Bulkhead


def test_the_cap_holds_across_workers_and_places_come_back(tmp_path: Path) -> None:
    path = tmp_path / "bulkheads"
    one, two = Bulkhead(path, 0, 2), Bulkhead(path, 1, 2)
    assert one.acquire("dep", 3) and two.acquire("dep", 3) and two.acquire("dep", 3)
    # Full, whichever worker asks; another deployment has its own count.
    assert not one.acquire("dep", 3) and not two.acquire("dep", 3)
    assert one.acquire("other", 1)
    assert one.in_flight("dep") == 3
    two.release("dep")
    assert one.acquire("dep", 3)
    assert not two.acquire("dep", 3)


def test_a_restarted_worker_gives_back_what_its_predecessor_held(tmp_path: Path) -> None:
    path = tmp_path / "bulkheads"
    survivor, dead = Bulkhead(path, 0, 2), Bulkhead(path, 1, 2)
    assert dead.acquire("dep", 2) and dead.acquire("dep", 2)
    assert not survivor.acquire("dep", 2)
    Bulkhead(path, 1, 2)  # worker 1 restarted
    assert survivor.in_flight("dep") == 0
    assert survivor.acquire("dep", 2)


def test_release_never_goes_below_zero(tmp_path: Path) -> None:
    b = Bulkhead(tmp_path / "bulkheads", 0, 1)
    b.release("never-taken")
    b.acquire("dep", 1)
    b.release("dep")
    b.release("dep")
    assert b.in_flight("dep") == 0
    assert b.acquire("dep", 1) and not b.acquire("dep", 1)
