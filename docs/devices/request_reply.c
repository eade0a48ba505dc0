/* A device's request/reply with the Eclipse Paho C client (MQTTClient, synchronous) and
 * msgpack-c: MQTT 5 by default, 3.1.1 with --v311.
 *   cc request_reply.c -o request_reply -lpaho-mqtt3c -lmsgpackc  (msgpack-c 6 and later: -lmsgpack-c)
 *   MQTT_HOST=127.0.0.1 MQTT_PORT=1883 CONVO=kiosk-7 ./request_reply [--v311]
 * Paho C does not set TCP_NODELAY and gives no way to reach its socket: a paho C device pays
 * ~40 ms per round trip; libmosquitto (MOSQ_OPT_TCP_NODELAY) avoids it (docs/devices.md).
 * One attempt here: a device that retries after a timeout sends the same bytes again (the
 * same id), and the worker stores the append once. */
#include <MQTTClient.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *env(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return v ? v : fallback;
}

/* A request id unique to this request: the worker stores an append at most once per id, so
 * a fixed id would make every run after the first get the first run's reply, unstored. Keep
 * it for the retries of one request, and make a new one for the next request. */
static void new_id(char *out, size_t size) {
    static unsigned n;
    snprintf(out, size, "c-%lx-%x-%u", (unsigned long)time(NULL), (unsigned)getpid(), n++);
}

/* One request at QoS 1; the reply (a msgpack map) is printed. Returns 0 on {ok: true}. */
static int request(MQTTClient c, int v5, const char *topic, const char *inbox,
                   const char *op, const char *id, const char *role, const char *content) {
    msgpack_sbuffer buf;
    msgpack_packer pk;
    msgpack_sbuffer_init(&buf);
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, (role ? 2 : 0) + 1 + (v5 ? 0 : 1));
    msgpack_pack_str_with_body(&pk, "id", 2);  /* the same id on a retry: stored once */
    msgpack_pack_str_with_body(&pk, id, strlen(id));
    if (role) {
        msgpack_pack_str_with_body(&pk, "role", 4);
        msgpack_pack_str_with_body(&pk, role, strlen(role));
        msgpack_pack_str_with_body(&pk, "content", 7);
        msgpack_pack_str_with_body(&pk, content, strlen(content));
    }
    if (!v5) { /* 3.1.1 has no Response Topic: the route goes in the payload */
        msgpack_pack_str_with_body(&pk, "reply_to", 8);
        msgpack_pack_str_with_body(&pk, inbox, strlen(inbox));
    }
    MQTTClient_message msg = MQTTClient_message_initializer;
    msg.payload = buf.data;
    msg.payloadlen = (int)buf.size;
    msg.qos = 1;
    MQTTClient_deliveryToken token;
    if (v5) {
        MQTTProperty p = {.identifier = MQTTPROPERTY_CODE_RESPONSE_TOPIC};
        p.value.data.data = (char *)inbox;
        p.value.data.len = (int)strlen(inbox);
        MQTTProperties_add(&msg.properties, &p);
        p.identifier = MQTTPROPERTY_CODE_CORRELATION_DATA;
        p.value.data.data = (char *)id;
        p.value.data.len = (int)strlen(id);
        MQTTProperties_add(&msg.properties, &p);
        MQTTClient_publishMessage5(c, topic, &msg, &token);
        MQTTProperties_free(&msg.properties);
    } else {
        MQTTClient_publishMessage(c, topic, &msg, &token);
    }
    msgpack_sbuffer_destroy(&buf);
    (void)op;

    char *rtopic = NULL;
    int rlen = 0;
    MQTTClient_message *reply = NULL;
    if (MQTTClient_receive(c, &rtopic, &rlen, &reply, 5000) != MQTTCLIENT_SUCCESS || !reply) {
        fprintf(stderr, "no reply\n");
        return 1;
    }
    msgpack_unpacked result;
    msgpack_unpacked_init(&result);
    int ok = 0;
    if (msgpack_unpack_next(&result, reply->payload, (size_t)reply->payloadlen, NULL) ==
        MSGPACK_UNPACK_SUCCESS) {
        msgpack_object_print(stdout, result.data); /* {"ok"=>true, "seq"=>1, ...} */
        printf("\n");
        msgpack_object_map m = result.data.via.map;
        for (uint32_t i = 0; i < m.size; i++)
            if (m.ptr[i].key.via.str.size == 2 && !memcmp(m.ptr[i].key.via.str.ptr, "ok", 2))
                ok = m.ptr[i].val.via.boolean;
    }
    msgpack_unpacked_destroy(&result);
    MQTTClient_freeMessage(&reply);
    MQTTClient_free(rtopic);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    int v5 = !(argc > 1 && !strcmp(argv[1], "--v311"));
    char uri[256], inbox[256], topic[256];
    const char *prefix = env("PREFIX", "mem"), *convo = env("CONVO", "kiosk-7");
    snprintf(uri, sizeof uri, "tcp://%s:%s", env("MQTT_HOST", "127.0.0.1"), env("MQTT_PORT", "1883"));
    char id[64];
    new_id(id, sizeof id);
    snprintf(inbox, sizeof inbox, "reply/%s/%s", convo, id); /* this device's own reply topic */

    MQTTClient c;
    MQTTClient_createOptions create = MQTTClient_createOptions_initializer;
    create.MQTTVersion = v5 ? MQTTVERSION_5 : MQTTVERSION_3_1_1;
    MQTTClient_createWithOptions(&c, uri, "", MQTTCLIENT_PERSISTENCE_NONE, NULL, &create);
    MQTTClient_connectOptions conn = MQTTClient_connectOptions_initializer;
    if (v5) {
        MQTTClient_connectOptions conn5 = MQTTClient_connectOptions_initializer5;
        conn = conn5;
    }
    conn.MQTTVersion = create.MQTTVersion;
    int rc = v5 ? (int)MQTTClient_connect5(c, &conn, NULL, NULL).reasonCode
                : MQTTClient_connect(c, &conn);
    if (rc != 0) {
        fprintf(stderr, "connect failed: %d\n", rc);
        return 2;
    }
    if (v5)
        MQTTClient_subscribe5(c, inbox, 1, NULL, NULL);
    else
        MQTTClient_subscribe(c, inbox, 1);

    snprintf(topic, sizeof topic, "%s/%s/append", prefix, convo);
    new_id(id, sizeof id);
    int bad = request(c, v5, topic, inbox, "append", id, "user", "hello from C");
    snprintf(topic, sizeof topic, "%s/%s/get", prefix, convo);
    new_id(id, sizeof id);
    bad |= request(c, v5, topic, inbox, "get", id, NULL, NULL);
    MQTTClient_disconnect(c, 1000);
    MQTTClient_destroy(&c);
    return bad;
}
