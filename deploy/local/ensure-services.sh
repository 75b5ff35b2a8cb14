#!/usr/bin/env bash
# Makes sure the local RabbitMQ and PostgreSQL the demo and the tests use are up
# (they are pre-started on the development machines; this restarts one that stopped).
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5672; then
  echo "ensure-services: starting RabbitMQ" >&2
  rabbitmq-server -detached
fi
if ! port_open 5432; then
  echo "ensure-services: starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
for _ in $(seq 1 60); do
  if port_open 5672 && port_open 5432; then exit 0; fi
  sleep 1
done
echo "ensure-services: RabbitMQ (5672) or PostgreSQL (5432) did not come up" >&2
exit 1
