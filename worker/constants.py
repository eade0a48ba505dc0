"""Names and defaults that the wire contract and the command line share."""

from typing import Final

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 1883
DEFAULT_PREFIX: Final = "mem"
DEFAULT_CLIENT_ID: Final = "memory-worker"
DEFAULT_MAX_TURNS: Final = 8
DEFAULT_TTL: Final = 3600.0
DEFAULT_MAX_CONVERSATIONS: Final = 500
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_PAYLOAD_BYTES: Final = 65536
# A trimmed event's turns, at most (one turn may be more): a broker drops a packet over its
# max_packet_size (1 MiB in deploy/), and a large trim (a restart with a lower --max-turns)
# goes out as several events.
TRIMMED_EVENT_BYTES: Final = 256 * 1024
DEFAULT_MAX_KEYS: Final = 256
MIN_MAX_PAYLOAD_BYTES: Final = 256
DEFAULT_STATS_INTERVAL: Final = 10.0
DEFAULT_SESSION_EXPIRY: Final = 86400
DEFAULT_MAX_INFLIGHT: Final = 64
DEFAULT_RECONNECT_MAX: Final = 5.0
DEFAULT_BACKEND: Final = "memory"
DEFAULT_LOG_LEVEL: Final = "info"

ENV_PREFIX: Final = "MEMORY_WORKER_"

CONTENT_TYPE: Final = "application/msgpack"
CONTENT_TYPE_JSON: Final = "application/json"
FORMAT_MSGPACK: Final = "msgpack"
FORMAT_JSON: Final = "json"
EVENT_FORMATS: Final = (FORMAT_MSGPACK, FORMAT_JSON)
DEFAULT_EVENT_FORMAT: Final = FORMAT_MSGPACK

# Limits of the contract itself, not tunables.
MAX_CONVO_BYTES: Final = 128
MAX_ROLE_CHARS: Final = 32
MAX_ID_BYTES: Final = 64
MAX_NAME_BYTES: Final = 128
MAX_TOPIC_BYTES: Final = 256
# Correlation Data a reply echoes: past it the request's route is refused (no reply).
MAX_CORRELATION_BYTES: Final = 1024

WORKER_LEVEL: Final = "_worker"
# P/_conversations/list: the worker-level request that lists live conversations.
CONVERSATIONS_LEVEL: Final = "_conversations"
OP_LIST: Final = "list"
DEFAULT_LIST_LIMIT: Final = 100
MAX_LIST_LIMIT: Final = 1000
# Conversations a page of the in-process stores reads at a time: between steps, requests that
# came meanwhile are served first, so a page holds a device's request up for about 25 µs (at
# 1,000,000 conversations), not a whole page's 100-1,200.
LIST_STEP: Final = 20
# While other requests are being served (one came within LIST_BUSY seconds), reading pages
# takes at most this share of the worker's time (a pause after each page): a lister going flat
# out would otherwise take a core (the worker's, the broker's and its own) from the devices.
# An idle worker lists flat out.
LIST_DUTY: Final = 0.1
LIST_BUSY: Final = 0.05
EVICTED: Final = "evicted"
TRIMMED: Final = "trimmed"
# The role of a turn holding a whole LangChain message (worker/client/langchain.py), which
# memory-summarizer reads back as words (worker/llm.py).
WHOLE_MESSAGE_ROLE: Final = "langchain"
EVENT_LEAVES: Final = (EVICTED, TRIMMED)
# P/_worker/<client-id>/<leaf>: what workers publish about themselves (probe: a start-up check;
# ping: asks the worker holding that client id to publish its stats now).
PING: Final = "ping"
WORKER_LEAVES: Final = ("status", "stats", "probe", PING)

OP_APPEND: Final = "append"
OP_GET: Final = "get"
OP_DELETE: Final = "delete"
OP_SUMMARY: Final = "summary"
OP_STATE_SAVE: Final = "state/save"
OP_STATE_LOAD: Final = "state/load"
OP_STATE_GET_ALL: Final = "state/get_all"
OP_STATE_DELETE: Final = "state/delete"
OP_STATE_NAMESPACES: Final = "state/namespaces"
OPERATIONS: Final = (
    OP_APPEND,
    OP_GET,
    OP_DELETE,
    OP_SUMMARY,
    OP_STATE_SAVE,
    OP_STATE_LOAD,
    OP_STATE_GET_ALL,
    OP_STATE_DELETE,
    OP_STATE_NAMESPACES,
)

REASON_TTL: Final = "ttl"
REASON_LRU: Final = "lru"
REASON_MEMORY: Final = "memory"
REASON_DELETED: Final = "deleted"
REASONS: Final = (REASON_TTL, REASON_LRU, REASON_MEMORY, REASON_DELETED)

# What --max-bytes counts besides the stored bytes themselves: resident memory per
# conversation (plus ID_BYTE_COST per byte of its id), per turn (plus role and content) and
# per state key (plus key and msgpack value). Measured as RSS deltas (/proc VmRSS), never
# tracemalloc (the allocator's share is memory too), with `scripts/bench --only memory`:
# in a fresh process filling the memory store alone (200,000 one-turn conversations, 20,000
# conversations x 8 turns, 200,000 with 128-byte ids, 200,000 keys of 100-byte values: 523,
# 193 per turn, 653 and 305 bytes each), and in the worker process filled to three times the
# budget with each shape, which adds what churn costs (eviction after eviction leaves dict
# tables sized for deleted entries and freed memory the allocator keeps): about 235 bytes
# more per conversation (it varies between runs: 1.13-1.21x the budget with 512), and an
# id's bytes counting about 1.6 times. Rounded up, so the budget errs towards less memory.
# Measured before the memory store packed its turns without their keys (worker/turns.py),
# which made a full conversation's turn 24 bytes smaller (169 bytes, not 193); the costs were
# kept, since SQLite and Redis count the same ones and Redis still stores the maps.
# Listing (issue 22) added 48 to the conversation's: its time of last use (a slot and the
# float it holds) and its place in the sorted index of ids, measured as 42 bytes more RSS per
# one-turn conversation in the store alone (200,000 in a fresh process: 558 -> 600). Its
# turns' token total (a slot and, past 256, the int it holds) added 24: 608 -> 631.
CONVO_COST: Final = 712
ID_BYTE_COST: Final = 2
TURN_COST: Final = 112
KEY_COST: Final = 256
# Each request id a conversation remembers (up to --max-inflight of them), its up to 64 bytes
# included: 423 bytes of RSS measured per 64-byte id of an append (5,000 conversations x 64
# ids in a fresh process), rounded up. Flat, so that every backend counts it alike.
ID_COST: Final = 480

# Bytes of our QoS 1 publishes the broker has not acknowledged (its PUBACKs behind a flood;
# the project's broker lets 1000 be in flight): past it a batch of requests is answered
# unavailable, nothing done (see Service._sort).
REPLY_BACKLOG_BYTES: Final = 8 * 1024 * 1024

# Seconds: how long a stopping worker waits for the batch in hand and its replies.
DRAIN_TIMEOUT: Final = 5.0
# Before it connects as its client id, a worker looks whether another holds it: within
# LOOK_TIMEOUT for the retained status, then, when that says "online" and is not its own,
# within TWIN_WAIT for stats of a live worker (pinged, it answers at once). The wait is what
# a stale "online" costs a start (a broker restored from its persistence after a power cut).
LOOK_TIMEOUT: Final = 3.0
TWIN_WAIT: Final = 3.0
# A worker's status or stats is under 1 KiB: larger messages on worker topics are not read.
MAX_WORKER_TOPIC_BYTES: Final = 8192
MAX_GROUP_CHARS: Final = 256  # --shared-group, as a worker keeps another's to compare
PING_EVERY: Final = 1.0  # a worker answers pings at most this often: anyone may send one
# A look's own topic, which a ping names for the answer: no bridge carries a `$` topic
# (wildcards do not match them), so only a worker on the look's broker answers there.
LOOK_TOPIC: Final = "$memory-worker/look"
MAX_LOOK_TOPIC: Final = 64
LOOKS_ANSWERED: Final = 8  # look topics answered per PING_EVERY at most
# Seconds between the worker's MQTT PINGREQs when nothing else is sent.
KEEPALIVE: Final = 30
# Seconds a Redis batch may take before its requests are answered `unavailable`.
REDIS_TIMEOUT: Final = 2.0

# How many conversations one sweep step expires before it yields to serving.
SWEEP_CHUNK: Final = 500
# The sweep sleeps until the next deadline, but runs at most this often (a wave of expiries
# is taken in steps of this interval, not one wake-up per conversation).
SWEEP_INTERVAL: Final = 0.25
# Redis: other workers of a share group set deadlines this worker cannot see, so its sweep
# sleeps at most this long (its own requests wake it earlier).
REDIS_SWEEP_POLL: Final = 1.0
# Redis: a trimmed event kept in the outbox this long without its worker saying the broker
# has it is taken by a sweep and sent again (its worker was killed, or lost its reply).
OUTBOX_STALE: Final = 30.0
