#!/usr/bin/env bash
# The HA drill (docs/OPERATIONS.md 5.2): the compose HA profile (deploy/compose/ha.yml: 3
# RabbitMQ nodes, a PostgreSQL primary with a synchronous standby, two workers, the
# simulated terminal) on the registry-free local images, under steady demo traffic
# (deploy/compose/ha/drill.py). A third of the way in, the RabbitMQ node under worker-1 is
# stopped; two thirds in, the PostgreSQL primary is stopped and the standby promoted, as
# on-call would. Passes when every approval has one final answer, every order on the
# broker's books is named by its approval's confirmation, and every approval has its row on
# the new primary (``drill.py verify``). Prints how long the confirmations stopped after
# each failure.
#
#   bash deploy/check-ha.sh        (root, or a user of the docker group; about 2 minutes
#                                   once the images are built)
#
# Environment: HA_DRILL_COUNT (240 approvals), HA_DRILL_RATE (6 per second), and the
# images of deploy/check-deploy.sh (built here when missing).
set -euo pipefail
# shellcheck source=deploy/check-deploy.sh
source "$(dirname "$0")/check-deploy.sh"

PROJECT=ewha$$
COUNT=${HA_DRILL_COUNT:-240}
RATE=${HA_DRILL_RATE:-6}
OUT=$(mktemp -d)
DATA=/var/lib/postgresql/data
stack_files() {
  echo --profile ha -f docker-compose.yml -f deploy/compose/local-images.yml -f deploy/compose/ha.yml
}
say() { echo "check-ha: $*" >&2; }

confirmed() {
  [ -f "$OUT/confirmations.jsonl" ] || { echo 0; return; }
  "$PY" -c 'import json, sys
print(len({d["order_id"] for d in map(json.loads, open(sys.argv[1])) if not d["provisional"]}))' \
    "$OUT/confirmations.jsonl"
}

wait_confirmed() {
  local target=$1
  for _ in $(seq 1 600); do
    [ "$(confirmed)" -ge "$target" ] && return 0
    sleep 0.5
  done
  say "fewer than $target confirmations after 5 minutes"
  return 1
}

psql_on() {
  local service=$1
  shift
  dc exec -T -u postgres "$service" psql -X -qAt -U "$(sed -n 's/^POSTGRES_USER=//p' "$STACK_ENV")" \
    -d execution "$@"
}

ha_up() {
  dc up -d rabbitmq rabbitmq-2 rabbitmq-3 postgres postgres-standby sim-terminal worker-1 worker-2
  local service
  for service in rabbitmq rabbitmq-2 rabbitmq-3 postgres postgres-standby sim-terminal worker-1 worker-2; do
    wait_healthy "$service" 120
  done
  local nodes
  nodes=$(dc exec -T rabbitmq rabbitmqctl -q cluster_status --formatter json |
    "$PY" -c 'import json, sys; print(len(json.load(sys.stdin)["running_nodes"]))')
  say "RabbitMQ cluster: $nodes running nodes"
  [ "$nodes" = 3 ]
  local members
  members=$(dc exec -T rabbitmq rabbitmq-queues -q quorum_status execution.requests --formatter json |
    "$PY" -c 'import json, sys; print(len(json.load(sys.stdin)))')
  say "execution.requests: $members quorum members"
  [ "$members" = 3 ]
  local replication
  replication=$(psql_on postgres -c "SELECT application_name || ':' || sync_state FROM pg_stat_replication")
  say "PostgreSQL standby: $replication"
  [ "$replication" = standby:sync ]
}

node_of_worker_1() {
  dc exec -T worker-1 python -c 'import json, urllib.request
doc = json.load(urllib.request.urlopen("http://127.0.0.1:9108/readyz", timeout=4))
print(doc["details"]["rabbitmq"]["node"].split(":")[0])'
}

drill() {
  chmod 777 "$OUT"
  local container third stopped_node t_rabbitmq t_postgres
  container=$(dc run -d --no-deps -v "$ROOT/deploy/compose/ha/drill.py:/etc/execution-worker/drill.py:ro" \
    -v "$OUT:/out" --entrypoint python worker-1 /etc/execution-worker/drill.py \
    traffic --count "$COUNT" --rate "$RATE" --out /out)
  third=$((COUNT / 3))
  wait_confirmed "$third"
  stopped_node=$(node_of_worker_1)
  say "$(confirmed) confirmed; stopping RabbitMQ node $stopped_node (worker-1 is on it)"
  t_rabbitmq=$(date +%s.%N)
  dc stop -t 10 "$stopped_node"
  wait_confirmed $((2 * third))
  say "$(confirmed) confirmed; stopping the PostgreSQL primary, promoting the standby"
  t_postgres=$(date +%s.%N)
  dc stop -t 10 postgres
  dc exec -T -u postgres postgres-standby pg_ctl promote -w -D "$DATA"
  # the standby's copy of the primary's settings names a synchronous standby it does not
  # have: commits would wait for ever (docs/OPERATIONS.md 5.2, on-call step 2)
  say "on the new primary: synchronous_standby_names='$(psql_on postgres-standby -c 'SHOW synchronous_standby_names')'"
  psql_on postgres-standby -c "ALTER SYSTEM SET synchronous_standby_names = ''" -c "SELECT pg_reload_conf()" >/dev/null
  local rc
  rc=$(docker wait "$container")
  docker logs "$container" 2>&1 | tail -n 5 >&2
  docker rm "$container" >/dev/null
  [ "$rc" = 0 ] || { say "the drill did not see every confirmation (exit $rc)"; return 1; }
  dc exec -T sim-terminal execution-worker sim-terminal --state /data/sim.db --dump >"$OUT/deals.jsonl"
  psql_on postgres-standby -c "SELECT execution_id, state FROM execution.executions" >"$OUT/rows.txt"
  dc restart -t 10 "$stopped_node" >/dev/null 2>&1 || true
  "$PY" deploy/compose/ha/drill.py verify --out "$OUT" --node "$stopped_node" \
    --rabbitmq-stopped-at "$t_rabbitmq" --postgres-stopped-at "$t_postgres"
}

main_ha() {
  STARTED=$(date +%s)
  find_compose
  install_compose
  [ ${#COMPOSE[@]} -gt 0 ] || { say "no compose implementation"; exit 1; }
  # the engine, and the RabbitMQ and PostgreSQL images (each step skipped when done)
  bash deploy/images/build-local.sh >/dev/null
  image_exists "$BASE_IMAGE" || build_base_image
  if ! image_exists "$WORKER_IMAGE"; then
    build_wheelhouse
    build_worker_image
  fi
  write_stack_env
  trap 'stack_down; [ ${#FAILED[@]} -gt 0 ] && say "drill files kept in $OUT" || rm -rf "$OUT"' EXIT
  step "HA stack up: 3 RabbitMQ nodes, primary + synchronous standby" ha_up
  if [ ${#FAILED[@]} -eq 0 ]; then
    step "drill: $COUNT approvals, a RabbitMQ node then the primary stopped" drill
  fi
  for service in worker-1 worker-2; do
    say "worker log lines of $service about the failures:"
    dc logs --no-color "$service" 2>&1 | grep -iE 'switch|reconnect|lost|node' | tail -n 6 >&2 || true
  done
  say "=== after $(($(date +%s) - STARTED)) s"
  [ ${#FAILED[@]} -eq 0 ] || { say "failed: ${FAILED[*]}"; exit 1; }
  say "every approval confirmed, one order each"
}

main_ha
