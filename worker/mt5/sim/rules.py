"""The trade server's checks of a market order, in the order the real server applies them
(DOMAIN.md section 2): permissions, volume, position, trade mode, session, filling, price,
margin. A failed check is a retcode and nothing executes.
"""

from __future__ import annotations

from worker.mt5 import api
from worker.mt5.sim import retcodes
from worker.mt5.sim.book import Book
from worker.mt5.sim.config import FaultConfig, SimSymbol
from worker.mt5.sim.faults import FaultInjector
from worker.mt5.sim.margin import Ledger
from worker.mt5.sim.market import Market
from worker.mt5.sim.retcodes import reply_comment

EPS = 1e-9
INSTANT_MODES = (api.SYMBOL_TRADE_EXECUTION_INSTANT, api.SYMBOL_TRADE_EXECUTION_REQUEST)


def is_instant(symbol: SimSymbol) -> bool:
    """Request and Instant execution: the client names the price, the server may requote."""
    return symbol.trade_exemode in INSTANT_MODES


def allowed_fillings(symbol: SimSymbol, *, by_exemode: bool = False) -> tuple[int, ...]:
    """Filling modes the server accepts for a market order on ``symbol``.

    ``by_exemode`` (a hardened server): Request and Instant execution take FOK only."""
    if by_exemode and is_instant(symbol):
        return (api.ORDER_FILLING_FOK,)
    allowed: list[int] = []
    if symbol.filling_mode & api.SYMBOL_FILLING_FOK:
        allowed.append(api.ORDER_FILLING_FOK)
    if symbol.filling_mode & api.SYMBOL_FILLING_IOC:
        allowed.append(api.ORDER_FILLING_IOC)
    if symbol.trade_exemode == api.SYMBOL_TRADE_EXECUTION_EXCHANGE:
        allowed.append(api.ORDER_FILLING_RETURN)
    elif symbol.trade_exemode != api.SYMBOL_TRADE_EXECUTION_MARKET and not allowed:
        allowed.append(api.ORDER_FILLING_FOK)  # request/instant: FOK is always possible
    return tuple(allowed)


class Rules:
    """Validates market orders against the symbol, the account and the open positions."""

    def __init__(self, market: Market, ledger: Ledger, book: Book, faults: FaultInjector) -> None:
        self._market = market
        self._ledger = ledger
        self._book = book
        self._faults = faults

    @property
    def _server(self) -> FaultConfig:
        return self._faults.config

    def check(self, echo: api.TradeRequest, *, at_market: bool = False) -> tuple[int, float]:
        """(retcode or 0, margin the order needs). ``at_market``: the order fills at the
        price of the moment whatever it named (a late execution): no requote check."""
        if echo.action != api.TRADE_ACTION_DEAL:
            return 0, 0.0
        ledger = self._ledger
        if not ledger.terminal_trade_allowed:
            return api.TRADE_RETCODE_CLIENT_DISABLES_AT, 0.0
        symbol = self._market.symbols.get(echo.symbol)
        if symbol is None:
            return api.TRADE_RETCODE_INVALID, 0.0
        if echo.type not in (api.ORDER_TYPE_BUY, api.ORDER_TYPE_SELL):
            return api.TRADE_RETCODE_INVALID_ORDER, 0.0
        if not ledger.account.trade_allowed:
            return api.TRADE_RETCODE_TRADE_DISABLED, 0.0
        if not ledger.account.trade_expert:
            return api.TRADE_RETCODE_SERVER_DISABLES_AT, 0.0
        volume = echo.volume
        steps = volume / symbol.volume_step
        if (
            volume < symbol.volume_min - EPS
            or volume > symbol.volume_max + EPS
            or abs(steps - round(steps)) > 1e-6
        ):
            return api.TRADE_RETCODE_INVALID_VOLUME, 0.0
        is_buy = echo.type == api.ORDER_TYPE_BUY
        retcode, closing = self._closing_volume(echo, is_buy)
        if retcode:
            return retcode, 0.0
        opening = max(0.0, volume - closing)
        retcode = self._trade_mode(symbol, opening, is_buy, strict=self._server.strict_retcodes)
        if retcode:
            return retcode, 0.0
        if not self._market.is_open(echo.symbol):
            return api.TRADE_RETCODE_MARKET_CLOSED, 0.0
        allowed = allowed_fillings(symbol, by_exemode=self._server.filling_by_exemode)
        if echo.type_filling not in allowed or echo.type_filling in symbol.refused_fillings:
            return api.TRADE_RETCODE_INVALID_FILL, 0.0
        tick = self._market.tick(echo.symbol)
        price = tick.ask if is_buy else tick.bid
        if is_instant(symbol) and not at_market:
            if echo.price <= 0:
                return api.TRADE_RETCODE_INVALID_PRICE, 0.0
            if abs(echo.price - price) > echo.deviation * symbol.point + EPS:
                return api.TRADE_RETCODE_REQUOTE, 0.0
        margin = ledger.calc_margin(symbol, opening, price) if opening > EPS else 0.0
        if margin > ledger.free_margin() + EPS:
            return api.TRADE_RETCODE_NO_MONEY, margin
        return 0, margin

    def _closing_volume(self, echo: api.TradeRequest, is_buy: bool) -> tuple[int, float]:
        """(retcode or 0, volume of this deal that reduces an existing position)."""
        book = self._book
        volume = echo.volume
        if echo.position:
            position = book.positions.get(echo.position)
            if position is None or position.symbol != echo.symbol:
                return api.TRADE_RETCODE_POSITION_CLOSED, 0.0
            if (position.type == api.POSITION_TYPE_BUY) == is_buy:
                return api.TRADE_RETCODE_INVALID, 0.0
            if volume > position.volume + EPS:
                if self._server.strict_retcodes:
                    return retcodes.TRADE_RETCODE_INVALID_CLOSE_VOLUME, 0.0
                return api.TRADE_RETCODE_INVALID_VOLUME, 0.0
            if self._server.fifo_close and self._ledger.hedging:
                oldest = min(
                    (
                        p
                        for p in book.by_symbol.get(position.symbol, {}).values()
                        if p.type == position.type
                    ),
                    key=lambda p: (p.time_msc, p.identifier),
                )
                if oldest is not position:
                    return retcodes.TRADE_RETCODE_FIFO_CLOSE, 0.0
            return 0, volume
        if self._ledger.hedging:
            if self._server.hedging_prohibited:
                opposite = api.POSITION_TYPE_SELL if is_buy else api.POSITION_TYPE_BUY
                open_here = book.by_symbol.get(echo.symbol, {}).values()
                if any(p.type == opposite for p in open_here):
                    return retcodes.TRADE_RETCODE_HEDGE_PROHIBITED, 0.0
        else:
            ticket = book.netting.get(echo.symbol)
            if ticket is not None:
                position = book.positions[ticket]
                if (position.type == api.POSITION_TYPE_BUY) != is_buy:
                    return 0, min(volume, position.volume)
        return 0, 0.0

    @staticmethod
    def _trade_mode(symbol: SimSymbol, opening: float, is_buy: bool, *, strict: bool) -> int:
        mode = symbol.trade_mode
        opens = opening > EPS
        if strict and opens:
            if mode == api.SYMBOL_TRADE_MODE_CLOSEONLY:
                return retcodes.TRADE_RETCODE_CLOSE_ONLY
            if mode == api.SYMBOL_TRADE_MODE_LONGONLY and not is_buy:
                return retcodes.TRADE_RETCODE_LONG_ONLY
            if mode == api.SYMBOL_TRADE_MODE_SHORTONLY and is_buy:
                return retcodes.TRADE_RETCODE_SHORT_ONLY
        if (
            mode == api.SYMBOL_TRADE_MODE_DISABLED
            or (opens and mode == api.SYMBOL_TRADE_MODE_CLOSEONLY)
            or (opens and mode == api.SYMBOL_TRADE_MODE_LONGONLY and not is_buy)
            or (opens and mode == api.SYMBOL_TRADE_MODE_SHORTONLY and is_buy)
        ):
            return api.TRADE_RETCODE_TRADE_DISABLED
        return 0

    def order_check(self, echo: api.TradeRequest) -> api.OrderCheckResult:
        """What ``order_check`` answers: the checks and the account after the order."""
        info = self._ledger.account_info()
        retcode, margin = self.check(echo)
        if retcode == 0 and echo.action != api.TRADE_ACTION_DEAL:
            retcode = api.TRADE_RETCODE_INVALID
        comment = "Done" if retcode == 0 else reply_comment(retcode)
        margin_after = info.margin + (margin if retcode == 0 else 0.0)
        return api.OrderCheckResult(
            retcode=retcode,
            balance=info.balance,
            equity=info.equity,
            profit=info.profit,
            margin=round(margin_after, 2),
            margin_free=round(info.equity - margin_after, 2),
            margin_level=round(info.equity / margin_after * 100, 2) if margin_after else 0.0,
            comment=comment,
            request=echo,
        )
