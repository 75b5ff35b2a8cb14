#!/usr/bin/env bash
# Validates the deployment files and, as far as this machine allows, builds and runs them:
#
#   1. static: docker-compose.yml / overrides render (`docker compose config` or
#      `docker-compose config`), the Kubernetes kustomization renders (`kubectl kustomize`);
#   2. image: a Python base image from Debian (debootstrap bookworm, `docker import`) when no
#      registry is reachable, a wheelhouse built on the host, the worker image built FROM it
#      with deploy/Dockerfile, then smoke checks inside it (--help of every subcommand, the
#      version, non-root user, no compiler);
#   3. stack: rabbitmq, postgres, sim-terminal, the roles/migrate one-shots and two workers
#      with local images under compose, the workers must turn healthy and published samples
#      must be confirmed; the worker role (deploy/sql/roles.sql) must be refused ALTER and
#      DISABLE TRIGGER; stopping the workers right after a publish must leave nothing in
#      flight; then everything is torn down (containers, volumes, network).
#
# Whatever cannot run here is reported at the end under "NOT EXERCISED", and only steps that
# ran count. Exit status: 0 when every step that ran passed, 1 otherwise.
#
# Environment (all optional):
#   BASE_IMAGE       base of the worker image (default local/python:3.11, built if missing)
#   WORKER_IMAGE     tag of the worker image (default local/execution-worker:check)
#   RABBITMQ_IMAGE   default local/rabbitmq:3.10   (built by deploy/images/build-local.sh)
#   POSTGRES_IMAGE   default local/postgres:15     (built by deploy/images/build-local.sh)
#   DEBIAN_MIRROR    mirror for debootstrap (default: from /etc/apt, else deb.debian.org)
#   CHECK_SKIP_STACK=1   stop after the image checks
#   CHECK_BUILD_SERVICES=0  do not run deploy/images/build-local.sh for missing images
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BASE_IMAGE=${BASE_IMAGE:-local/python:3.11}
WORKER_IMAGE=${WORKER_IMAGE:-local/execution-worker:check}
RABBITMQ_IMAGE=${RABBITMQ_IMAGE:-local/rabbitmq:3.10}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-local/postgres:15}
BUILD_DIR=${BUILD_DIR:-/var/tmp/ew-python-base}
PROJECT=ewcheck$$
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

NOT_EXERCISED=()
FAILED=()
STARTED=$(date +%s)

say() { echo "check-deploy: $*" >&2; }
not_exercised() { NOT_EXERCISED+=("$*"); say "NOT EXERCISED: $*"; }
fail() { FAILED+=("$*"); say "FAILED: $*"; }
have() { command -v "$1" >/dev/null 2>&1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# Runs one named step and prints its duration.
step() {
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  say "--- $name"
  set +e
  ("$@")
  rc=$?
  set -e
  say "--- $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $(($(date +%s) - t0)) s"
  [ $rc -eq 0 ] || FAILED+=("$name")
  return 0
}

# --- 1. static validation -------------------------------------------------------------------

COMPOSE=()
find_compose() {
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif have docker-compose; then
    COMPOSE=(docker-compose)
  fi
}

install_compose() {
  # Debian's docker-compose (1.29, Compose Specification files) when no compose is present.
  [ ${#COMPOSE[@]} -gt 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && have apt-get; then
    say "installing Debian's docker-compose"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null 2>&1 ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; } ||
      true
  fi
  find_compose
}

compose_config() {
  local env_file=$1
  shift
  "${COMPOSE[@]}" --env-file "$env_file" "$@" config -q
}

# The example env files leave secrets empty on purpose (compose refuses to start without
# them): fill them with throw-away values for rendering.
filled_env() {
  local out
  out=$(mktemp)
  sed -E 's/^(RABBITMQ_PASSWORD|POSTGRES_PASSWORD|POSTGRES_OWNER_PASSWORD|POSTGRES_WORKER_PASSWORD|MT5_BRIDGE_SECRET|GRAFANA_ADMIN_PASSWORD|RABBITMQ_ERLANG_COOKIE|POSTGRES_REPLICATION_PASSWORD)=$/\1=render-only/' \
    "$1" >"$out"
  echo "$out"
}

static_compose() {
  local env_file
  env_file=$(filled_env .env.example)
  if compose_config .env.example -f docker-compose.yml 2>/dev/null; then
    say "docker-compose.yml rendered with empty secrets: it must refuse"
    return 1
  fi
  say "docker-compose.yml refuses to render without the secrets"
  compose_config "$env_file" -f docker-compose.yml
  say "docker-compose.yml renders with .env.example and secrets"
  compose_config "$env_file" -f docker-compose.yml -f deploy/compose/local-images.yml
  say "docker-compose.yml + deploy/compose/local-images.yml render"
  compose_config "$env_file" --profile ha -f docker-compose.yml -f deploy/compose/ha.yml
  say "docker-compose.yml + deploy/compose/ha.yml (profile ha) render"
  rm -f "$env_file"
  env_file=$(filled_env deploy/compose/production.env.example)
  compose_config "$env_file" -f deploy/compose/production.yml
  say "deploy/compose/production.yml renders with its example env"
  rm -f "$env_file"
}

static_kustomize() {
  local dir
  for dir in deploy/k8s deploy/k8s/migrate deploy/k8s/overlays/production deploy/k8s/overlays/production/migrate deploy/k8s/overlays/ha; do
    kubectl kustomize "$dir" >/dev/null
    say "$dir renders with kubectl kustomize ($(kubectl kustomize "$dir" | grep -c '^kind:') objects)"
  done
}

# Every rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate, strict,
# 1.31: unhealthyPodEvictionPolicy is GA there), and KEDA's objects against the CRDs' own
# schemas when KEDA_CRD_DIR points at KEDA's config/crd/bases (keda.sh_*.yaml).
KEDA_CHECK='
import glob, os, sys, yaml, jsonschema
schemas = {}
for path in glob.glob(os.path.join(os.environ["KEDA_CRD_DIR"], "*.yaml")):
    crd = yaml.safe_load(open(path))
    for version in crd["spec"]["versions"]:
        schemas[(crd["spec"]["names"]["kind"], version["name"])] = version["schema"]["openAPIV3Schema"]
checked = 0
for doc in yaml.safe_load_all(sys.stdin):
    if doc and doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, schemas[(doc["kind"], doc["apiVersion"].split("/")[1])])
        checked += 1
print(checked)
'
static_schemas() {
  local dir out
  if ! "$PY" -c 'import kubernetes_validate' 2>/dev/null; then
    "$PY" -m pip install -q kubernetes-validate >/dev/null 2>&1 || { say "cannot install kubernetes-validate"; return 1; }
  fi
  out=$(mktemp)
  # the HA overlay's RabbitmqCluster and CloudNativePG Cluster are custom resources too:
  # tests/unit/test_deploy_ha.py checks their fields (their CRDs are not at hand offline)
  for dir in deploy/k8s deploy/k8s/migrate deploy/k8s/overlays/production deploy/k8s/overlays/ha; do
    kubectl kustomize "$dir" >"$out"
    "$PY" -m kubernetes_validate --strict --quiet -k 1.31.0 "$out" deploy/k8s/base/hpa.yaml |
      grep -v "Couldn't find schema for kind \(ScaledObject\|TriggerAuthentication\|RabbitmqCluster\|Cluster\)" && { rm -f "$out"; return 1; }
    if [ -n "${KEDA_CRD_DIR:-}" ]; then
      say "$dir: $(KEDA_CRD_DIR=$KEDA_CRD_DIR "$PY" -c "$KEDA_CHECK" <"$out") KEDA object(s) match KEDA's CRD schemas"
    fi
  done
  rm -f "$out"
  say "the rendered manifests match the Kubernetes 1.31 schemas (strict)"
}

# --- 2. images --------------------------------------------------------------------------------

find_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  local mirror=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
  fi
  echo "${mirror:-http://deb.debian.org/debian}"
}

# Debian bookworm's python3 is 3.11: a registry-free stand-in for python:3.11-slim.
build_base_image() {
  if image_exists "$BASE_IMAGE"; then
    say "$BASE_IMAGE already present"
    return 0
  fi
  if [ "$BASE_IMAGE" != "local/python:3.11" ]; then
    say "$BASE_IMAGE is missing and is not the one this script builds"
    return 1
  fi
  have debootstrap || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq debootstrap >/dev/null; }
  local root=$BUILD_DIR/rootfs mirror
  mirror=$(find_mirror)
  say "debootstrap bookworm from $mirror into $root"
  rm -rf "$root"
  mkdir -p "$root"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    bookworm "$root" "$mirror" >"$BUILD_DIR/debootstrap.log" 2>&1 ||
    { tail -20 "$BUILD_DIR/debootstrap.log" >&2; return 1; }
  chroot "$root" apt-get clean
  rm -rf "$root/var/lib/apt/lists/"* "$root/usr/share/doc/"* "$root/usr/share/man/"* \
    "$root/var/cache/debconf/"*-old
  tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  say "built $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
}

# Wheels for every dependency (Linux, this Python) plus the build backend, so that the image
# build needs no index at all (--build-arg PIP_NO_INDEX=1).
build_wheelhouse() {
  rm -f deploy/wheelhouse/*.whl
  "$PY" -m pip wheel -q --wheel-dir deploy/wheelhouse . "setuptools>=68" wheel \
    >/tmp/check-deploy-wheel.log 2>&1 || { tail -20 /tmp/check-deploy-wheel.log >&2; return 1; }
  # the image builds the project itself from the sources; keep only dependencies here
  rm -f deploy/wheelhouse/mt5_execution_worker-*.whl
  say "wheelhouse: $(ls deploy/wheelhouse/*.whl | wc -l) wheels"
}

build_worker_image() {
  docker build -q -f deploy/Dockerfile \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 \
    -t "$WORKER_IMAGE" . >/dev/null
  say "built $WORKER_IMAGE ($(docker image inspect -f '{{.Size}}' "$WORKER_IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
}

smoke_image() {
  local out sub uid
  out=$(docker run --rm "$WORKER_IMAGE" --help)
  grep -q "bridge-serve" <<<"$out" || { say "--help lists no bridge-serve"; return 1; }
  for sub in run demo publish migrate reconcile sim-terminal bridge-serve schema-export bench trail; do
    docker run --rm "$WORKER_IMAGE" "$sub" --help >/dev/null || { say "$sub --help failed"; return 1; }
  done
  say "execution-worker --help and every subcommand's --help work"
  out=$(docker run --rm --entrypoint python "$WORKER_IMAGE" -c \
    'import importlib.metadata as m; print(m.version("mt5-execution-worker"))')
  say "installed version: $out"
  [ -n "$out" ] || return 1
  uid=$(docker run --rm --entrypoint id "$WORKER_IMAGE" -u)
  [ "$uid" != 0 ] || { say "image runs as root"; return 1; }
  say "runs as uid $uid"
  if docker run --rm --entrypoint sh "$WORKER_IMAGE" -c 'command -v gcc || command -v cc'; then
    say "a compiler is present in the final image"
    return 1
  fi
  [ "$(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$WORKER_IMAGE")" != null ] ||
    { say "image has no HEALTHCHECK"; return 1; }
  say "no compiler in the final image; HEALTHCHECK present"
}

# --- 3. stack -------------------------------------------------------------------------------

STACK_ENV=""
stack_files() { echo -f docker-compose.yml -f deploy/compose/local-images.yml; }
dc() {
  # shellcheck disable=SC2046
  "${COMPOSE[@]}" -p "$PROJECT" --env-file "$STACK_ENV" $(stack_files) "$@"
}

write_stack_env() {
  STACK_ENV=$(mktemp)
  local secret
  secret=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
  # Host ports below the ephemeral range, away from the machine's own RabbitMQ/PostgreSQL;
  # fresh throw-away secrets.
  sed -e "s|^WORKER_IMAGE=.*|WORKER_IMAGE=$WORKER_IMAGE|" \
    -e "s|^RABBITMQ_IMAGE=.*|RABBITMQ_IMAGE=$RABBITMQ_IMAGE|" \
    -e "s|^POSTGRES_IMAGE=.*|POSTGRES_IMAGE=$POSTGRES_IMAGE|" \
    -e "s|^POSTGRES_PASSWORD=.*|POSTGRES_PASSWORD=pg$secret|" \
    -e "s|^POSTGRES_OWNER_PASSWORD=.*|POSTGRES_OWNER_PASSWORD=po$secret|" \
    -e "s|^POSTGRES_WORKER_PASSWORD=.*|POSTGRES_WORKER_PASSWORD=pw$secret|" \
    -e "s|^RABBITMQ_PASSWORD=.*|RABBITMQ_PASSWORD=mq$secret|" \
    -e "s|^MT5_BRIDGE_SECRET=.*|MT5_BRIDGE_SECRET=br$secret|" \
    -e "s|^GRAFANA_ADMIN_PASSWORD=.*|GRAFANA_ADMIN_PASSWORD=gf$secret|" \
    -e "s|^RABBITMQ_ERLANG_COOKIE=.*|RABBITMQ_ERLANG_COOKIE=ck$secret|" \
    -e "s|^POSTGRES_REPLICATION_PASSWORD=.*|POSTGRES_REPLICATION_PASSWORD=pr$secret|" \
    -e "s|^RABBITMQ_PORT=.*|RABBITMQ_PORT=25673|" \
    -e "s|^RABBITMQ_MANAGEMENT_PORT=.*|RABBITMQ_MANAGEMENT_PORT=25674|" \
    -e "s|^POSTGRES_PORT=.*|POSTGRES_PORT=25433|" \
    -e "s|^WORKER_1_METRICS_PORT=.*|WORKER_1_METRICS_PORT=29108|" \
    -e "s|^WORKER_2_METRICS_PORT=.*|WORKER_2_METRICS_PORT=29109|" \
    .env.example >"$STACK_ENV"
}

wait_healthy() {
  local service=$1 limit=$2 id status=""
  id=$(dc ps -q "$service")
  [ -n "$id" ] || { say "$service has no container"; return 1; }
  for _ in $(seq 1 "$limit"); do
    status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null || echo gone)
    [ "$status" = healthy ] && { say "$service is healthy"; return 0; }
    case $status in exited | dead | gone) break ;; esac
    sleep 2
  done
  say "$service is $status"
  docker logs --tail 30 "$id" >&2 || true
  return 1
}

# Binds a queue to execution.confirmations, publishes samples through the worker image and
# waits (bounded) until each one's confirmation arrives.
CONFIRM_SCRIPT='
import json, os, subprocess, sys, time
import pika
n = int(sys.argv[1])
conn = pika.BlockingConnection(pika.URLParameters(os.environ["RABBITMQ_URL"]))
ch = conn.channel()
ch.exchange_declare("execution.confirmations", exchange_type="topic", durable=True, passive=True)
q = ch.queue_declare("", exclusive=True).method.queue
ch.queue_bind(q, "execution.confirmations", routing_key="confirmation.#")
subprocess.run(["execution-worker", "publish", "--samples", str(n)], check=True)
seen = {}
deadline = time.monotonic() + 90
while len(seen) < n and time.monotonic() < deadline:
    method, props, body = ch.basic_get(q, auto_ack=True)
    if method is None:
        conn.sleep(0.5)
        continue
    doc = json.loads(body)
    seen[props.message_id] = method.routing_key
    print(method.routing_key, props.message_id, doc.get("status"), flush=True)
print(f"{len(seen)}/{n} confirmations", flush=True)
sys.exit(0 if len(seen) >= n else 1)
'

stack_up() {
  if ! dc up -d rabbitmq postgres sim-terminal worker-1 worker-2; then
    local service
    for service in rabbitmq postgres sim-terminal db-roles migrate db-grants worker-1 worker-2; do
      say "logs of $service:"
      dc logs --no-color --tail 15 "$service" >&2 || true
    done
    return 1
  fi
  wait_healthy rabbitmq 90 && wait_healthy postgres 60 && wait_healthy sim-terminal 60 &&
    wait_healthy worker-1 90 && wait_healthy worker-2 60
}

stack_confirm() {
  local out deals
  dc run --rm --no-deps --entrypoint python worker-1 -c "$CONFIRM_SCRIPT" 5
  # the simulated broker holds the deals (the documented --dump, on the live state file)
  out=$(dc exec -T sim-terminal execution-worker sim-terminal --state /data/sim.db --dump)
  deals=$(grep -c '"ticket"' <<<"$out" || true)
  say "sim-terminal --dump: $deals deals"
  [ "$deals" -ge 5 ] || return 1
}

# The workers log in as execution_worker (deploy/sql/roles.sql): it must not be able to
# change the schema or switch the append-only trigger off. Each statement must be refused.
stack_privileges() {
  local password statement out
  password=$(sed -n 's/^POSTGRES_WORKER_PASSWORD=//p' "$STACK_ENV")
  for statement in \
    "ALTER TABLE execution.executions ADD COLUMN evil int" \
    "ALTER TABLE execution.execution_events DISABLE TRIGGER ALL" \
    "ALTER TABLE execution.execution_events DISABLE TRIGGER execution_events_append_only" \
    "DELETE FROM execution.execution_events"; do
    if out=$(dc exec -T -e PGPASSWORD="$password" postgres \
      psql -X -q -h 127.0.0.1 -U execution_worker -d execution -v ON_ERROR_STOP=1 -c "$statement" 2>&1); then
      say "the worker role was allowed: $statement"
      return 1
    fi
    grep -qiE 'permission denied|must be owner|append-only' <<<"$out" ||
      { say "unexpected error for '$statement': $out"; return 1; }
  done
  say "the worker role cannot ALTER, DISABLE TRIGGER or delete audit events"
}

# A rollout with orders in flight: stopping the workers (SIGTERM, then compose's
# stop_grace_period) right after a publish must drain them: nothing left in flight for
# recovery, no drain timeout. (tests/integration/test_drain_process.py does the same with a
# deliberately slow order_send.)
stack_drain() {
  local timeouts after
  dc run --rm --no-deps --entrypoint execution-worker worker-1 publish --samples 3 >/dev/null
  dc stop -t 130 worker-1 worker-2
  after=$(dc exec -T -e PGPASSWORD="$(sed -n 's/^POSTGRES_WORKER_PASSWORD=//p' "$STACK_ENV")" postgres \
    psql -X -qAt -h 127.0.0.1 -U execution_worker -d execution -c \
    "SELECT count(*) FROM execution.executions WHERE state IN ('RECEIVED','VALIDATED','SUBMITTING','SUBMITTED')")
  timeouts=$(dc logs --no-color worker-1 worker-2 2>&1 | grep -c 'drain timeout' || true)
  say "after the stop: $after execution(s) in flight, $timeouts drain timeout(s)"
  [ "$after" = 0 ] && [ "$timeouts" = 0 ]
}

stack_down() {
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  rm -f "$STACK_ENV"
}

# --- main -------------------------------------------------------------------------------------

main() {

  find_compose
  engine=no
  if docker info >/dev/null 2>&1; then engine=yes; fi
  install_compose

  if [ ${#COMPOSE[@]} -gt 0 ]; then
    say "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
    step "compose config" static_compose
  else
    not_exercised "compose files were not rendered: neither 'docker compose' nor docker-compose is installed"
  fi
  if have kubectl; then
    step "kustomize" static_kustomize
    step "kubernetes schemas" static_schemas
    [ -n "${KEDA_CRD_DIR:-}" ] ||
      not_exercised "KEDA's ScaledObject/TriggerAuthentication against KEDA's CRD schemas (set KEDA_CRD_DIR to KEDA's config/crd/bases)"
  else
    not_exercised "kubectl kustomize deploy/k8s (no kubectl); tests/unit/test_deploy.py checks structure"
  fi

  if [ $engine = no ]; then
    not_exercised "image build, image smoke checks and the compose stack: no Docker engine answers (run deploy/images/build-local.sh to install and start one)"
  else
    step "base image $BASE_IMAGE" build_base_image
    step "wheelhouse" build_wheelhouse
    if [ ${#FAILED[@]} -eq 0 ]; then
      step "worker image" build_worker_image
    fi
    if image_exists "$WORKER_IMAGE"; then
      step "image smoke checks" smoke_image
    else
      not_exercised "image smoke checks: the worker image was not built"
    fi

    if [ "${CHECK_SKIP_STACK:-0}" = 1 ]; then
      not_exercised "compose stack (CHECK_SKIP_STACK=1)"
    elif [ ${#COMPOSE[@]} -eq 0 ]; then
      not_exercised "compose stack: no compose implementation"
    elif ! image_exists "$WORKER_IMAGE"; then
      not_exercised "compose stack: no worker image"
    else
      if { ! image_exists "$RABBITMQ_IMAGE" || ! image_exists "$POSTGRES_IMAGE"; } &&
        [ "${CHECK_BUILD_SERVICES:-1}" = 1 ] && [ -f deploy/images/build-local.sh ]; then
        step "service images" env RABBITMQ_IMAGE="$RABBITMQ_IMAGE" POSTGRES_IMAGE="$POSTGRES_IMAGE" \
          bash deploy/images/build-local.sh
      fi
      if image_exists "$RABBITMQ_IMAGE" && image_exists "$POSTGRES_IMAGE"; then
        write_stack_env
        trap stack_down EXIT
        step "stack up and healthy" stack_up
        if [ ${#FAILED[@]} -eq 0 ]; then
          step "samples published and confirmed" stack_confirm
          step "worker role least privilege" stack_privileges
          step "stop drains in-flight orders" stack_drain
        else
          not_exercised "publish and confirm: the stack did not become healthy"
        fi
        stack_down
        trap - EXIT
        say "stack torn down"
      else
        not_exercised "compose stack: $RABBITMQ_IMAGE or $POSTGRES_IMAGE is missing"
      fi
      not_exercised "prometheus and grafana containers (their images come from a registry; compose config validates them)"
    fi
  fi

  say "=== summary after $(($(date +%s) - STARTED)) s"
  for item in "${NOT_EXERCISED[@]}"; do say "not exercised: $item"; done
  if [ ${#FAILED[@]} -gt 0 ]; then
    for item in "${FAILED[@]}"; do say "failed: $item"; done
    exit 1
  fi
  say "every step that ran passed"
}

# deploy/check-ha.sh sources this file for its functions
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main
fi
