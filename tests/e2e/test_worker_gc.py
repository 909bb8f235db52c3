"""The worker's garbage collection loop (``BILLING_WORKER_GC_EVERY_S``): evicted workflows are
reference cycles that CPython frees only in a full collection, which it runs late."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from billing.settings import Settings
from billing.worker import collect_evicted_workflows, collect_garbage_every


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    """A two-object reference cycle nobody holds: garbage only a collection frees."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def automatic_gc_off() -> Iterator[None]:
    """CPython's own collections off, so only the code under test can free a cycle."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def test_one_collection_frees_cycles_and_says_how_many(automatic_gc_off: None) -> None:
    refs = [_cycle() for _ in range(1000)]
    assert all(r() is not None for r in refs)
    collected, took_s = collect_evicted_workflows()
    assert all(r() is None for r in refs)
    assert collected >= 2000
    assert took_s >= 0


async def test_the_loop_collects_until_stopped(automatic_gc_off: None) -> None:
    stop = asyncio.Event()
    loop = asyncio.create_task(collect_garbage_every(0.05, stop=stop))
    ref = _cycle()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if ref() is None:
            break
    assert ref() is None, "the loop never collected the cycle"
    stop.set()
    await asyncio.wait_for(loop, timeout=2)
    # Stopped: a cycle made now stays until something else collects it.
    late = _cycle()
    await asyncio.sleep(0.15)
    assert late() is not None


def test_the_setting_defaults_on_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().worker_gc_every_s == 30.0
    monkeypatch.setenv("BILLING_WORKER_GC_EVERY_S", "0")
    assert Settings().worker_gc_every_s == 0
    monkeypatch.setenv("BILLING_WORKER_GC_EVERY_S", "-1")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings()
