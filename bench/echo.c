/* The cheapest possible responder: answers every request under PREFIX with a fixed
 * {ok: true} on its Response Topic, with its Correlation Data, at the request's QoS.
 *
 * echo HOST PORT PREFIX
 */
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const unsigned char OK[] = {0x81, 0xa2, 'o', 'k', 0xc3};

static void on_message(struct mosquitto *m, void *u, const struct mosquitto_message *msg,
                       const mosquitto_property *props) {
    (void)u;
    char *topic = NULL;
    void *corr = NULL;
    uint16_t corr_len = 0;
    if (!mosquitto_property_read_string(props, MQTT_PROP_RESPONSE_TOPIC, &topic, false)) return;
    mosquitto_property *out = NULL;
    if (mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false))
        mosquitto_property_add_binary(&out, MQTT_PROP_CORRELATION_DATA, corr, corr_len);
    mosquitto_publish_v5(m, NULL, topic, sizeof OK, OK, msg->qos, false, out);
    mosquitto_property_free_all(&out);
    free(topic);
    free(corr);
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: echo HOST PORT PREFIX\n"); return 2; }
    char filter[256];
    snprintf(filter, sizeof filter, "%s/+/+", argv[3]);
    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new("bench-echo-c", true, NULL);
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
    mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_max_inflight_messages_set(m, 0);
    mosquitto_message_v5_callback_set(m, on_message);
    if (mosquitto_connect(m, argv[1], atoi(argv[2]), 60) != MOSQ_ERR_SUCCESS) return 1;
    mosquitto_subscribe(m, NULL, filter, 1);
    printf("ready\n");
    fflush(stdout);
    mosquitto_loop_forever(m, -1, 1);
    return 0;
}
