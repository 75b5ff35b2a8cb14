#!/bin/sh
# A node of deploy/compose/ha.yml: writes the cluster's shared Erlang cookie
# (RABBITMQ_ERLANG_COOKIE) to the node's cookie file, then runs the server.
# Nodes authenticate to each other with the cookie; RabbitMQ 3.9+ servers and images no
# longer take it from the environment (RabbitMQ docs, "Clustering Guide", "How CLI Tools
# Authenticate to Nodes (and Nodes to Each Other): the Erlang Cookie").
set -eu
cookie="${HOME:-/var/lib/rabbitmq}/.erlang.cookie"
# (an image may bring a cookie of its own: Debian's package makes one at install)
if [ ! -f "$cookie" ] || [ "$(cat "$cookie")" != "$RABBITMQ_ERLANG_COOKIE" ]; then
  rm -f "$cookie"
  (umask 077 && printf %s "$RABBITMQ_ERLANG_COOKIE" >"$cookie")
  chmod 400 "$cookie"
  [ "$(id -u)" != 0 ] || chown rabbitmq:rabbitmq "$cookie"
fi
unset RABBITMQ_ERLANG_COOKIE
# the official image drops to the rabbitmq user in its entrypoint; Debian's package (the
# registry-free local/rabbitmq image, already that user) runs its server script directly
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
  exec docker-entrypoint.sh rabbitmq-server
fi
exec /usr/lib/rabbitmq/bin/rabbitmq-server
