"""Everything MetaTrader 5: the module-shaped interface, its backends, gateway and pool."""
