#!/bin/sh
# Per-vehicle permissions for RabbitMQ's MQTT plugin (vhost /, exchange amq.topic): the
# equivalent of mosquitto-vehicles.acl. MQTT topic vehicles/<VIN>/telemetry is the routing
# key vehicles.<VIN>.telemetry on amq.topic; topic permissions are regexes over it.
#
#   rabbitmq-permissions.sh vehicle <VIN> [client-id]   # client id default: tcu-<VIN>
#   rabbitmq-permissions.sh cloud [user]                 # default user: tcu-cloud
#
# The user is created if missing. A password, if any, is read from stdin (one line);
# with none the user can log in only by certificate (mqtt.ssl_cert_login, CN = user).
# RABBITMQCTL names the rabbitmqctl to use (default: rabbitmqctl, with its usual options).
set -eu

ctl() { ${RABBITMQCTL:-rabbitmqctl} "$@"; }
die() { echo "rabbitmq-permissions: $*" >&2; exit 2; }

add_user() {  # name; the password from stdin, or none. An existing user is kept as it is.
    password=""
    [ -t 0 ] || IFS= read -r password || true
    # rabbitmqctl wants a password: a random one, cleared, means certificate login only
    [ -n "$password" ] || random=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    # on stdin, not the command line, where ps would show it
    if out=$(printf '%s\n' "${password:-$random}" | ctl add_user "$1" 2>&1); then
        [ -n "$password" ] || ctl clear_password "$1" >/dev/null
    else
        case "$out" in *already_exists*|*"already exists"*) ;; *) die "$out" ;; esac
    fi
}

case "${1:-}" in
vehicle)
    vin=${2:-}
    echo "$vin" | grep -qxE '[A-Za-z0-9_-]{1,64}' || die "vehicle: a VIN of letters, digits, - and _"
    client=${3:-tcu-$vin}
    echo "$client" | grep -qxE '[A-Za-z0-9_-]{1,64}' || die "vehicle: bad client id '$client'"
    add_user "$vin"
    # Queues: only its own subscription queues (the plugin names them
    # mqtt-subscription-<client id>qos0/qos1); the topic exchange to publish and bind.
    q="mqtt-subscription-${client}qos[01]"
    ctl set_permissions -p / "$vin" "^${q}\$" "^(amq\\.topic|${q})\$" \
        "^(amq\\.topic|${q})\$" >/dev/null
    # Topics: publish its telemetry, state, status (and the will), responses, diagnostics;
    # subscribe to its commands only.
    ctl set_topic_permissions -p / "$vin" amq.topic \
        "^vehicles\\.${vin}\\.(telemetry|state|status|responses|diagnostics)\$" \
        "^vehicles\\.${vin}\\.commands\$" >/dev/null
    ;;
cloud)
    user=${2:-tcu-cloud}
    add_user "$user"
    ctl set_permissions -p / "$user" '^mqtt-subscription-.*$' \
        '^(amq\.topic|mqtt-subscription-.*)$' '^(amq\.topic|mqtt-subscription-.*)$' >/dev/null
    # every vehicle's messages; commands to any vehicle
    ctl set_topic_permissions -p / "$user" amq.topic '^vehicles\.[^.]+\.commands$' \
        '^vehicles\.' >/dev/null
    ;;
*)
    die "usage: rabbitmq-permissions.sh vehicle <VIN> [client-id] | cloud [user]"
    ;;
esac
