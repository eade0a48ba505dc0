#!/bin/sh
# A device's request/reply from the shell with Mosquitto's own clients.
#   MQTT_HOST=127.0.0.1 MQTT_PORT=1883 CONVO=kiosk-7 PYTHON=.venv/bin/python sh request_reply.sh
# Replies are msgpack; a Python with msgpack installed prints them: the clone's .venv (where
# this file lies in one), else PYTHON.
set -eu
HOST="${MQTT_HOST:-127.0.0.1}" PORT="${MQTT_PORT:-1883}" PREFIX="${PREFIX:-mem}"
venv="$(dirname "$0")/../../.venv/bin/python"
[ -x "$venv" ] || venv=python3
CONVO="${CONVO:-kiosk-7}" PYTHON="${PYTHON:-$venv}"
show() { "$PYTHON" -c 'import sys, msgpack; print(msgpack.unpackb(sys.stdin.buffer.read()))'; }
pack() {  # pack JSON FILE: the request as msgpack, in a file for -f
  "$PYTHON" -c 'import sys, json, msgpack; open(sys.argv[2], "wb").write(msgpack.packb(json.loads(sys.argv[1])))' "$1" "$2"
}
req="$(mktemp)" reply="$(mktemp)"
trap 'rm -f "$req" "$reply"' EXIT
# A token unique to this run, for the request id and the reply topic: the worker stores an
# append at most once per id, so a fixed id would answer every later run with the first
# run's reply and store nothing. Keep an id for the retries of one request only.
token="sh-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

# MQTT 5: mosquitto_rr sets the Response Topic and waits for one reply (-W: seconds);
# --nodelay sets TCP_NODELAY on its socket (without it: ~44 ms per round trip).
# mosquitto_rr 2.0.11 sends an empty payload with -f or -s, so the request goes in -m: fine
# for msgpack without NUL bytes or a trailing newline (small maps of short strings).
pack "{\"role\": \"user\", \"content\": \"hello from the shell\", \"id\": \"$token\"}" "$req"
mosquitto_rr --nodelay -V 5 -h "$HOST" -p "$PORT" -q 1 -t "$PREFIX/$CONVO/append" \
  -e "reply/$CONVO/$token" -m "$(cat "$req")" -N -W 5 | show
mosquitto_rr --nodelay -V 5 -h "$HOST" -p "$PORT" -q 1 -t "$PREFIX/$CONVO/get" \
  -e "reply/$CONVO/$token" -n -N -W 5 | show

# MQTT 3.1.1: subscribe to a reply topic first, then name it in the payload's reply_to.
inbox="reply/$CONVO/$token-311"
mosquitto_sub --nodelay -V 311 -h "$HOST" -p "$PORT" -q 1 -t "$inbox" -C 1 -N -W 5 > "$reply" &
sub=$!
sleep 0.5  # mosquitto_sub says nothing once subscribed: give it time
pack "{\"last\": 1, \"reply_to\": \"$inbox\"}" "$req"
mosquitto_pub --nodelay -V 311 -h "$HOST" -p "$PORT" -q 1 -t "$PREFIX/$CONVO/get" -f "$req"
wait "$sub"
show < "$reply"
