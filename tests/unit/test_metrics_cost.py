"""What a configured account adds to every scrape: a bounded set of primed series, and no
`_created` samples (a thousand accounts' scrape was half `_created` lines)."""

from __future__ import annotations

from gateway import contract as c
from gateway.obs import metrics as m


def test_a_quiet_account_adds_a_bounded_number_of_series_and_no_created_samples() -> None:
    m.prime_account(
        "costcheck",
        [str(r) for r in c.DeadReason],
        [str(c.Status.DELIVERED), str(c.Status.UNDELIVERED)],
        [str(lane) for lane in c.LANES],
    )
    lines = m.render().decode().splitlines()
    mine = [line for line in lines if 'account="costcheck"' in line]
    assert 10 <= len(mine) <= 25, len(mine)
    assert not [line for line in lines if "_created" in line and not line.startswith("#")]
