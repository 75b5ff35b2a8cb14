"""What the ``MetaTrader5`` Python binding refuses before anything reaches the terminal.

A refused call returns None and ``last_error()`` says why; ``CallFailed`` carries that pair
from anywhere in the simulator to the facade.
"""

from __future__ import annotations

from typing import Any

from worker.mt5 import api

# request key -> accepted Python types (the binding refuses anything else)
REQUEST_FIELDS: dict[str, tuple[type, ...]] = {
    "action": (int,),
    "magic": (int,),
    "order": (int,),
    "symbol": (str,),
    "volume": (float, int),
    "price": (float, int),
    "stoplimit": (float, int),
    "sl": (float, int),
    "tp": (float, int),
    "deviation": (int,),
    "type": (int,),
    "type_filling": (int,),
    "type_time": (int,),
    "expiration": (int,),
    "comment": (str,),
    "position": (int,),
    "position_by": (int,),
}
FLOAT_FIELDS = ("volume", "price", "stoplimit", "sl", "tp")
MAX_COMMENT = 26


class CallFailed(Exception):
    """The call returns None; ``last_error()`` becomes ``(code, message)``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_request(request: Any, *, float_only: bool = False) -> api.TradeRequest:
    """The request dict as the binding reads it, or ``CallFailed``.

    ``float_only``: like the real binding, an int or Decimal where a float belongs is refused.
    """
    if not isinstance(request, dict):
        raise CallFailed(api.RES_E_INVALID_PARAMS, "Invalid request argument")
    values: dict[str, Any] = dict.fromkeys(api.TradeRequest._fields, 0)
    values["symbol"] = ""
    values["comment"] = ""
    for key, value in request.items():
        accepted = REQUEST_FIELDS.get(key)
        if accepted is None:
            raise CallFailed(api.RES_E_INVALID_PARAMS, f'Invalid "{key}" argument')
        if float_only and key in FLOAT_FIELDS and not isinstance(value, float):
            raise CallFailed(api.RES_E_INVALID_PARAMS, f'Invalid "{key}" argument')
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise CallFailed(api.RES_E_INVALID_PARAMS, f'Invalid "{key}" argument type')
        values[key] = value
    if "action" not in request:
        raise CallFailed(api.RES_E_INVALID_PARAMS, 'Missing "action" argument')
    comment = values["comment"]
    if len(comment) > MAX_COMMENT or not comment.isascii():
        raise CallFailed(api.RES_E_INVALID_PARAMS, 'Invalid "comment" argument')
    for key in FLOAT_FIELDS:
        values[key] = float(values[key])
    return api.TradeRequest(**values)
