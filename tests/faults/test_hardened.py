"""Every server hardening at once (issue 17), with unknown outcomes and a kill -9 mid-order.

The simulated servers cut comments to 16 characters (in a second run: blank them), show
deals some hundreds of ms after a 10009 whose ``deal`` is sometimes 0, answer None to 30 % of
history/position queries, switch their clocks with US DST, fill by execution mode; some
order_send replies are lost or time out although the order executed (scripted, then at
random rates), and the first worker is killed with ``kill -9`` while one of its orders is in
flight (the order left for the terminal, the reply is never read). A normal worker then
finishes the work. The checker finds every execution's orders by magic, so cut or blank
comments cannot hide a duplicate, and compares each fill with the broker's deals.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.faults.conftest import MakeEnv
from tests.faults.harness import Tally, approvals, sim_toml
from tests.faults.launcher import KILL_EXIT_CODE

pytestmark = pytest.mark.faults

MESSAGES = 80
KILL_AT = 25  # the 25th order_send request leaves, then the worker dies
WAIT_SECONDS = 180.0
HARDENED = """
preset = "hardened"           # cut comments, lagging deals, None answers, DST clock, ...
comment_keep_chars = 16
query_none_rate = 0.3            # more than the preset's 5 %: a fill settled from its reply
                                # reads no history, so fewer queries are left to fail
{comment}
# unknown outcomes whose orders executed: scripted first, then at random
scripted = ["timeout_executed", "ok", "lost_reply", "ok", "timeout_executed", "lost_reply"]
timeout_rate = 0.05           # 10012, executed anyway
lost_reply_rate = 0.05        # executed, reply lost: None + (-10005)
"""


@pytest.mark.parametrize(
    ("comments", "comment"),
    [("cut to 16", ""), ("blanked", 'comment_replace = ""')],
    ids=["cut", "blanked"],
)
def test_every_hardening_with_unknown_outcomes_and_a_kill_in_flight(
    comments: str, comment: str, make_env: MakeEnv, record: Callable[[Tally], None]
) -> None:
    faults = HARDENED.format(comment=comment)
    env = make_env([sim_toml(91, faults), sim_toml(92, faults)], delivery_limit=20)
    keys = env.publish(approvals(MESSAGES, random.Random(f"hardened-{comments}")))
    dying = env.start_worker(kill_point="during_order_send", kill_at=KILL_AT)
    code = dying.wait(WAIT_SECONDS)
    assert code == KILL_EXIT_CODE, f"the worker was not killed mid-order:\n{dying.tail()}"
    # the evidence: an execution in flight whose order is on a broker's books
    in_flight = [k for k, rows in env.rows().items() if rows[0][0] in ("SUBMITTING", "SUBMITTED")]
    books = {int(deal["magic"]) for deal in env.deals()}
    assert any(env.magic_of(key) in books for key in in_flight), (in_flight, len(books))

    worker = env.start_worker()
    env.wait_confirmed(keys, WAIT_SECONDS, worker)
    env.wait_caught_up(keys, WAIT_SECONDS, worker)  # provisional answers corrected
    assert worker.stop() == 0, worker.tail()
    if comment:  # the servers really blanked every comment
        assert {deal["comment"] for deal in env.deals()} == {""}
    else:
        assert {len(deal["comment"]) for deal in env.deals()} == {16}
    unknown, failed = env.bitten()
    assert unknown >= 6 and failed > 0, (unknown, failed)  # the faults did bite
    tally = env.check(
        f"every hardening, comments {comments}, kill -9 mid-order",
        keys,
        runs=2,
        latest=True,
        notes="comments "
        + ("blanked" if comment else "cut to 16")
        + ", deals lag 200-600 ms (deal 0 in 20 % of replies), None from 30 % of queries,"
        " DST clock, filling by execution mode; 6 scripted + 5 %/5 % random unknown outcomes"
        f" that executed; worker killed with an order in flight. Audit: {unknown} sends with"
        f" an unknown outcome, {failed} failed queries",
    )
    assert tally.orders > 0 and tally.by_state.get("FILLED", 0) > 0, tally.by_state
    record(tally)
