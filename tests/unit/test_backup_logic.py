"""How a backup waits for its push job."""

import pytest

from vmkeep.engine.protect.member import poll_delay


def test_poll_delay_aims_at_the_jobs_expected_end() -> None:
    assert poll_delay(0, 0, 0.0) == 0.02  # nothing known yet
    assert poll_delay(500, 1000, 1.0) == 0.1  # 1 s to go: capped
    assert poll_delay(990, 1000, 1.0) == pytest.approx(0.0101, rel=0.01)  # ~10 ms to go
    assert poll_delay(999_999, 1_000_000, 1.0) == 0.005  # never a busy loop
    assert poll_delay(1000, 1000, 1.0) == 0.02  # total reached: the job is finishing up
