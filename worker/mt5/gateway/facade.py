"""The :class:`Gateway`: broker operations on one terminal session, for the pipeline.

It turns symbol specifications into pips, lots and deviations, reads fresh ticks judged in
one clock, checks trading permissions and margin, sends market orders with bounded retries
(never after an unknown outcome) and reconciles by magic + comment token (the rule is in
``worker.mt5.gateway.identity``). Every terminal call is recorded as a :class:`BrokerCall`
for the audit trail (``drain_calls``).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal

from schemas.enums import RejectionReason
from schemas.identity import check_deployment_magic
from worker.mt5 import api
from worker.mt5.gateway import lots as sizing
from worker.mt5.gateway.calls import Calls
from worker.mt5.gateway.clock import (
    OFFSET_GRAIN_MS,
    ServerClock,
    TimezoneRule,
    parse_timezone,
)
from worker.mt5.gateway.errors import GatewayRejection, SessionLost
from worker.mt5.gateway.filling import filling_modes
from worker.mt5.gateway.identity import OrderIdentity, is_deployment_magic
from worker.mt5.gateway.model import (
    BrokerCall,
    LotPlan,
    MarketSnapshot,
    Reconciliation,
    SendOutcome,
    Side,
    SymbolSpec,
)
from worker.mt5.gateway.reconcile import History, HistoryWindow
from worker.mt5.gateway.retcodes import Status
from worker.mt5.gateway.send import Fence, Sender

# re-reads of a tick that looks off by whole quarter hours under a learned offset (a moved
# server clock shows as a tick that changes between close readings)
_FRESHNESS_PROBE_SECONDS = (0.25, 0.75)


class Gateway:
    """Broker operations on one terminal session (not thread-safe: one lease at a time)."""

    def __init__(
        self,
        terminal: api.Terminal,
        *,
        magic: int,
        pip_sizes: Mapping[str, float],
        max_tick_age_seconds: float,
        server_utc_offset_seconds: int | None = None,
        server_timezone: str | TimezoneRule | None = None,
        max_attempts: int = 3,
        backoff_seconds: float = 0.05,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.permissions: dict[str, bool] = {}
        self._terminal = terminal
        self._magic = check_deployment_magic(magic)
        self._pip_sizes = dict(pip_sizes)
        self._max_tick_age = max_tick_age_seconds
        self._clock = clock
        self._sleep = sleep
        self._selected: set[str] = set()
        if isinstance(server_timezone, str):
            server_timezone = parse_timezone(server_timezone)
        self._server_clock = ServerClock(clock, server_utc_offset_seconds, server_timezone)
        self._calls = Calls(terminal, clock)
        self._history = History(self._calls, terminal)
        self._sender = Sender(
            self._calls,
            terminal,
            self._tick,
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            sleep=sleep,
        )

    @property
    def terminal(self) -> api.Terminal:
        return self._terminal

    @property
    def magic(self) -> int:
        """The deployment magic (the configured ``MAGIC``)."""
        return self._magic

    def identity_for(self, execution_id: uuid.UUID) -> OrderIdentity:
        """The magic and comment token of this execution's orders."""
        return OrderIdentity.for_execution(execution_id, self._magic)

    def legacy_identity(self, comment_token: str) -> OrderIdentity:
        """The identity of a row sent before the execution part of the magic existed."""
        return OrderIdentity(self._magic, comment_token)

    def is_ours(self, magic: int) -> bool:
        """An order, deal or position of this deployment (either magic scheme)."""
        return is_deployment_magic(magic, self._magic)

    @property
    def server_offset_seconds(self) -> float | None:
        """The server's offset from UTC: configured, else learned from ticks, else None."""
        offset = self._server_clock.offset_ms()
        return None if offset is None else offset / 1000

    def drain_calls(self) -> list[BrokerCall]:
        """Every terminal call since the last drain, oldest first."""
        return self._calls.drain()

    # ------------------------------------------------------------------ symbols
    def _select(self, broker_symbol: str) -> tuple[bool, tuple[int, str] | None]:
        """``symbol_select(symbol, True)``: info and ticks want the symbol in Market Watch."""
        selected, error = self._calls.query(
            "symbol_select",
            lambda: self._terminal.symbol_select(broker_symbol, True),
            failed=lambda ok: not ok,
        )
        if selected:
            self._selected.add(broker_symbol)
        return bool(selected), error

    def symbol_spec(self, broker_symbol: str) -> SymbolSpec:
        """The symbol's specification (selected into Market Watch first if needed)."""
        info, error = self._calls.query(
            "symbol_info", lambda: self._terminal.symbol_info(broker_symbol)
        )
        if info is None or not info.visible:
            selected, select_error = self._select(broker_symbol)
            if not selected:
                what = "unknown symbol" if info is None else "cannot select"
                why = select_error or error or ""
                raise GatewayRejection(
                    RejectionReason.SYMBOL_NOT_TRADABLE,
                    f"{what} {broker_symbol!r} on this terminal {why}".strip(),
                )
            info, error = self._calls.query(  # re-read: a hidden symbol's fields may be stale
                "symbol_info", lambda: self._terminal.symbol_info(broker_symbol)
            )
            if info is None:
                raise GatewayRejection(
                    RejectionReason.SYMBOL_NOT_TRADABLE,
                    f"unknown symbol {broker_symbol!r} on this terminal {error or ''}".strip(),
                )
        else:
            self._selected.add(broker_symbol)
        pip = sizing.pip_size(info, self._pip_sizes)
        return SymbolSpec(
            name=info.name,
            digits=info.digits,
            point=info.point,
            pip=pip,
            contract_size=info.trade_contract_size,
            volume_min=info.volume_min,
            volume_max=info.volume_max,
            volume_step=info.volume_step,
            trade_mode=info.trade_mode,
            trade_exemode=info.trade_exemode,
            filling_mode=info.filling_mode,
        )

    def check_trading_allowed(
        self, spec: SymbolSpec, side: Side, account: api.AccountInfo | None = None
    ) -> None:
        """Terminal, account and symbol permissions for opening ``side``.

        ``account``: an account_info already read for this order (else it is read here).
        """
        terminal, _ = self._calls.query("terminal_info", self._terminal.terminal_info)
        if terminal is None:
            raise SessionLost("terminal_info failed")
        account = account or self.account()
        self.permissions = {  # the last seen, for readiness (DOMAIN.md 6: report each level)
            "terminal_trade_allowed": terminal.trade_allowed,
            "terminal_tradeapi_enabled": not terminal.tradeapi_disabled,
            "account_trade_allowed": account.trade_allowed,
            "account_trade_expert": account.trade_expert,
        }
        if not terminal.trade_allowed:
            raise GatewayRejection(
                RejectionReason.TRADING_DISABLED,
                "terminal: Algo Trading is off (terminal_info().trade_allowed is false)",
                api.TRADE_RETCODE_CLIENT_DISABLES_AT,
            )
        if terminal.tradeapi_disabled:
            raise GatewayRejection(
                RejectionReason.TRADING_DISABLED, "terminal: the trade API is disabled"
            )
        if not account.trade_allowed:
            raise GatewayRejection(
                RejectionReason.TRADING_DISABLED, "account: trading is not allowed"
            )
        if not account.trade_expert:
            raise GatewayRejection(
                RejectionReason.TRADING_DISABLED, "account: expert advisors may not trade"
            )
        mode = spec.trade_mode
        refused = {
            api.SYMBOL_TRADE_MODE_DISABLED: "trading is disabled",
            api.SYMBOL_TRADE_MODE_CLOSEONLY: "close only",
        }.get(mode)
        if mode == api.SYMBOL_TRADE_MODE_LONGONLY and side is Side.SELL:
            refused = "long only"
        if mode == api.SYMBOL_TRADE_MODE_SHORTONLY and side is Side.BUY:
            refused = "short only"
        if refused:
            raise GatewayRejection(
                RejectionReason.SYMBOL_NOT_TRADABLE,
                f"{spec.name}: {refused} (trade_mode {mode})",
                api.TRADE_RETCODE_TRADE_DISABLED,
            )

    # ------------------------------------------------------------------ market data
    def _tick(self, name: str) -> api.Tick:
        tick, error = self._calls.query(
            "symbol_info_tick", lambda: self._terminal.symbol_info_tick(name)
        )
        if tick is None and self._select(name)[0]:  # hidden from Market Watch: select, retry
            tick, error = self._calls.query(
                "symbol_info_tick", lambda: self._terminal.symbol_info_tick(name)
            )
        if tick is None or (tick.bid <= 0 and tick.ask <= 0):
            raise GatewayRejection(
                RejectionReason.NO_MARKET_DATA, f"no tick for {name} {error or ''}".strip()
            )
        self._server_clock.learn(name, tick.time_msc)
        return tick

    def _clock_may_have_moved(self, age: float | None) -> bool:
        """Unknown, or off by (about) a whole number of quarter hours, ahead or behind."""
        if age is None:
            return True
        grain = OFFSET_GRAIN_MS / 1000
        whole = round(age / grain)
        return whole != 0 and abs(age - whole * grain) <= self._max_tick_age

    def _age_seconds(self, tick: api.Tick) -> float | None:
        offset = self._server_clock.offset_ms()
        if offset is None:
            return None
        return (int(self._clock() * 1000) + offset - tick.time_msc) / 1000

    def snapshot(self, spec: SymbolSpec) -> MarketSnapshot:
        """A fresh tick; its age is judged in server time (never against local UTC)."""
        tick = self._tick(spec.name)
        age = self._age_seconds(tick)
        for probe in _FRESHNESS_PROBE_SECONDS:
            if self._server_clock.configured or not self._clock_may_have_moved(age):
                break
            # a tick off by whole quarter hours: stale, or the server's clock moved (DST).
            # A tick that changes between two close readings is fresh and sets the offset.
            self._sleep(probe)
            tick = self._tick(spec.name)
            age = self._age_seconds(tick)
        if age is None:  # only ticks too old to learn the server clock from
            raise GatewayRejection(
                RejectionReason.STALE_TICK,
                f"{spec.name}: the last tick is too old to judge (server clock offset unknown; "
                "set SERVER_TIMEZONE or SERVER_UTC_OFFSET_SECONDS)",
            )
        if age > self._max_tick_age:
            raise GatewayRejection(
                RejectionReason.STALE_TICK,
                f"{spec.name}: last tick is {age:.1f}s old (limit {self._max_tick_age:g}s; "
                "market closed or feed stopped)",
            )
        if age < -self._max_tick_age:
            raise GatewayRejection(
                RejectionReason.STALE_TICK,
                f"{spec.name}: tick is {-age:.1f}s in the future: server UTC offset misconfigured?",
            )
        if tick.bid <= 0 or tick.ask <= 0 or tick.ask < tick.bid:
            raise GatewayRejection(
                RejectionReason.NO_MARKET_DATA, f"{spec.name}: no two-sided quote"
            )
        return MarketSnapshot(
            symbol=spec.name,
            bid=tick.bid,
            ask=tick.ask,
            spread_pips=round((tick.ask - tick.bid) / spec.pip, 6),
            pip=spec.pip,
            point=spec.point,
            tick_time_msc=tick.time_msc,
            tick_age_seconds=max(0.0, age),
        )

    # ------------------------------------------------------------------ sizing
    def lots_for(
        self, spec: SymbolSpec, units: float, over_max: Literal["split", "reject"]
    ) -> LotPlan:
        """Units -> lots rounded DOWN to the volume step; never upsized."""
        return sizing.lots_for(spec, units, over_max)

    def deviation_points(self, spec: SymbolSpec, max_slippage_pips: float) -> int:
        """Slippage limit in pips -> ``deviation`` in POINTS."""
        return sizing.deviation_points(spec, max_slippage_pips)

    def filling_modes(self, spec: SymbolSpec) -> tuple[int, ...]:
        """Allowed filling modes, preferred first (empty: the symbol cannot be traded)."""
        return filling_modes(spec)

    def check_margin(
        self,
        spec: SymbolSpec,
        side: Side,
        lots: float,
        price: float,
        cushion: float,
        account: api.AccountInfo | None = None,
    ) -> tuple[float, float]:
        """(required, free); raises MARGIN_INSUFFICIENT when free < required * cushion.

        ``account``: an account_info already read for this order (else it is read here).
        """
        required, error = self._calls.query(
            "order_calc_margin",
            lambda: self._terminal.order_calc_margin(side.order_type, spec.name, lots, price),
        )
        if required is None:
            raise GatewayRejection(
                RejectionReason.MARGIN_INSUFFICIENT,
                f"order_calc_margin failed for {spec.name} {error or ''}".strip(),
            )
        free = (account or self.account()).margin_free
        if free < required * cushion:
            raise GatewayRejection(
                RejectionReason.MARGIN_INSUFFICIENT,
                f"{lots:g} lots {spec.name} need {required:.2f} margin x {cushion:g} cushion; "
                f"free margin is {free:.2f}",
                api.TRADE_RETCODE_NO_MONEY,
            )
        return float(required), float(free)

    # ------------------------------------------------------------------ sending
    def send(
        self,
        spec: SymbolSpec,
        side: Side,
        lots: float,
        *,
        deviation: int,
        identity: OrderIdentity | None = None,
        comment: str | None = None,
        position: int | None = None,
        fence: Fence | None = None,
    ) -> SendOutcome:
        """Send one market order with the retry rules of DOMAIN.md 2.

        ``fence`` runs immediately before every ``order_send`` (first attempt and retries)
        and raises when the session's lease is lost, so a worker that lost its session
        never sends (issue 18: fence each send).

        ``identity``: the execution's magic and comment token (``identity_for``); a bare
        ``comment`` sends under the legacy identity (deployment magic + that comment).
        ``position``: the position to close (hedging accounts); its ticket is sent, also
        when given the position's identifier.
        Requotes refresh the price and retry; busy codes back off and retry; 10030 tries the
        next filling mode once; an unknown outcome returns at once and is never resent.
        Raises GatewayRejection only when nothing was sent (bad comment, no filling mode,
        no quote, algo trading disabled in the client), SessionLost / QueryFailed when the
        terminal cannot answer before the order leaves.
        """
        if identity is None:
            if comment is None:
                raise TypeError("send needs an identity (or a legacy comment)")
            identity = self.legacy_identity(comment)
        if position:
            position = self._position_ticket(spec.name, position)
        return self._sender.send(
            spec,
            side,
            lots,
            magic=identity.magic,
            comment=identity.comment_token,
            deviation=deviation,
            position=position,
            fence=fence,
        )

    def _position_ticket(self, symbol: str, position: int) -> int:
        """The ticket of the position with this ticket or identifier (they can differ)."""
        positions = self._history.positions(symbol)
        for found in positions:
            if found.ticket == position:
                return found.ticket
        for found in positions:
            if found.identifier == position:
                return found.ticket
        return position  # gone: the server answers 10036 (position closed)

    def cancel(self, order_ticket: int, *, fence: Fence | None = None) -> SendOutcome:
        """Remove a placed order (TRADE_ACTION_REMOVE)."""
        request = {"action": api.TRADE_ACTION_REMOVE, "order": int(order_ticket)}
        result = self._sender.order_send(request, 1, 0.0, api.ORDER_FILLING_RETURN, 0, fence)
        if result.status == "unknown":
            return result
        return _with_status(
            result, "done" if result.retcode == api.TRADE_RETCODE_DONE else "rejected"
        )

    # ------------------------------------------------------------------ orders and history
    def order_state(self, order_ticket: int) -> api.TradeOrder | None:
        """The order, open or in history (None when the terminal does not know it)."""
        return self._history.order_state(order_ticket)

    def deals_for_order(self, order_ticket: int) -> tuple[api.TradeDeal, ...]:
        return self._history.deals_for_order(order_ticket)

    def reconcile(
        self, identity: OrderIdentity | str, broker_symbol: str, since: datetime
    ) -> Reconciliation:
        """Everything of this execution on ``broker_symbol`` since ``since``.

        ``identity``: from the row (its stored magic and comment token); a bare token means
        the legacy identity. ``since`` is UTC (aware, or naive UTC); the history window is
        in server time (the offset refreshed from a tick first) and padded by a day on both
        sides. Raises QueryFailed when a query fails, SessionLost when the terminal is gone.
        """
        if isinstance(identity, str):
            identity = self.legacy_identity(identity)
        with contextlib.suppress(GatewayRejection):  # no tick: the window is wider
            self._tick(broker_symbol)
        return self._history.reconcile(
            identity,
            broker_symbol,
            since,
            now_utc=datetime.fromtimestamp(self._clock(), UTC),
            offset_ms=self._server_clock.offset_ms(),
        )

    def window(self, since: datetime, broker_symbol: str) -> HistoryWindow:
        """This deployment's open orders, history orders and deals on the account since
        ``since`` (UTC), in one window for every execution waiting on it; a tick of
        ``broker_symbol`` first refreshes the server's offset (a DST switch moves it). Raises
        QueryFailed or SessionLost like ``reconcile``."""
        with contextlib.suppress(GatewayRejection):  # no tick: the window is wider
            self._tick(broker_symbol)
        return self._history.window(
            since,
            self._magic,
            now_utc=datetime.fromtimestamp(self._clock(), UTC),
            offset_ms=self._server_clock.offset_ms(),
        )

    def opposite_positions(self, spec: SymbolSpec, side: Side) -> tuple[api.TradePosition, ...]:
        """This deployment's positions on the other side of ``side``, oldest first by ticket.

        Raises QueryFailed when the terminal cannot list positions (never "none open").
        """
        return self._history.opposite_positions(spec, side, self._magic)

    def account(self) -> api.AccountInfo:
        info, error = self._calls.query("account_info", self._terminal.account_info)
        if info is None:  # the terminal cannot answer: retry elsewhere, never refuse
            raise SessionLost(f"account_info failed {error or ''}".strip())
        return info


def _with_status(outcome: SendOutcome, status: Status) -> SendOutcome:
    return replace(outcome, status=status)
