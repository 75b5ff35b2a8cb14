"""``execution-worker bench``: the worker against a floor consumer, in one run.

Needs the ``bench`` extra (psutil): ``pip install 'mt5-execution-worker[bench]'``.
"""
