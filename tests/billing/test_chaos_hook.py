"""The test-only crash hook of fault-injection runs: off at 0, a deterministic share of keys,
never on a re-drive, and a real SIGKILL of the worker process when it fires."""

from __future__ import annotations

import signal
import subprocess
import sys

from billing.worker import crash_after_charge_hook, crash_selected


def test_no_hook_at_zero_percent() -> None:
    assert crash_after_charge_hook(0) is None


def test_the_picked_keys_are_a_stable_share_of_all_keys() -> None:
    keys = [f"inv_{n:05d}-attempt-1" for n in range(2000)]
    picked = [k for k in keys if crash_selected(k, 25)]
    assert 400 < len(picked) < 600
    assert picked == [k for k in keys if crash_selected(k, 25)]  # same answer every time
    assert not any(crash_selected(k, 0) for k in keys)
    assert all(crash_selected(k, 100) for k in keys)


def test_a_re_driven_attempt_is_never_crashed() -> None:
    hook = crash_after_charge_hook(100)
    assert hook is not None
    hook("inv_1-attempt-1", True)  # returns: this process is still alive


def test_the_hook_kills_its_process_with_sigkill_on_a_first_send() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from billing.worker import crash_after_charge_hook\n"
            "crash_after_charge_hook(100)('inv_1-attempt-1', False)\n"
            "print('survived')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL
    assert "survived" not in done.stdout
    assert "CHAOS crash-after-charge inv_1-attempt-1" in done.stderr
