"""The bench's own vhost and database, made for one run and removed after it
(:mod:`worker.tools.isolation`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from worker.tools.isolation import own_database, own_vhost


@contextlib.contextmanager
def isolated_vhost(admin_url: str, given_url: str | None) -> Iterator[str]:
    """A vhost of the bench's own, or ``--vhost-url`` (an empty vhost reserved for it)."""
    if given_url:
        yield given_url
        return
    with own_vhost(admin_url, "ew_bench") as url:
        yield url


@contextlib.contextmanager
def isolated_database(admin_url: str) -> Iterator[str]:
    """A database of the bench's own, dropped at the end."""
    with own_database(admin_url, "ew_bench") as url:
        yield url
