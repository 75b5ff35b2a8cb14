"""The broker profile's schema: every field documented, units in the names.

A field that could not be measured (trading skipped, no open symbol, a netting account for
position tickets) is absent from the file (None here), never a guess.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.mt5 import api

PROFILE_FORMAT = 1
TradeMode = Literal["demo", "contest", "real"]
MarginMode = Literal["netting", "exchange", "hedging"]
ExecutionMode = Literal["request", "instant", "market", "exchange"]
FillingName = Literal["FOK", "IOC", "RETURN"]
SymbolTradeMode = Literal["disabled", "long_only", "short_only", "close_only", "full"]

TRADE_MODES: dict[int, TradeMode] = {
    api.ACCOUNT_TRADE_MODE_DEMO: "demo",
    api.ACCOUNT_TRADE_MODE_CONTEST: "contest",
    api.ACCOUNT_TRADE_MODE_REAL: "real",
}
MARGIN_MODES: dict[int, MarginMode] = {
    api.ACCOUNT_MARGIN_MODE_RETAIL_NETTING: "netting",
    api.ACCOUNT_MARGIN_MODE_EXCHANGE: "exchange",
    api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING: "hedging",
}
EXECUTION_MODES: dict[int, ExecutionMode] = {
    api.SYMBOL_TRADE_EXECUTION_REQUEST: "request",
    api.SYMBOL_TRADE_EXECUTION_INSTANT: "instant",
    api.SYMBOL_TRADE_EXECUTION_MARKET: "market",
    api.SYMBOL_TRADE_EXECUTION_EXCHANGE: "exchange",
}
SYMBOL_TRADE_MODES: dict[int, SymbolTradeMode] = {
    api.SYMBOL_TRADE_MODE_DISABLED: "disabled",
    api.SYMBOL_TRADE_MODE_LONGONLY: "long_only",
    api.SYMBOL_TRADE_MODE_SHORTONLY: "short_only",
    api.SYMBOL_TRADE_MODE_CLOSEONLY: "close_only",
    api.SYMBOL_TRADE_MODE_FULL: "full",
}
FILLINGS: dict[int, FillingName] = {
    api.ORDER_FILLING_FOK: "FOK",
    api.ORDER_FILLING_IOC: "IOC",
    api.ORDER_FILLING_RETURN: "RETURN",
}
FILLING_CODES: dict[FillingName, int] = {name: code for code, name in FILLINGS.items()}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProbeRun(_Section):
    format: int = Field(default=PROFILE_FORMAT, description="profile format version")
    measured_at_utc: str = Field(description="when the probe ran (ISO 8601, UTC)")
    backend: Literal["sim", "native", "bridge"] = Field(description="how the terminal was reached")
    account_alias: str | None = Field(
        default=None, description="the sessions file's account name the probe was run for"
    )
    trade_symbol: str | None = Field(
        default=None, description="the broker symbol the round trips traded"
    )
    round_trips: int = Field(default=0, description="round trips done (0: reads only)")
    trades_skipped_reason: str | None = Field(
        default=None, description="why no round trips were made, if none were"
    )
    leftovers_closed: int = Field(
        default=0, description="positions of an earlier, interrupted probe closed first"
    )


class AccountProfile(_Section):
    server: str = Field(description="trade server name")
    login: int = Field(description="account number")
    company: str = Field(default="", description="broker company")
    currency: str = Field(default="", description="account currency")
    trade_mode: TradeMode = Field(description="account_info().trade_mode")
    margin_mode: MarginMode = Field(description="account_info().margin_mode")
    leverage: int = Field(default=0, description="account leverage (1:N)")
    fifo_close: bool = Field(default=False, description="positions must be closed FIFO (US)")
    terminal_trade_allowed: bool = Field(description="terminal Algo Trading button")
    account_trade_allowed: bool = Field(description="account_info().trade_allowed")
    expert_trade_allowed: bool = Field(description="account_info().trade_expert")
    terminal_build: int = Field(default=0, description="terminal build number")


class ClockProfile(_Section):
    server_utc_offset_seconds: int = Field(
        description="server time minus UTC when measured (seconds), from fresh ticks"
    )
    server_timezone: str = Field(
        description="the rule the offset implies (SERVER_TIMEZONE syntax, e.g. GMT+2/US-DST)"
    )
    rule_basis: str = Field(description="why this rule: what one measurement can and cannot say")
    measured_from_symbol: str = Field(description="the symbol whose ticks were read")
    tick_samples: int = Field(description="fresh ticks read")


class SymbolProfile(_Section):
    canonical: str | None = Field(default=None, description="the RPM's name for this symbol")
    trade_mode: SymbolTradeMode = Field(description="symbol_info().trade_mode")
    execution_mode: ExecutionMode = Field(description="symbol_info().trade_exemode")
    filling_mode_flags: int = Field(description="symbol_info().filling_mode (1 FOK, 2 IOC)")
    filling_modes_allowed: list[FillingName] = Field(
        description="market-order filling modes the MT5 rules allow on this execution mode"
    )
    filling_modes_accepted: list[FillingName] | None = Field(
        default=None, description="modes order_check accepted (absent: market closed, unchecked)"
    )
    digits: int = Field(description="price digits")
    contract_size_units: float = Field(description="units per lot")
    volume_min_lots: float = Field(description="smallest order")
    volume_max_lots: float = Field(description="largest order")
    volume_step_lots: float = Field(description="order size step")
    stops_level_points: int = Field(description="closest SL/TP to the price")
    freeze_level_points: int = Field(description="no modification this close to the price")
    market_open: bool = Field(description="a fresh tick and a tradable mode when probed")
    tick_age_seconds: float | None = Field(
        default=None, description="age of the last tick when probed (server clock)"
    )


class BehaviourProfile(_Section):
    """What the round trips measured; the counts say how much each figure is worth."""

    comment_sent_chars: int = Field(description="length of the comments sent (max 26)")
    comment_chars_kept: int = Field(
        description="fewest characters of a sent comment kept on orders, deals and positions "
        "(26 = whole, 0 = blanked or rewritten)"
    )
    comment_chars_kept_orders: int = Field(description="characters kept on history orders")
    comment_chars_kept_deals: int = Field(description="characters kept on deals")
    comment_chars_kept_positions: int | None = Field(
        default=None, description="characters kept on positions"
    )
    comment_rewritten_to: str | None = Field(
        default=None, description="what the server put instead, when it is not a prefix"
    )
    magic_63_bit_kept: bool = Field(description="a 63-bit magic came back whole everywhere")
    replies: int = Field(description="order_send replies with 10009/10010")
    reply_latency_ms_p50: float = Field(description="order_send round trip, median")
    reply_latency_ms_p95: float = Field(description="order_send round trip, 95th percentile")
    deal_zero_replies: int = Field(description="10009/10010 replies whose deal was 0")
    deal_zero_rate: float = Field(description="deal_zero_replies / replies")
    deal_lag_samples: int = Field(description="deals whose appearance was timed")
    deal_lag_ms_min: float = Field(description="reply -> deal visible in history, fastest")
    deal_lag_ms_p50: float = Field(description="reply -> deal visible in history, median")
    deal_lag_ms_p90: float = Field(description="reply -> deal visible, 90th percentile")
    deal_lag_ms_max: float = Field(description="reply -> deal visible, slowest")
    history_order_lag_ms_p50: float = Field(description="reply -> order in history, median")
    history_order_lag_ms_max: float = Field(description="reply -> order in history, slowest")
    history_queries: int = Field(description="history/position queries made")
    history_none_rate: float = Field(description="share of them answering None")
    position_ticket_differs: bool | None = Field(
        default=None, description="hedging: a position's ticket differs from its order's"
    )


class BrokerProfile(_Section):
    probe: ProbeRun
    account: AccountProfile
    clock: ClockProfile | None = None
    symbol_prefix: str = Field(default="", description="prefix of the proposed mapping")
    symbol_suffix: str = Field(default="", description="suffix of the proposed mapping")
    symbol_map: dict[str, str] = Field(
        default_factory=dict, description="canonical (RPM) name -> broker symbol, proposed"
    )
    symbols: dict[str, SymbolProfile] = Field(default_factory=dict)
    behaviour: BehaviourProfile | None = None
