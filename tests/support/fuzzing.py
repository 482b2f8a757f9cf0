"""What the Hypothesis fuzz tests share: how many examples, which seed, and the log's verdict.

They run derandomized (the same examples on every run, so CI is repeatable);
OTAPLANE_FUZZ_EXAMPLES sets the base count (each test scales it), OTAPLANE_FUZZ_SEED=N runs other
examples.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, seed, settings

EXAMPLES = int(os.environ.get("OTAPLANE_FUZZ_EXAMPLES", "20"))
SEED = os.environ.get("OTAPLANE_FUZZ_SEED")


def fuzzing(max_examples: int):
    """Decorator over a `@given` test: `max_examples` examples, no deadline (each is a real
    request), no example database, derandomized unless OTAPLANE_FUZZ_SEED is set."""

    def configure(test):
        configured = settings(max_examples=max_examples, deadline=None, database=None, derandomize=SEED is None,
                              suppress_health_check=list(HealthCheck))(test)
        return seed(int(SEED))(configured) if SEED is not None else configured

    return configure


def assert_clean_log(server) -> None:
    """No request of the fuzz made the server log an error or a traceback."""
    log = server.logs()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
