#!/bin/sh
# A three-node LiteFS cluster on this machine, each node with examples/proxy/app.py
# behind its proxy. Needs root (FUSE). Ctrl-C stops everything and unmounts.
#
#   node   HTTP API  proxy  app
#   node1  20201     8081   9001   (primary)
#   node2  20202     8082   9002
#   node3  20203     8083   9003
#
# Try:
#   curl -si -X POST --data hello 127.0.0.1:8082/items   # forwarded to node1: 201 + __txid cookie
#   curl -s 127.0.0.1:8083/items                         # served by node3
#   curl -s 127.0.0.1:8082/litefs/health
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}   # one that has litefs installed, e.g. .venv/bin/python
export ROOT=${ROOT:-/tmp/litefs-proxy-example}
PIDS=""

stop() {
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in 1 2 3; do fusermount3 -uz "$ROOT/node$n/mnt" 2>/dev/null || true; done
}
trap stop EXIT INT TERM

for n in 1 2 3; do
    mkdir -p "$ROOT/node$n"
    CANDIDATE=$([ "$n" = 1 ] && echo true || echo false) NODE=node$n \
        HTTP_PORT=2020$n PROXY_PORT=808$n APP_PORT=900$n \
        "$PYTHON" -m litefs mount -config "$HERE/litefs.yml" >"$ROOT/node$n/litefs.log" 2>&1 &
    PIDS="$PIDS $!"
done
for n in 1 2 3; do
    until mountpoint -q "$ROOT/node$n/mnt"; do sleep 0.1; done
    "$PYTHON" "$HERE/app.py" --db "$ROOT/node$n/mnt/app.db" --port 900$n --name node$n &
    PIDS="$PIDS $!"
done
echo "proxies on 127.0.0.1:8081 (primary), :8082, :8083; logs in $ROOT/node*/litefs.log"
wait
