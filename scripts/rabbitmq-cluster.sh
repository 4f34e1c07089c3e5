#!/usr/bin/env bash
# A real 3-node RabbitMQ cluster on this machine, beside the broker on 5672: nodes
# hive1@localhost, hive2@localhost, hive3@localhost on 127.0.0.1:5681-5683 (distribution
# ports 25681-25683), data, logs and their own Erlang cookie under target/rabbitmq-cluster/.
# Node 2 also has a TLS listener on 127.0.0.1:5692 (amqps) that requires a client
# certificate: a CA, the server's certificate (for 127.0.0.1), a client certificate and
# a second, unrelated CA are made with openssl in target/rabbitmq-cluster/tls/.
#
#   scripts/rabbitmq-cluster.sh start     start the three nodes and join 2 and 3 to 1
#   scripts/rabbitmq-cluster.sh stop      stop them (and remove their data)
#   scripts/rabbitmq-cluster.sh kill N    kill -9 node N (1-3)
#   scripts/rabbitmq-cluster.sh restart N start node N again (it rejoins by itself)
#   scripts/rabbitmq-cluster.sh urls      print the --amqp value for all three
#   scripts/rabbitmq-cluster.sh tls-url   print node 2's amqps:// URL (certificates in tls/)
#   scripts/rabbitmq-cluster.sh ctl N ... rabbitmqctl against node N
#
# The nodes run the Debian package's RabbitMQ binaries directly (not through the wrapper
# that switches to the rabbitmq user), as the calling user, with HOME set to the
# cluster's directory so the three nodes and rabbitmqctl share one cookie.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${RMQ_CLUSTER_DIR:-$PWD/target/rabbitmq-cluster}
BIN=/usr/lib/rabbitmq/bin

node_env() {
  local i=$1 dir=$BASE/hive$1
  echo HOME="$BASE" RABBITMQ_NODENAME="hive$i@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$((5680 + i)) RABBITMQ_DIST_PORT=$((25680 + i)) \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
}

ctl() {
  local i=$1; shift
  env HOME="$BASE" "$BIN/rabbitmqctl" -n "hive$i@localhost" "$@"
}

make_certs() {
  local t=$BASE/tls
  [ -f "$t/client.key" ] && return 0
  mkdir -p "$t"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$t/ca.key" -out "$t/ca.pem" -days 2 -subj "/CN=hive test broker CA" 2>/dev/null
  openssl req -x509 "${ec[@]}" -keyout "$t/wrong-ca.key" -out "$t/wrong-ca.pem" -days 2 -subj "/CN=another CA" 2>/dev/null
  echo "subjectAltName=IP:127.0.0.1" >"$t/server.ext"
  openssl req "${ec[@]}" -keyout "$t/server.key" -out "$t/server.csr" -subj "/CN=127.0.0.1" 2>/dev/null
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -out "$t/server.pem" -days 2 -extfile "$t/server.ext" 2>/dev/null
  openssl req "${ec[@]}" -keyout "$t/client.key" -out "$t/client.csr" -subj "/CN=hive-router" 2>/dev/null
  # X.509 v3 (an extension makes it so): rustls refuses v1 certificates.
  echo "extendedKeyUsage=clientAuth" >"$t/client.ext"
  openssl x509 -req -in "$t/client.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -out "$t/client.pem" -days 2 -extfile "$t/client.ext" 2>/dev/null
}

start_node() {
  local i=$1 dir=$BASE/hive$1
  mkdir -p "$dir/log" "$dir/mnesia"
  echo "listeners.tcp.local = 127.0.0.1:$((5680 + i))" >"$dir/rabbitmq.conf"
  if [ "$i" = 2 ]; then
    make_certs
    cat >>"$dir/rabbitmq.conf" <<CONF
listeners.ssl.local = 127.0.0.1:5692
ssl_options.cacertfile = $BASE/tls/ca.pem
ssl_options.certfile = $BASE/tls/server.pem
ssl_options.keyfile = $BASE/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
CONF
  fi
  echo "[]." >"$dir/enabled_plugins"
  echo "[]." >"$dir/advanced.config"
  env $(node_env "$i") "$BIN/rabbitmq-server" -detached >/dev/null 2>&1
  for _ in $(seq 1 60); do
    ctl "$i" await_startup --timeout 5 >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "rabbitmq node hive$i did not start (logs: $dir/log)" >&2
  return 1
}

case "${1:-}" in
  start)
    mkdir -p "$BASE"
    if [ ! -f "$BASE/.erlang.cookie" ]; then
      head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20 >"$BASE/.erlang.cookie"
      chmod 400 "$BASE/.erlang.cookie"
    fi
    for i in 1 2 3; do start_node "$i"; done
    for i in 2 3; do
      ctl "$i" stop_app >/dev/null
      ctl "$i" join_cluster hive1@localhost >/dev/null
      ctl "$i" start_app >/dev/null
    done
    ctl 1 cluster_status --formatter json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("rabbitmq cluster running:", ", ".join(sorted(s["running_nodes"])))'
    ;;
  stop)
    for i in 1 2 3; do
      if [ -f "$BASE/hive$i/pid" ]; then kill -9 "$(cat "$BASE/hive$i/pid")" 2>/dev/null || true; fi
    done
    # epmd forgets them by itself; their data goes.
    rm -rf "$BASE"
    ;;
  kill)
    kill -9 "$(cat "$BASE/hive$2/pid")"
    ;;
  restart)
    start_node "$2"
    ;;
  tls-url)
    echo "amqps://guest:guest@127.0.0.1:5692/%2f"
    ;;
  urls)
    echo "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
    ;;
  ctl)
    shift; n=$1; shift; ctl "$n" "$@"
    ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
