"""MetaTrader 5 execution worker."""

__version__ = "0.1.0"
