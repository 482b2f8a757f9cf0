"""Polling for end-to-end tests: the server, the devices and the simulator act in other
processes, so a test waits for what it expects to become true, with a deadline."""

from __future__ import annotations

import time


def eventually(check, timeout: float = 10, interval: float = 0.1,
               retry_on: tuple[type[BaseException], ...] = (AssertionError,)):
    """Call `check` until it returns something other than None/False (which is returned) or
    stops raising one of `retry_on`. At the deadline the last exception is raised again, or an
    AssertionError when the check only ever returned None/False."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result is not False and result is not None:
                return result
            failure: BaseException = AssertionError(f"condition not met within {timeout} s")
        except retry_on as exc:
            failure = exc
        if time.monotonic() > deadline:
            raise failure
        time.sleep(interval)
