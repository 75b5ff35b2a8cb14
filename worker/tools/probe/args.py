"""Arguments of ``execution-worker probe`` (registered by worker/cli.py)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--account",
        metavar="ALIAS",
        help="the account to probe: its name in MT5_SESSIONS (or a session id); "
        "optional with one account",
    )
    parser.add_argument(
        "--symbols",
        help="canonical (RPM) names to map and read, comma-separated "
        "(default EURUSD,GBPUSD,USDJPY,XAUUSD and the [symbol_map] names)",
    )
    parser.add_argument("--out", required=True, metavar="PROFILE.toml", help="profile to write")
    parser.add_argument(
        "--round-trips",
        type=int,
        default=10,
        help="open/close round trips of the minimum volume (default 10; 0: like --reads-only)",
    )
    parser.add_argument("--trade-symbol", help="trade this symbol (default: the first open one)")
    parser.add_argument("--reads-only", action="store_true", help="read, never trade")
    parser.add_argument(
        "--allow-real",
        action="store_true",
        help="allow round trips on a REAL account (asks for the account number, typed)",
    )
    parser.add_argument(
        "--wait-seconds",
        type=float,
        default=10.0,
        help="how long to wait for a deal or a position to show (default 10)",
    )
