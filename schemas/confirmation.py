"""``ExecutionConfirmation`` v1: what the worker publishes for every approval it handles."""

from __future__ import annotations

from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from schemas.enums import ExecutionStatus, RejectionReason
from schemas.rpm import UtcDatetime

SCHEMA_NAME = "execution.confirmation.v1"
SCHEMA_VERSION = "1"
UNKNOWN_SYMBOL_ROUTING_WORD = "UNKNOWN"


class ExecutionConfirmation(BaseModel):
    """One approval's outcome. Serialised once, stored in the outbox, republished byte for byte."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    schema_version: str = SCHEMA_VERSION
    execution_id: UUID
    order_id: str | None = Field(default=None, description="the RPM's decision id")
    idempotency_key: str
    status: ExecutionStatus
    rejection_reason: RejectionReason | None = None
    rejection_details: str | None = None
    symbol: str | None = Field(default=None, description="canonical (RPM) symbol")
    broker_symbol: str | None = Field(default=None, description="the session's symbol name")
    direction: int | None = None
    intended_units: float | None = None
    executed_units: float = 0.0
    intended_lots: float | None = None
    executed_lots: float = 0.0
    requested_price: float | None = None
    fill_price: float | None = Field(default=None, description="volume-weighted over deals")
    spread_pips_at_submit: float | None = None
    slippage_pips: float | None = Field(default=None, description="signed, positive = adverse")
    broker_order: int | None = None
    broker_deals: list[int] = Field(default_factory=list)
    broker_position: int | None = None
    retcode: int | None = Field(default=None, description="last MT5 retcode")
    broker_comment: str | None = None
    attempts: int = 0
    session_id: str | None = None
    account_login: int | None = None
    account: str | None = Field(
        default=None,
        description="the account executed on (alias or '<server>:<login>'); on a refusal,"
        " the account the approval named",
    )
    timings_ms: dict[str, float] = Field(default_factory=dict)
    received_at: UtcDatetime
    submitted_at: UtcDatetime | None = None
    completed_at: UtcDatetime
    version: int = Field(
        default=1,
        ge=1,
        description="1 for the first answer; a corrected confirmation of the same execution_id"
        " carries the next version (its message_id is '<execution_id>:v<version>')",
    )
    provisional: bool = Field(
        default=False,
        description="true: the broker's outcome is unknown (status FAILED/REJECTED with"
        " UNKNOWN_OUTCOME or the given reason); the worker keeps reconciling and publishes a"
        " corrected version if a fill appears, or a final one when its window ends",
    )
    correction: str | None = Field(
        default=None, description="what changed from the previous version (version > 1)"
    )

    def routing_key(self) -> str:
        """``confirmation.<status>.<SYMBOL>`` on the ``execution.confirmations`` exchange."""
        symbol = self.symbol or UNKNOWN_SYMBOL_ROUTING_WORD
        return f"confirmation.{self.status.value.lower()}.{symbol}"

    def message_id(self) -> str:
        return message_id_for(self.execution_id, self.version)

    def to_json_bytes(self) -> bytes:
        """Stable JSON (field order as declared), UTF-8: ``model_dump_json()``'s text, as
        the serializer's bytes (without the round trip through ``str``)."""
        return self.__pydantic_serializer__.to_json(self)


def message_id_for(execution_id: UUID, version: int = 1) -> str:
    """Deterministic per version: the first answer keeps the bare execution id (as before
    versions existed); a correction is ``<execution_id>:v<version>``."""
    return str(execution_id) if version <= 1 else f"{execution_id}:v{version}"
