"""Money of the simulated account: balance, exchange rates, margin, floating profit.

``Ledger`` also holds the trading permissions that ``set_trading`` switches (the terminal's
Algo Trading button and the account's flags), because the account figures and the checks of
``order_send`` read them together.
"""

from __future__ import annotations

from worker.mt5 import api
from worker.mt5.sim.config import SimConfig, SimSymbol
from worker.mt5.sim.market import Market
from worker.mt5.sim.state import PositionRecord


class Ledger:
    """Balance, margin held and the per-symbol exposure that equity is computed from."""

    def __init__(self, config: SimConfig, market: Market) -> None:
        self._market = market
        self.account = config.account
        self.terminal_trade_allowed = config.terminal_trade_allowed
        self.balance = config.account.balance
        self.margin_used = 0.0
        # per symbol [buy volume, sum buy volume*price, sell volume, sum sell volume*price]
        self._exposure: dict[str, list[float]] = {}
        self._rate_symbols = {
            (s.currency_base, s.currency_profit): n for n, s in market.symbols.items()
        }

    @property
    def hedging(self) -> bool:
        return self.account.margin_mode == api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING

    def rate(self, currency: str) -> float:
        """Value of one unit of ``currency`` in the account currency (mid price)."""
        account = self.account.currency
        if currency == account:
            return 1.0
        direct = self._rate_symbols.get((currency, account))
        if direct is not None:
            tick = self._market.tick(direct)
            return (tick.bid + tick.ask) / 2
        inverse = self._rate_symbols.get((account, currency))
        if inverse is not None:
            tick = self._market.tick(inverse)
            return 2 / (tick.bid + tick.ask)
        return 1.0  # no conversion path configured: treat as account currency

    def calc_margin(self, symbol: SimSymbol, volume: float, price: float) -> float:
        leverage = max(self.account.leverage, 1)
        if symbol.margin_calc == "cfd":
            return (
                volume * symbol.contract_size * price / leverage * self.rate(symbol.currency_profit)
            )
        base_margin = volume * symbol.contract_size / leverage  # in the margin currency
        if (
            symbol.currency_margin == symbol.currency_base
            and symbol.currency_profit == self.account.currency
        ):
            return base_margin * price
        return base_margin * self.rate(symbol.currency_margin)

    def floating(self) -> float:
        total = 0.0
        for name, (buy_v, buy_vp, sell_v, sell_vp) in self._exposure.items():
            if not (buy_v or sell_v):
                continue
            symbol = self._market.symbols[name]
            tick = self._market.tick(name)
            profit = (tick.bid * buy_v - buy_vp) + (sell_vp - tick.ask * sell_v)
            total += profit * symbol.contract_size * self.rate(symbol.currency_profit)
        return total

    def free_margin(self) -> float:
        return self.balance + self.floating() - self.margin_used

    def position_profit(self, position: PositionRecord) -> tuple[float, float]:
        """(current price, profit in account currency) of an open position."""
        symbol = self._market.symbols[position.symbol]
        tick = self._market.tick(position.symbol)
        if position.type == api.POSITION_TYPE_BUY:
            current, move = tick.bid, tick.bid - position.price_open
        else:
            current, move = tick.ask, position.price_open - tick.ask
        profit = move * position.volume * symbol.contract_size
        return current, round(profit * self.rate(symbol.currency_profit), 2)

    def expose(self, position: PositionRecord, sign: int) -> None:
        """Add (+1) or remove (-1) a position from the equity and margin aggregates."""
        if position.volume <= 0:
            return
        sums = self._exposure.setdefault(position.symbol, [0.0, 0.0, 0.0, 0.0])
        offset = 0 if position.type == api.POSITION_TYPE_BUY else 2
        sums[offset] += sign * position.volume
        sums[offset + 1] += sign * position.volume * position.price_open
        self.margin_used += sign * position.margin
        if abs(self.margin_used) < 1e-6:
            self.margin_used = 0.0

    def terminal_info(self, build: int) -> api.TerminalInfo:
        return api.TerminalInfo(
            connected=True,
            trade_allowed=self.terminal_trade_allowed,
            tradeapi_disabled=False,
            build=build,
            ping_last=500,
            company=self.account.company,
            name="MetaTrader 5 (simulated)",
            path="sim://terminal",
        )

    def account_info(self) -> api.AccountInfo:
        account = self.account
        equity = self.balance + self.floating()
        margin = self.margin_used
        return api.AccountInfo(
            login=account.login,
            trade_mode=account.trade_mode,
            leverage=account.leverage,
            trade_allowed=account.trade_allowed,
            trade_expert=account.trade_expert,
            margin_mode=account.margin_mode,
            currency_digits=2,
            balance=round(self.balance, 2),
            credit=0.0,
            profit=round(equity - self.balance, 2),
            equity=round(equity, 2),
            margin=round(margin, 2),
            margin_free=round(equity - margin, 2),
            margin_level=round(equity / margin * 100, 2) if margin else 0.0,
            name=account.name,
            server=account.server,
            currency=account.currency,
            company=account.company,
        )
