"""Trade server return codes the simulator answers with, and their reply comments."""

from __future__ import annotations

from worker.mt5 import api

# Retcodes of the real MetaTrader5 package that worker.mt5.api does not export (yet); the
# names and values are those of the MQL5 reference's "Return Codes of the Trade Server".
TRADE_RETCODE_INVALID_CLOSE_VOLUME = 10038
TRADE_RETCODE_LONG_ONLY = 10042
TRADE_RETCODE_SHORT_ONLY = 10043
TRADE_RETCODE_CLOSE_ONLY = 10044
TRADE_RETCODE_FIFO_CLOSE = 10045
TRADE_RETCODE_HEDGE_PROHIBITED = 10046

RETCODE_COMMENTS = {
    api.TRADE_RETCODE_REQUOTE: "Requote",
    api.TRADE_RETCODE_REJECT: "Request rejected",
    api.TRADE_RETCODE_CANCEL: "Request canceled by trader",
    api.TRADE_RETCODE_PLACED: "Order placed",
    api.TRADE_RETCODE_DONE: "Request executed",
    api.TRADE_RETCODE_DONE_PARTIAL: "Request executed partially",
    api.TRADE_RETCODE_ERROR: "Request processing error",
    api.TRADE_RETCODE_TIMEOUT: "Request canceled by timeout",
    api.TRADE_RETCODE_INVALID: "Invalid request",
    api.TRADE_RETCODE_INVALID_VOLUME: "Invalid volume in the request",
    api.TRADE_RETCODE_INVALID_PRICE: "Invalid price in the request",
    api.TRADE_RETCODE_TRADE_DISABLED: "Trade is disabled",
    api.TRADE_RETCODE_MARKET_CLOSED: "Market is closed",
    api.TRADE_RETCODE_NO_MONEY: "There is not enough money to complete the request",
    api.TRADE_RETCODE_PRICE_CHANGED: "Prices changed",
    api.TRADE_RETCODE_PRICE_OFF: "There are no quotes to process the request",
    api.TRADE_RETCODE_TOO_MANY_REQUESTS: "Too frequent requests",
    api.TRADE_RETCODE_SERVER_DISABLES_AT: "Autotrading disabled by server",
    api.TRADE_RETCODE_CLIENT_DISABLES_AT: "Autotrading disabled by client terminal",
    api.TRADE_RETCODE_LOCKED: "Request locked for processing",
    api.TRADE_RETCODE_FROZEN: "Order or position frozen",
    api.TRADE_RETCODE_INVALID_FILL: "Invalid order filling type",
    api.TRADE_RETCODE_CONNECTION: "No connection with the trade server",
    api.TRADE_RETCODE_INVALID_ORDER: "Invalid or prohibited order type",
    api.TRADE_RETCODE_POSITION_CLOSED: "Position with the specified identifier has been closed",
    TRADE_RETCODE_INVALID_CLOSE_VOLUME: "A close volume exceeds the current position volume",
    TRADE_RETCODE_LONG_ONLY: "Only long positions are allowed",
    TRADE_RETCODE_SHORT_ONLY: "Only short positions are allowed",
    TRADE_RETCODE_CLOSE_ONLY: "Only position closing is allowed",
    TRADE_RETCODE_FIFO_CLOSE: "Position closing is allowed only by FIFO rule",
    TRADE_RETCODE_HEDGE_PROHIBITED: "Opposite positions on a single symbol are disabled",
}


def reply_comment(retcode: int) -> str:
    return RETCODE_COMMENTS.get(retcode, "Rejected")
