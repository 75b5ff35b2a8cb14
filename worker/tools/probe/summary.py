"""The short human summary of a profile: what was found, and what the worker does about it."""

from __future__ import annotations

from worker.mt5.profile.model import EXECUTION_MODES, FILLINGS, BrokerProfile
from worker.mt5.profile.use import worker_fillings
from worker.tools.probe.naming import Naming

EXEMODE_CODES = {name: code for code, name in EXECUTION_MODES.items()}
# the worker's comment token is "xw" + 20 hex digits; a prefix of 12+ still names it
_TOKEN_CHARS = 22
_TOKEN_PREFIX_NEEDED = 12


def _comments(kept: int, rewritten: str | None) -> str:
    if rewritten is not None:
        return f"comments rewritten to {rewritten!r}: the worker identifies orders by magic alone"
    if kept == 0:
        return "comments blanked: the worker identifies orders by magic alone"
    if kept >= _TOKEN_CHARS:
        return f"comments kept whole ({kept} characters): the worker's token survives"
    if kept >= _TOKEN_PREFIX_NEEDED:
        return (
            f"comments cut to {kept} characters: the worker's token survives as a prefix "
            "(enough to name its execution); magic decides anyway"
        )
    return f"comments cut to {kept} characters: too short to name an execution; magic decides"


def summary(profile: BrokerProfile, naming: Naming) -> list[str]:
    account = profile.account
    lines = [
        f"{account.server} #{account.login} ({account.trade_mode}, {account.margin_mode}"
        f"{', FIFO' if account.fifo_close else ''}), measured {profile.probe.measured_at_utc} "
        f"over {profile.probe.backend}",
    ]
    switches = {
        "terminal Algo Trading": account.terminal_trade_allowed,
        "account trading": account.account_trade_allowed,
        "expert trading": account.expert_trade_allowed,
    }
    off = [name for name, on in switches.items() if not on]
    if off:
        lines.append(f"- OFF: {', '.join(off)}: /readyz answers 503 until they are on")
    if profile.clock is not None:
        lines.append(
            f"- server clock {profile.clock.server_utc_offset_seconds / 3600:+g} h now -> "
            f"SERVER_TIMEZONE={profile.clock.server_timezone} (taken from this profile "
            "unless set)"
        )
    else:
        lines.append("- server clock: no fresh ticks (market closed?): the worker learns it")
    if profile.symbol_prefix or profile.symbol_suffix:
        lines.append(
            f"- symbols carry prefix {profile.symbol_prefix!r} / suffix "
            f"{profile.symbol_suffix!r}: the worker maps "
            + ", ".join(f"{c} -> {b}" for c, b in sorted(profile.symbol_map.items()))
        )
    for canonical in naming.missing:
        lines.append(f"- {canonical}: no broker symbol found; approvals for it are refused")
    for canonical, names in sorted(naming.ambiguous.items()):
        lines.append(f"- {canonical}: several candidates {', '.join(names)}: set [symbol_map]")
    for name, spec in sorted(profile.symbols.items()):
        codes = worker_fillings(EXEMODE_CODES[spec.execution_mode], spec.filling_mode_flags)
        sends = "/".join(FILLINGS[c] for c in codes) or "nothing (no filling mode)"
        note = ""
        accepted = spec.filling_modes_accepted
        if accepted is not None and codes and FILLINGS[codes[0]] not in accepted:
            note = f", but the server refuses {FILLINGS[codes[0]]}: one 10030 per order"
        lines.append(f"- {name}: {spec.execution_mode} execution, sends {sends}{note}")
    behaviour = profile.behaviour
    if behaviour is None:
        lines.append(f"- no round trips ({profile.probe.trades_skipped_reason})")
        return lines
    traded = profile.probe.trade_symbol or ""
    lots = profile.symbols[traded].volume_min_lots if traded in profile.symbols else 0.0
    lines.append(
        f"- {profile.probe.round_trips} round trips of {lots:g} lots on {traded}, each closed "
        "and verified closed"
    )
    lines.append("- " + _comments(behaviour.comment_chars_kept, behaviour.comment_rewritten_to))
    if not behaviour.magic_63_bit_kept:
        lines.append(
            "- MAGIC NOT KEPT WHOLE: the worker cannot identify its orders: do not go live"
        )
    lines.append(
        f"- deal 0 in {behaviour.deal_zero_rate:.0%} of {behaviour.replies} replies: those "
        "fills settle from history (the settler), the others from the reply"
    )
    lines.append(
        f"- deals show {behaviour.deal_lag_ms_p50:.0f} ms (p50), {behaviour.deal_lag_ms_max:.0f} "
        f"ms (max) after the reply; replies take {behaviour.reply_latency_ms_p50:.0f} ms (p50)"
    )
    lines.append(
        f"- {behaviour.history_none_rate:.1%} of {behaviour.history_queries} queries answered "
        "None: asked again, never read as nothing"
    )
    if behaviour.position_ticket_differs:
        lines.append("- position tickets differ from order tickets: closes name the position")
    if profile.probe.leftovers_closed:
        lines.append(f"- closed {profile.probe.leftovers_closed} leftover probe position(s)")
    return lines
