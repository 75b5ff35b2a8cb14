#!/usr/bin/env bash
# The HA drill (docs/OPERATIONS.md 5.2): the compose HA profile (deploy/compose/ha.yml: 3
# RabbitMQ nodes, a PostgreSQL primary with a synchronous standby, two workers, the
# simulated terminal) on the registry-free local images, under steady demo traffic
# (deploy/compose/ha/drill.py). A third of the way in, the RabbitMQ node under worker-1 is
# stopped; two thirds in, the PostgreSQL primary is stopped and the standby promoted, as
# on-call would. Passes when every approval has a final confirmation, each execution one
# order on the broker's books, and the new primary one terminal row per approval. Prints
# how long the confirmations stopped after each failure.
#
#   bash deploy/check-ha.sh        (root, or a user of the docker group; ~5 minutes)
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
    --count "$COUNT" --rate "$RATE" --out /out)
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
  "$PY" - "$OUT" "$t_rabbitmq" "$t_postgres" "$stopped_node" <<'PY'
import json, pathlib, sys, uuid
from collections import Counter, defaultdict
from schemas.identity import order_magic_for
from worker.config import Settings

out, t_rabbitmq, t_postgres, node = pathlib.Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
published = set(json.loads((out / "published.json").read_text()))
copies = [json.loads(line) for line in (out / "confirmations.jsonl").open()]
finals: dict[str, dict[str, dict]] = defaultdict(dict)  # order id -> message id -> confirmation
for c in copies:
    if not c["provisional"] and c["order_id"] in published:
        finals[c["order_id"]][c["message_id"]] = c
missing = published - set(finals)
# one final answer per approval: copies of one message (same message_id) are allowed
conflicting = [o for o, answers in finals.items() if len({(a["execution_id"], a["status"]) for a in answers.values()}) > 1]
final = {o: max(answers.values(), key=lambda a: a["version"] or 0) for o, answers in finals.items()}
statuses = Counter(a["status"] for a in final.values())
reasons = Counter(a["rejection_reason"] for a in final.values() if a["rejection_reason"])
magic = Settings().magic
book: dict[int, set[int]] = defaultdict(set)  # magic -> orders
order_of_deal = {}
for line in (out / "deals.jsonl").open():
    deal = json.loads(line)
    book[deal["magic"]].add(deal["order"])
    order_of_deal[deal["ticket"]] = deal["order"]
extra = 0  # orders on the books that the approval's final confirmation does not account for
for a in final.values():
    named = {order_of_deal.get(d) for d in a["broker_deals"]}
    extra += len(book.get(order_magic_for(uuid.UUID(a["execution_id"]), magic), set()) - named)
magics = {order_magic_for(uuid.UUID(a["execution_id"]), magic) for a in final.values()}
foreign = sum(len(orders) for m, orders in book.items() if m not in magics)
rows = dict(line.split("|") for line in (out / "rows.txt").read_text().split())
unrowed = [a for a in final.values() if a["execution_id"] not in rows]
times = sorted(c["t"] for c in copies)
def resume(t0: float) -> str:
    """The first confirmation after t0, and the longest pause in the 30 s after it (a
    confirmation in flight at t0, or one from the worker not hit, may come at once)."""
    after = [t for t in times if t > t0]
    if not after:
        return "never"
    window = [t0] + [t for t in after if t < t0 + 30]
    pause = max(b - a for a, b in zip(window, window[1:])) if len(window) > 1 else 0.0
    return f"first after {after[0] - t0:.1f} s, longest pause {pause:.1f} s"
print(f"check-ha: {len(published)} approvals, {len(final)} answered ({len(copies)} confirmation"
      f" copies), {dict(statuses)}, rejections {dict(reasons)}")
print(f"check-ha: broker orders {sum(len(v) for v in book.values())}; not in their approval's"
      f" confirmation {extra}, of no approval {foreign}; conflicting answers {len(conflicting)};"
      f" no row on the new primary {len(unrowed)}; unanswered {len(missing)}")
print(f"check-ha: first confirmation after stopping RabbitMQ node {node}: {resume(t_rabbitmq)};"
      f" after stopping the PostgreSQL primary: {resume(t_postgres)}")
sys.exit(1 if missing or conflicting or extra or foreign or unrowed else 0)
PY
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
