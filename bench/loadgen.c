/* Closed-loop MQTT 5 load generator for the memory worker (and any echo responder).
 *
 * loadgen HOST PORT PREFIX QOS WINDOW WARMUP SECONDS CONVERSATIONS GET_PERCENT
 *
 * Keeps WINDOW requests outstanding, each with a Response Topic and Correlation Data,
 * alternating appends (120-byte content) and gets over CONVERSATIONS conversations. After
 * WARMUP seconds it counts replies for SECONDS seconds, then prints one JSON line (with
 * LOADGEN_MAX_TOKENS=N in the environment, each get also asks for max_tokens N; with
 * LOADGEN_LAST=N, for the last N turns instead of 8):
 * {"replies", "seconds", "rps", "p50_ms", "p99_ms", "p999_ms", "max_ms", "cpu_s", "wall_s",
 * "sent"}: "sent" counts every request of the run, warm-up included.
 * Written in C so that the load generator is never what limits the measurement.
 */
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>

static const char *prefix;
static int qos, window, convos, get_pct;
static double warmup_end, measure_end;
static double *sent_at;
static double *lat;
static long lat_n, lat_cap, counter;
static char reply_topic[64];
static unsigned char append_body[160], get_body[48];
static int append_len, get_len;
static int done;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void send_one(struct mosquitto *m, uint32_t slot) {
    char topic[256];
    long n = counter++;
    int is_get = (int)(n % 100) < get_pct;
    snprintf(topic, sizeof topic, "%s/c%ld/%s", prefix, n % convos, is_get ? "get" : "append");
    mosquitto_property *props = NULL;
    mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, reply_topic);
    mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, &slot, sizeof slot);
    sent_at[slot] = now();
    int rc = mosquitto_publish_v5(m, NULL, topic, is_get ? get_len : append_len,
                                  is_get ? get_body : append_body, qos, false, props);
    mosquitto_property_free_all(&props);
    if (rc != MOSQ_ERR_SUCCESS) fprintf(stderr, "publish: %s\n", mosquitto_strerror(rc));
}

static void on_message(struct mosquitto *m, void *u, const struct mosquitto_message *msg,
                       const mosquitto_property *props) {
    (void)u; (void)msg;
    void *data = NULL;
    uint16_t len = 0;
    if (!mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &data, &len, false)
        || len != sizeof(uint32_t)) {
        free(data);
        return;
    }
    uint32_t slot;
    memcpy(&slot, data, sizeof slot);
    free(data);
    double t = now();
    if (t >= warmup_end && t < measure_end && lat_n < lat_cap) lat[lat_n++] = t - sent_at[slot];
    if (t >= measure_end) { done = 1; return; }
    send_one(m, slot);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!lat_n) return 0;
    long i = (long)(p * lat_n);
    if (i >= lat_n) i = lat_n - 1;
    return lat[i] * 1000;
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: loadgen HOST PORT PREFIX QOS WINDOW WARMUP SECONDS CONVOS GET%%\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    prefix = argv[3];
    qos = atoi(argv[4]);
    window = atoi(argv[5]);
    double warmup = atof(argv[6]), seconds = atof(argv[7]);
    convos = atoi(argv[8]);
    get_pct = atoi(argv[9]);
    sent_at = calloc(window, sizeof *sent_at);
    lat_cap = 20000000;
    lat = malloc(lat_cap * sizeof *lat);

    /* {"role": "user", "content": <120 x>} and {"last": 8} */
    unsigned char *p = append_body;
    *p++ = 0x82; *p++ = 0xa4; memcpy(p, "role", 4); p += 4; *p++ = 0xa4; memcpy(p, "user", 4);
    p += 4; *p++ = 0xa7; memcpy(p, "content", 7); p += 7; *p++ = 0xd9; *p++ = 120;
    memset(p, 'x', 120); p += 120;
    append_len = (int)(p - append_body);
    p = get_body;
    const char *max_tokens = getenv("LOADGEN_MAX_TOKENS");
    const char *last = getenv("LOADGEN_LAST");
    *p++ = max_tokens ? 0x82 : 0x81; *p++ = 0xa4; memcpy(p, "last", 4); p += 4;
    *p++ = last ? (unsigned char)atoi(last) & 0x7f : 0x08;
    if (max_tokens) { /* "max_tokens": uint32 */
        uint32_t n = (uint32_t)atol(max_tokens);
        *p++ = 0xaa; memcpy(p, "max_tokens", 10); p += 10; *p++ = 0xce;
        *p++ = n >> 24; *p++ = n >> 16; *p++ = n >> 8; *p++ = n;
    }
    get_len = (int)(p - get_body);
    snprintf(reply_topic, sizeof reply_topic, "bench/%d/r", (int)getpid());

    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new(NULL, true, NULL);
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
    mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_max_inflight_messages_set(m, 0);
    mosquitto_message_v5_callback_set(m, on_message);
    if (mosquitto_connect(m, host, port, 60) != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "cannot connect to %s:%d\n", host, port);
        return 1;
    }
    int mid;
    mosquitto_subscribe(m, &mid, reply_topic, qos);
    for (int i = 0; i < 50; i++) mosquitto_loop(m, 10, 1); /* SUBACK */
    double start = now();
    warmup_end = start + warmup;
    measure_end = warmup_end + seconds;
    for (uint32_t s = 0; s < (uint32_t)window; s++) send_one(m, s);
    while (!done && now() < measure_end + 5) {
        if (mosquitto_loop(m, 100, 1) != MOSQ_ERR_SUCCESS) break;
        if (now() >= measure_end) done = 1;
    }
    mosquitto_disconnect(m);
    qsort(lat, lat_n, sizeof *lat, cmp);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("{\"replies\": %ld, \"seconds\": %.3f, \"rps\": %.1f, \"p50_ms\": %.3f, "
           "\"p99_ms\": %.3f, \"p999_ms\": %.3f, \"max_ms\": %.3f, \"cpu_s\": %.3f, "
           "\"wall_s\": %.3f, \"sent\": %ld}\n",
           lat_n, seconds, lat_n / seconds, pct(0.5), pct(0.99), pct(0.999),
           lat_n ? lat[lat_n - 1] * 1000 : 0, cpu, now() - start, counter);
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    return 0;
}
