"""A real account is never traded on by accident.

The probe trades only on demo and contest accounts. On a real one it refuses unless the
operator passed ``--allow-real`` AND types the account's login number when asked; with
``--reads-only`` it trades nowhere.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.errors import WorkerError
from worker.mt5.profile.model import AccountProfile


class RealAccountRefused(WorkerError):
    """The account is real and trading on it was not confirmed."""


def may_trade(
    account: AccountProfile, *, allow_real: bool, confirm: Callable[[str], str] | None
) -> None:
    """Return when trading is allowed; raise RealAccountRefused otherwise."""
    if account.trade_mode != "real":
        return
    if not allow_real:
        raise RealAccountRefused(
            f"account {account.login} on {account.server} is a REAL account: the probe trades "
            "only on demo and contest accounts (--reads-only reads without trading; "
            "--allow-real asks for a typed confirmation)"
        )
    prompt = (
        f"The probe will open and close positions of the minimum volume on REAL account "
        f"{account.login} ({account.server}). Type the account number to go on: "
    )
    answer = confirm(prompt) if confirm is not None else ""
    if answer.strip() != str(account.login):
        raise RealAccountRefused("not confirmed: nothing was traded")
