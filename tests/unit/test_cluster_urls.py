"""RABBITMQ_URL naming a cluster, and secrets masked in every node's URL (issue 27)."""

from __future__ import annotations

import random

import pytest

from worker.amqp.nodes import NodeRotation, connection_parameters, nodes, split_nodes
from worker.config import mask_url


def test_comma_separated_urls_are_one_node_each() -> None:
    url = "amqp://u:p@a:5672/%2F, amqp://u:p@b:5673/v,amqps://u:p@c/v"
    assert [n.name for n in nodes(url)] == ["a:5672", "b:5673", "c:5671"]
    assert [p.port for p in connection_parameters(url)] == [5672, 5673, 5671]


def test_several_hosts_in_one_authority_share_credentials_vhost_and_query() -> None:
    urls = split_nodes("amqp://u:p@a:5673,b,c:5674/vh?heartbeat=5")
    assert urls == [
        "amqp://u:p@a:5673/vh?heartbeat=5",
        "amqp://u:p@b:5673/vh?heartbeat=5",
        "amqp://u:p@c:5674/vh?heartbeat=5",
    ]


def test_one_url_is_one_node() -> None:
    assert split_nodes("amqp://guest:guest@127.0.0.1:5672/%2F") == [
        "amqp://guest:guest@127.0.0.1:5672/%2F"
    ]
    with pytest.raises(ValueError):
        split_nodes(" , ")


def test_rotation_moves_on_and_backs_off_after_a_whole_round() -> None:
    rotation = NodeRotation("amqp://a/,amqp://b/,amqp://c/", rng=random.Random(1))
    first = rotation.current.name
    assert sorted(n.name for n in rotation.nodes) == ["a:5672", "b:5672", "c:5672"]
    assert rotation.advance() is False and rotation.current.name != first
    assert rotation.advance() is False
    assert rotation.advance() is True  # every node failed: the caller backs off
    assert rotation.current.name == first
    rotation.advance()
    rotation.connected()  # a success starts a new round
    assert rotation.advance() is False and rotation.advance() is False


def test_shuffled_order_differs_between_workers() -> None:
    url = ",".join(f"amqp://h{i}/" for i in range(6))
    orders = {
        tuple(n.name for n in NodeRotation(url, rng=random.Random(s)).nodes) for s in range(5)
    }
    assert len(orders) > 1


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:s3cr3tpw@a:5672/%2F,amqp://u:s3cr3tpw@b:5672/%2F",
        "amqp://u:s3cr3tpw@a:5672,b,c/%2F",
        "postgresql://u:s3cr3tpw@a:5432,b:5433/db?target_session_attrs=read-write",
        "postgresql://u@a:5432,b:5433/db?password=s3cr3tpw&target_session_attrs=read-write",
    ],
)
def test_mask_url_hides_the_password_of_every_node(url: str) -> None:
    masked = mask_url(url)
    assert "s3cr3tpw" not in masked and "***" in masked
    assert "b" in masked.split("@")[-1] or "b:" in masked
