"""Wire models: what the RPM sends and what the worker confirms."""

from schemas.confirmation import SCHEMA_NAME, ExecutionConfirmation
from schemas.enums import DecisionStatus, Direction, ExecutionStatus, RejectionReason
from schemas.identity import comment_token_for, execution_id_for
from schemas.request import ExecutionRequest, InvalidMessage, MessageProperties, parse_request
from schemas.rpm import ApprovedTrade, PortfolioState, RejectedTrade, RPMOutput, TradeDecision

__all__ = [
    "SCHEMA_NAME",
    "ApprovedTrade",
    "DecisionStatus",
    "Direction",
    "ExecutionConfirmation",
    "ExecutionRequest",
    "ExecutionStatus",
    "InvalidMessage",
    "MessageProperties",
    "PortfolioState",
    "RPMOutput",
    "RejectedTrade",
    "RejectionReason",
    "TradeDecision",
    "comment_token_for",
    "execution_id_for",
    "parse_request",
]
