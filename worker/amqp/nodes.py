"""The RabbitMQ nodes ``RABBITMQ_URL`` names, and the order the worker tries them in.

A cluster is named by comma-separated AMQP URLs, one per node::

    amqp://user:pass@rmq-0:5672/%2F,amqp://user:pass@rmq-1:5672/%2F,amqp://user:pass@rmq-2:5672/%2F

pika has no multi-host URL: its documented way to name several brokers is a sequence of
connection parameters, tried in order (``BlockingConnection(parameters=[...])``,
``SelectConnection.create_connection(connection_configs)``; pika docs, "Connection
Parameters" and the ``create_connection`` docstring). Each comma-separated part is one
``pika.URLParameters``. The short form ``amqp://user:pass@rmq-0:5672,rmq-1,rmq-2/%2F``
(several hosts in one authority, as libpq writes them) is accepted too: every host gets the
first URL's credentials, virtual host and query, and a host without a port the first one's.

The worker shuffles the nodes once (so that workers spread over the cluster) and keeps one
connection at a time: :class:`NodeRotation` gives the node to try, and moves to the next
one after a failed attempt or a lost connection, so that a dead node is not retried first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pika


@dataclass(frozen=True)
class Node:
    url: str  # one node's URL (holds the password: never log it, log ``name``)
    name: str  # host:port, safe to show

    def parameters(self) -> pika.URLParameters:
        return pika.URLParameters(self.url)


def _name(url: str) -> str:
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    return f"{parts.hostname or 'localhost'}:{parts.port or default}"


def _expand(url: str) -> list[str]:
    """One URL whose authority may hold several hosts -> one URL per host."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return [url]
    names = [host.strip() for host in hosts.split(",") if host.strip()]
    first_port = names[0].rpartition(":")[2] if ":" in names[0] else ""
    urls = []
    for host in names:
        if ":" not in host and first_port:
            host = f"{host}:{first_port}"
        urls.append(urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}")))
    return urls


def split_nodes(url: str) -> list[str]:
    """Every node's URL, in the order written (ValueError if none)."""
    urls: list[str] = []
    pending = ""
    for piece in url.split(","):
        piece = piece.strip()
        if not piece:
            continue
        if "://" in piece or not pending:
            if pending:
                urls += _expand(pending)
            pending = piece
        else:  # a host of the short form: amqp://u:p@a:5672,b,c/%2F
            pending = f"{pending},{piece}"
    if pending:
        urls += _expand(pending)
    if not urls:
        raise ValueError("RABBITMQ_URL names no node")
    return urls


def nodes(url: str) -> list[Node]:
    return [Node(one, _name(one)) for one in split_nodes(url)]


def connection_parameters(url: str, *, shuffle: bool = False) -> list[pika.URLParameters]:
    """pika parameters for every node (tools: ``BlockingConnection(parameters=[...])``)."""
    found = nodes(url)
    if shuffle:
        random.shuffle(found)
    return [node.parameters() for node in found]


class NodeRotation:
    """The nodes in a shuffled order; :meth:`advance` after a failure moves to the next."""

    def __init__(self, url: str, *, rng: random.Random | None = None) -> None:
        self.nodes = nodes(url)
        (rng or random.Random()).shuffle(self.nodes)
        self._index = 0
        self._failed_in_round = 0

    @property
    def current(self) -> Node:
        return self.nodes[self._index]

    def advance(self) -> bool:
        """Move to the next node; True when every node failed since the last success (the
        caller backs off before starting the round again)."""
        self._index = (self._index + 1) % len(self.nodes)
        self._failed_in_round += 1
        if self._failed_in_round >= len(self.nodes):
            self._failed_in_round = 0
            return True
        return False

    def connected(self) -> None:
        self._failed_in_round = 0
