"""Broker state records of the simulated terminal and their SQLite persistence.

Records are compact slotted objects (the simulator may hold tens of thousands); they are
turned into the ``api`` named tuples only when read. With a state file every mutation is
written at once and committed before ``order_send`` answers, so a process killed with -9 keeps
every order it answered (SQLite WAL: a committed transaction survives a process crash).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from worker.mt5 import api


@dataclass(slots=True)
class OrderRecord:
    ticket: int
    symbol: str
    type: int
    type_filling: int
    state: int
    magic: int
    position_id: int
    volume_initial: float
    volume_current: float
    price_open: float
    time_setup_msc: int
    time_done_msc: int
    comment: str
    reason: int = 3  # ORDER_REASON_EXPERT
    _history: api.TradeOrder | None = field(default=None, repr=False, compare=False)

    def finish(self, state: int, now_msc: int) -> None:
        """Done: filled or cancelled at ``now_msc``; from now on it no longer changes."""
        self.state = state
        self.time_done_msc = now_msc
        self._history = None

    def history_api(self) -> api.TradeOrder:
        """The order as the history shows it, built once: an order in history is done and
        no longer changes (every settler round asks for a window of many of them)."""
        if not self.time_done_msc:  # not done yet (found by its position): may change
            return self.to_api(self.price_open)
        if self._history is None:
            self._history = self.to_api(self.price_open)
        return self._history

    def to_api(self, price_current: float) -> api.TradeOrder:
        return api.TradeOrder(
            ticket=self.ticket,
            time_setup=self.time_setup_msc // 1000,
            time_setup_msc=self.time_setup_msc,
            time_done=self.time_done_msc // 1000,
            time_done_msc=self.time_done_msc,
            time_expiration=0,
            type=self.type,
            type_time=api.ORDER_TIME_GTC,
            type_filling=self.type_filling,
            state=self.state,
            magic=self.magic,
            position_id=self.position_id,
            position_by_id=0,
            reason=self.reason,
            volume_initial=self.volume_initial,
            volume_current=self.volume_current,
            price_open=self.price_open,
            sl=0.0,
            tp=0.0,
            price_current=price_current,
            price_stoplimit=0.0,
            symbol=self.symbol,
            comment=self.comment,
            external_id="",
        )


@dataclass(slots=True)
class DealRecord:
    ticket: int
    order: int
    time_msc: int
    type: int
    entry: int
    magic: int
    position_id: int
    volume: float
    price: float
    profit: float
    symbol: str
    comment: str
    # a deal never changes: its answer is built once (a history window returns thousands)
    _api: api.TradeDeal | None = field(default=None, repr=False, compare=False)

    def to_api(self) -> api.TradeDeal:
        if self._api is None:
            self._api = self._build_api()
        return self._api

    def _build_api(self) -> api.TradeDeal:
        return api.TradeDeal(
            ticket=self.ticket,
            order=self.order,
            time=self.time_msc // 1000,
            time_msc=self.time_msc,
            type=self.type,
            entry=self.entry,
            magic=self.magic,
            position_id=self.position_id,
            reason=3,
            volume=self.volume,
            price=self.price,
            commission=0.0,
            swap=0.0,
            profit=self.profit,
            fee=0.0,
            symbol=self.symbol,
            comment=self.comment,
            external_id="",
        )


@dataclass(slots=True)
class PositionRecord:
    ticket: int
    identifier: int
    symbol: str
    type: int
    magic: int
    volume: float
    price_open: float
    time_msc: int
    time_update_msc: int
    comment: str
    margin: float  # account currency, held while open

    def to_api(self, price_current: float, profit: float) -> api.TradePosition:
        return api.TradePosition(
            ticket=self.ticket,
            time=self.time_msc // 1000,
            time_msc=self.time_msc,
            time_update=self.time_update_msc // 1000,
            time_update_msc=self.time_update_msc,
            type=self.type,
            magic=self.magic,
            identifier=self.identifier,
            reason=3,
            volume=self.volume,
            price_open=self.price_open,
            sl=0.0,
            tp=0.0,
            price_current=price_current,
            swap=0.0,
            profit=profit,
            symbol=self.symbol,
            comment=self.comment,
            external_id="",
        )


@dataclass(slots=True)
class LateOrder:
    """An order the server took although the client saw 10012 or no reply (``timeout_late``,
    ``lost_reply_late``): it executes at ``due`` (UTC seconds); nothing shows until then."""

    request_id: int
    due: float
    request: dict[str, Any]  # the ``api.TradeRequest`` fields

    def echo(self) -> api.TradeRequest:
        return api.TradeRequest(**self.request)


@dataclass
class LoadedState:
    meta: dict[str, Any]
    orders: list[OrderRecord]
    deals: list[DealRecord]
    positions: list[PositionRecord]
    late: list[LateOrder] = field(default_factory=list)


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orders (ticket INTEGER PRIMARY KEY, data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS deals (ticket INTEGER PRIMARY KEY, data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS positions (ticket INTEGER PRIMARY KEY, data TEXT NOT NULL)",
    # orders that execute late (LateOrder), by request id
    "CREATE TABLE IF NOT EXISTS late_orders (ticket INTEGER PRIMARY KEY, data TEXT NOT NULL)",
)


def _persisted(record: Any) -> dict[str, Any]:
    """A record's fields as the state file keeps them (not its cached answers)."""
    return {f.name: getattr(record, f.name) for f in fields(record) if not f.name.startswith("_")}


def _rows(kind: type, cursor: sqlite3.Cursor) -> list[Any]:
    names = {f.name for f in fields(kind) if not f.name.startswith("_")}
    return [kind(**{k: v for k, v in json.loads(data).items() if k in names}) for (data,) in cursor]


class SimStore:
    """The state file: one SQLite database in WAL mode, written on every mutation."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level="DEFERRED")
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode (only an OS crash may lose
        # the last transactions), and several times faster than FULL.
        self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in _SCHEMA:
            self._db.execute(statement)
        self._db.commit()

    def load(self) -> LoadedState:
        meta = {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
        return LoadedState(
            meta=meta,
            orders=_rows(OrderRecord, self._db.execute("SELECT data FROM orders ORDER BY ticket")),
            deals=_rows(DealRecord, self._db.execute("SELECT data FROM deals ORDER BY ticket")),
            positions=_rows(
                PositionRecord, self._db.execute("SELECT data FROM positions ORDER BY ticket")
            ),
            late=_rows(LateOrder, self._db.execute("SELECT data FROM late_orders ORDER BY ticket")),
        )

    def put_meta(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
        )

    def put_order(self, order: OrderRecord) -> None:
        self._put("orders", order.ticket, _persisted(order))

    def put_deal(self, deal: DealRecord) -> None:
        self._put("deals", deal.ticket, _persisted(deal))

    def put_position(self, position: PositionRecord) -> None:
        self._put("positions", position.ticket, asdict(position))

    def delete_position(self, ticket: int) -> None:
        self._db.execute("DELETE FROM positions WHERE ticket = ?", (ticket,))

    def put_late(self, late: LateOrder) -> None:
        self._put("late_orders", late.request_id, asdict(late))

    def delete_late(self, request_id: int) -> None:
        self._db.execute("DELETE FROM late_orders WHERE ticket = ?", (request_id,))

    def _put(self, table: str, ticket: int, data: dict[str, Any]) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO {table} (ticket, data) VALUES (?, ?)",
            (ticket, json.dumps(data, separators=(",", ":"))),
        )

    def commit(self) -> None:
        self._db.commit()

    def close(self) -> None:
        self._db.close()


DUMP_FIELDS = (
    "ticket",
    "order",
    "position_id",
    "symbol",
    "type",
    "entry",
    "volume",
    "price",
    "comment",
    "magic",
    "time_msc",
)


def late_pending(state_path: str | Path) -> int:
    """How many late orders in a state file still wait to execute (read-only)."""
    uri = f"{Path(state_path).resolve().as_uri()}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        (count,) = db.execute("SELECT count(*) FROM late_orders").fetchone()
        return int(count)
    except sqlite3.OperationalError:  # a state file from before late orders
        return 0
    finally:
        db.close()


def iter_deals(state_path: str | Path) -> Iterator[dict[str, Any]]:
    """Every deal in a state file, oldest first, with the MT5 deal fields (for ``--dump``)."""
    uri = f"{Path(state_path).resolve().as_uri()}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        for (data,) in db.execute("SELECT data FROM deals ORDER BY ticket"):
            row = json.loads(data)
            yield {name: row[name] for name in DUMP_FIELDS}
    finally:
        db.close()
