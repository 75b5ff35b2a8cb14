"""Execution of the simulated broker: market orders fill with slippage and limited liquidity,
RETURN orders on exchange execution are placed and fill later, orders taken with an unknown
outcome (``timeout_late``, ``lost_reply_late``) execute late, and every fill becomes a deal
that opens, adds to, reduces, closes or (netting) reverses a position.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.mt5 import api
from worker.mt5.sim.binding import CallFailed
from worker.mt5.sim.book import Book
from worker.mt5.sim.clock import ServerClock
from worker.mt5.sim.config import SCRIPTED_OUTCOMES, SimSymbol
from worker.mt5.sim.faults import SCRIPTED_RETCODES, FaultInjector
from worker.mt5.sim.margin import Ledger
from worker.mt5.sim.market import Market
from worker.mt5.sim.retcodes import RETCODE_COMMENTS, reply_comment
from worker.mt5.sim.rules import EPS, Rules, is_instant
from worker.mt5.sim.state import DealRecord, LateOrder, OrderRecord, PositionRecord

_EXECUTED = (api.TRADE_RETCODE_DONE, api.TRADE_RETCODE_DONE_PARTIAL, api.TRADE_RETCODE_PLACED)
# taken by the server, answered as unknown, executed late_execution_seconds later
LATE_OUTCOMES = frozenset({"timeout_late", "lost_reply_late"})


def floor_step(volume: float, step: float) -> float:
    return round(int(volume / step + EPS) * step, 8)


@dataclass
class Request:
    echo: api.TradeRequest
    request_id: int

    @property
    def is_buy(self) -> bool:
        return self.echo.type == api.ORDER_TYPE_BUY


class Dealer:
    """Answers ``order_send`` for deals and removals, and fills placed orders when due."""

    def __init__(
        self,
        market: Market,
        ledger: Ledger,
        book: Book,
        clock: ServerClock,
        faults: FaultInjector,
        rules: Rules,
    ) -> None:
        self._market = market
        self._ledger = ledger
        self._book = book
        self._clock = clock
        self._faults = faults
        self._rules = rules

    def send(self, echo: api.TradeRequest) -> api.OrderSendResult:
        """The reply to a parsed request; raises ``CallFailed`` when the call returns None."""
        book = self._book
        if (
            echo.action == api.TRADE_ACTION_DEAL
            and not self._ledger.terminal_trade_allowed
            and self._faults.config.algo_off_returns_none
        ):
            # the terminal does not send it at all: a definite refusal, not an unknown outcome
            raise CallFailed(api.RES_E_AUTO_TRADING_DISABLED, "Terminal: Autotrading disabled")
        req = Request(echo, book.next_request)
        book.next_request += 1
        if echo.action == api.TRADE_ACTION_REMOVE:
            return self._remove(req)
        if echo.action != api.TRADE_ACTION_DEAL:
            return self._result(api.TRADE_RETCODE_INVALID, req)
        return self._deal(req)

    def _deal(self, req: Request) -> api.OrderSendResult:
        retcode, _ = self._rules.check(req.echo)
        if retcode:
            return self._result(retcode, req)
        symbol = self._market.symbols[req.echo.symbol]
        instant = is_instant(symbol)
        fault = self._faults.next_outcome(instant)
        assert fault in SCRIPTED_OUTCOMES
        if fault == "no_result":
            raise CallFailed(api.RES_E_FAIL, "Terminal: Call failed")
        if fault in SCRIPTED_RETCODES:
            return self._result(SCRIPTED_RETCODES[fault], req)
        if fault in LATE_OUTCOMES:
            return self._hold_late(req, fault)
        result = self._execute(req, symbol, instant)
        if fault == "lost_reply" and result.retcode in _EXECUTED:
            raise CallFailed(api.RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout")
        if fault == "timeout_executed" and result.retcode == api.TRADE_RETCODE_DONE:
            return result._replace(
                retcode=api.TRADE_RETCODE_TIMEOUT,
                comment=RETCODE_COMMENTS[api.TRADE_RETCODE_TIMEOUT],
            )
        return result

    def _hold_late(self, req: Request, fault: str) -> api.OrderSendResult:
        """The server takes the order and executes it later; the client learns nothing."""
        due = self._clock.now() + self._faults.late_delay_seconds()
        self._book.hold_late(LateOrder(req.request_id, due, req.echo._asdict()))
        self._save()
        if fault == "lost_reply_late":
            raise CallFailed(api.RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout")
        return self._result(api.TRADE_RETCODE_TIMEOUT, req)

    def _execute_late(self, late: LateOrder) -> None:
        """A late order's turn: the server's checks again (not the requote check: it fills
        at the price of the moment), then a market execution; refused, it leaves no trace."""
        echo = late.echo()
        retcode, _ = self._rules.check(echo, at_market=True)
        if retcode:
            return
        symbol = self._market.symbols[echo.symbol]
        self._execute(Request(echo, late.request_id), symbol, instant=False)

    def _execute(self, req: Request, symbol: SimSymbol, instant: bool) -> api.OrderSendResult:
        echo = req.echo
        book = self._book
        tick = self._market.tick(echo.symbol)
        now = self._clock.stamp()
        liquidity = floor_step(symbol.liquidity_lots, symbol.volume_step)
        order = OrderRecord(
            ticket=book.next_order,
            symbol=echo.symbol,
            type=echo.type,
            type_filling=echo.type_filling,
            state=api.ORDER_STATE_STARTED,
            magic=echo.magic,
            position_id=0,
            volume_initial=echo.volume,
            volume_current=echo.volume,
            price_open=echo.price,
            time_setup_msc=now,
            time_done_msc=0,
            comment=self._faults.config.served_comment(echo.comment),
        )
        if echo.type_filling == api.ORDER_FILLING_RETURN:
            book.next_order += 1
            order.state = api.ORDER_STATE_PLACED
            book.place(order, self._clock.now() + symbol.exchange_fill_delay_seconds)
            self._save()
            return self._result(
                api.TRADE_RETCODE_PLACED, req, order=order.ticket, volume=echo.volume, tick=tick
            )
        volume = echo.volume
        if volume > liquidity + EPS:
            if echo.type_filling == api.ORDER_FILLING_FOK or liquidity < symbol.volume_min:
                return self._result(api.TRADE_RETCODE_REJECT, req, tick=tick)
            volume = liquidity
        if instant:
            price = echo.price
        else:
            price = self._faults.slipped(symbol, tick.ask if req.is_buy else tick.bid, req.is_buy)
        book.next_order += 1
        deal = self.fill(order, volume, price, echo.position or None, now)
        retcode = api.TRADE_RETCODE_DONE
        if order.volume_current > EPS:
            retcode = api.TRADE_RETCODE_DONE_PARTIAL
        book.finish_order(order, api.ORDER_STATE_PARTIAL if retcode == 10010 else None, now)
        self._save()
        return self._result(
            retcode,
            req,
            deal=0 if self._faults.hides_deal_ticket() else deal.ticket,
            order=order.ticket,
            volume=volume,
            price=price,
            tick=tick,
        )

    def _save(self) -> None:
        clock = self._clock
        self._book.save_meta(self._ledger.balance, clock.last_stamp, clock.last_utc_ms)
        self._book.commit()

    def fill(
        self, order: OrderRecord, volume: float, price: float, position: int | None, now: int
    ) -> DealRecord:
        """One deal of ``order``: update positions, balance and history."""
        book, ledger = self._book, self._ledger
        symbol = self._market.symbols[order.symbol]
        is_buy = order.type == api.ORDER_TYPE_BUY
        hedging = ledger.hedging
        target: PositionRecord | None = None
        if position is not None:
            target = book.positions[position]
        elif not hedging and order.symbol in book.netting:
            target = book.positions[book.netting[order.symbol]]
        profit = 0.0
        entry = api.DEAL_ENTRY_IN
        if target is None:
            ticket = order.ticket
            if hedging and self._faults.config.position_ticket_differs:
                ticket = book.next_position
                book.next_position += 1
            target = PositionRecord(
                ticket=ticket,
                identifier=order.ticket,
                symbol=order.symbol,
                type=api.POSITION_TYPE_BUY if is_buy else api.POSITION_TYPE_SELL,
                magic=order.magic,
                volume=0.0,
                price_open=price,
                time_msc=now,
                time_update_msc=now,
                comment=order.comment,
                margin=0.0,
            )
        else:
            ledger.expose(target, -1)
            book.drop_position(target.ticket)
        same_side = (target.type == api.POSITION_TYPE_BUY) == is_buy
        if same_side:
            total = target.volume + volume
            target.price_open = round(
                (target.price_open * target.volume + price * volume) / total, symbol.digits + 3
            )
            target.volume = round(total, 8)
            target.margin += ledger.calc_margin(symbol, volume, price)
        else:
            closed = min(volume, target.volume)
            sign = 1.0 if target.type == api.POSITION_TYPE_BUY else -1.0
            move = (price - target.price_open) * sign * closed * symbol.contract_size
            profit = round(move * ledger.rate(symbol.currency_profit), 2)
            ledger.balance += profit
            target.margin *= (target.volume - closed) / target.volume
            target.volume = round(target.volume - closed, 8)
            remainder = round(volume - closed, 8)
            entry = api.DEAL_ENTRY_OUT
            if remainder > EPS:  # netting reversal: same identifier, new ticket and side
                entry = api.DEAL_ENTRY_INOUT
                target.ticket = order.ticket
                target.type = api.POSITION_TYPE_BUY if is_buy else api.POSITION_TYPE_SELL
                target.volume = remainder
                target.price_open = price
                target.margin = ledger.calc_margin(symbol, remainder, price)
        target.time_update_msc = now
        order.position_id = target.identifier
        order.volume_current = round(order.volume_current - volume, 8)
        if order.price_open == 0.0 or order.state == api.ORDER_STATE_STARTED:
            order.price_open = price
        if target.volume > EPS:
            book.add_position(target)
            if not hedging:
                book.netting[target.symbol] = target.ticket
            ledger.expose(target, +1)
            book.save_position(target)
        elif not hedging:
            book.netting.pop(target.symbol, None)
        deal = DealRecord(
            ticket=book.next_deal,
            order=order.ticket,
            time_msc=now,
            type=api.DEAL_TYPE_BUY if is_buy else api.DEAL_TYPE_SELL,
            entry=entry,
            magic=order.magic,
            position_id=target.identifier,
            volume=volume,
            price=price,
            profit=profit,
            symbol=order.symbol,
            comment=order.comment,
        )
        book.next_deal += 1
        book.add_deal(deal)
        book.save_deal(deal)
        lag = self._faults.deal_lag_seconds()
        if lag > 0:
            book.hide_deal(deal.ticket, self._clock.now() + lag)
        return deal

    def _remove(self, req: Request) -> api.OrderSendResult:
        order = self._book.open_orders.get(req.echo.order)
        if order is None:
            return self._result(api.TRADE_RETCODE_INVALID, req)
        self._book.finish_order(order, api.ORDER_STATE_CANCELED, self._clock.stamp())
        self._save()
        return self._result(api.TRADE_RETCODE_DONE, req, order=order.ticket)

    def pump(self) -> None:
        """Execute the late orders that are due, and fill RETURN orders on exchange-execution
        symbols whose delay has elapsed (while their market is open)."""
        book, market = self._book, self._market
        now = self._clock.now()
        for late in sorted(book.late_orders.values(), key=lambda o: (o.due, o.request_id)):
            name = str(late.request.get("symbol", ""))
            if now < late.due or (name in market.symbols and not market.is_open(name)):
                continue
            book.drop_late(late.request_id)
            self._execute_late(late)
        for ticket, due in list(book.pending_fills.items()):
            order = book.open_orders.get(ticket)
            if order is None:
                book.pending_fills.pop(ticket, None)
                continue
            if now < due or not market.is_open(order.symbol):
                continue
            symbol = market.symbols[order.symbol]
            volume = min(
                order.volume_current, floor_step(symbol.liquidity_lots, symbol.volume_step)
            )
            tick = market.tick(order.symbol)
            is_buy = order.type == api.ORDER_TYPE_BUY
            price = self._faults.slipped(symbol, tick.ask if is_buy else tick.bid, is_buy)
            stamp = self._clock.stamp()
            self.fill(order, volume, price, None, stamp)
            if order.volume_current > EPS:
                order.state = api.ORDER_STATE_PARTIAL
                book.pending_fills[ticket] = now + symbol.exchange_fill_delay_seconds
                book.save_order(order)
            else:
                book.finish_order(order, None, stamp)
        self._save()

    def _result(
        self,
        retcode: int,
        req: Request,
        *,
        deal: int = 0,
        order: int = 0,
        volume: float = 0.0,
        price: float = 0.0,
        tick: api.Tick | None = None,
    ) -> api.OrderSendResult:
        if tick is None and req.echo.symbol in self._market.symbols:
            tick = self._market.tick(req.echo.symbol)
        return api.OrderSendResult(
            retcode=retcode,
            deal=deal,
            order=order,
            volume=volume,
            price=price,
            bid=tick.bid if tick else 0.0,
            ask=tick.ask if tick else 0.0,
            comment=reply_comment(retcode),
            request_id=req.request_id,
            retcode_external=0,
            request=req.echo,
        )
