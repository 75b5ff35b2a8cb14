"""``order_send`` with the retry rules of DOMAIN.md 2: never resent after an unknown outcome."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.enums import RejectionReason
from worker.mt5 import api
from worker.mt5.gateway.calls import Calls
from worker.mt5.gateway.errors import GatewayRejection
from worker.mt5.gateway.filling import filling_modes
from worker.mt5.gateway.model import SendOutcome, Side, SymbolSpec
from worker.mt5.gateway.retcodes import RetcodeClass, Status, classify_retcode

_COMMENT = re.compile(r"^[A-Za-z0-9_-]{0,26}$")


# Proves, just before an order leaves, that this worker still holds the session.
Fence = Callable[[], None]


@dataclass
class _SendState:
    modes: tuple[int, ...]
    mode_index: int = 0
    fell_back: bool = False
    attempts: int = 0
    last: SendOutcome | None = None
    kind: RetcodeClass = "final"


class Sender:
    """Sends market orders for one gateway."""

    def __init__(
        self,
        calls: Calls,
        terminal: api.Terminal,
        tick: Callable[[str], api.Tick],
        *,
        max_attempts: int,
        backoff_seconds: float,
        sleep: Callable[[float], None],
    ) -> None:
        self._calls = calls
        self._terminal = terminal
        self._tick = tick
        self._max_attempts = max(1, max_attempts)
        self._backoff = backoff_seconds
        self._sleep = sleep

    def send(
        self,
        spec: SymbolSpec,
        side: Side,
        lots: float,
        *,
        magic: int,
        comment: str,
        deviation: int,
        position: int | None = None,
        fence: Fence | None = None,
    ) -> SendOutcome:
        """Send one market order (see ``Gateway.send``)."""
        if not _COMMENT.match(comment):
            raise GatewayRejection(
                RejectionReason.INVALID_REQUEST,
                "comment must be at most 26 characters of [A-Za-z0-9_-]",
            )
        modes = filling_modes(spec)
        if not modes:
            raise GatewayRejection(
                RejectionReason.SYMBOL_NOT_TRADABLE,
                f"{spec.name}: no filling mode allowed (filling_mode {spec.filling_mode}, "
                f"exemode {spec.trade_exemode})",
            )
        state = _SendState(modes=modes)
        attempt = 1
        while True:
            outcome = self._attempt(
                spec, side, lots, magic, comment, deviation, position, state, fence
            )
            if state.kind not in ("retry_price", "retry_backoff"):
                return outcome
            if attempt >= self._max_attempts:
                return outcome  # retryable codes still there after the last attempt: rejected
            if state.kind == "retry_backoff":
                self._sleep(self._backoff * 2 ** (attempt - 1))
            attempt += 1

    def _attempt(
        self,
        spec: SymbolSpec,
        side: Side,
        lots: float,
        magic: int,
        comment: str,
        deviation: int,
        position: int | None,
        state: _SendState,
        fence: Fence | None,
    ) -> SendOutcome:
        while True:
            tick = self._tick(spec.name)  # nothing in flight yet: SessionLost is safe here
            price = tick.ask if side is Side.BUY else tick.bid
            mode = state.modes[state.mode_index]
            # the real binding refuses an int or Decimal where it wants a float
            request: dict[str, Any] = {
                "action": api.TRADE_ACTION_DEAL,
                "symbol": spec.name,
                "volume": float(lots),
                "type": side.order_type,
                "price": float(price),
                "deviation": int(deviation),
                "magic": int(magic),
                "comment": comment,
                "type_time": api.ORDER_TIME_GTC,
                "type_filling": int(mode),
            }
            if position:
                request["position"] = int(position)
            state.attempts += 1
            outcome = self.order_send(request, state.attempts, price, mode, deviation, fence)
            state.last = outcome
            if outcome.status == "rejected" and outcome.retcode is None:
                # refused by the client (algo trading off): nothing left the terminal
                raise GatewayRejection(
                    RejectionReason.TRADING_DISABLED,
                    outcome.comment,
                    api.TRADE_RETCODE_CLIENT_DISABLES_AT,
                )
            if (
                outcome.retcode == api.TRADE_RETCODE_INVALID_FILL
                and not state.fell_back
                and state.mode_index + 1 < len(state.modes)
            ):
                state.fell_back = True
                state.mode_index += 1
                continue
            state.kind = (
                "unknown" if outcome.status == "unknown" else classify_retcode(outcome.retcode)
            )
            return outcome

    def order_send(
        self,
        request: dict[str, Any],
        attempts: int,
        price: float,
        mode: int,
        deviation: int,
        fence: Fence | None = None,
    ) -> SendOutcome:
        """One ``order_send``; None or a transport error is an unknown outcome.

        ``fence`` runs immediately before the call and raises when this worker may no longer
        send on the session (its lease lost): nothing is sent then.

        Except None with ``last_error`` -8 (algo trading disabled in the client): the order
        was not sent, a definite refusal, returned as "rejected" with no retcode.
        """

        def outcome(
            status: Status, result: api.OrderSendResult | None, comment: str
        ) -> SendOutcome:
            return SendOutcome(
                status=status,
                retcode=None if result is None else result.retcode,
                order=0 if result is None else result.order,
                deal=0 if result is None else result.deal,
                volume=0.0 if result is None else result.volume,
                price=0.0 if result is None else result.price,
                bid=0.0 if result is None else result.bid,
                ask=0.0 if result is None else result.ask,
                comment=comment,
                attempts=attempts,
                requested_price=price,
                filling_mode=mode,
                deviation=deviation,
            )

        if fence is not None:
            fence()
        try:
            result, error = self._calls.call(
                "order_send", lambda: self._terminal.order_send(request), request=request
            )
        except api.TransportError as exc:
            return outcome("unknown", None, f"transport error: {type(exc).__name__}")
        if result is None:
            code, message = error or (api.RES_E_FAIL, "no result")
            if code == api.RES_E_AUTO_TRADING_DISABLED:
                return outcome("rejected", None, f"order_send refused: ({code}, {message})")
            return outcome("unknown", None, f"order_send returned None: ({code}, {message})")
        kind = classify_retcode(result.retcode)
        # final codes, and retryable ones (retried by the caller), are "rejected" here
        status: Status = kind if kind in ("done", "partial", "placed", "unknown") else "rejected"
        return outcome(status, result, result.comment)
