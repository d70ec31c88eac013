#!/bin/sh
# Publish one SMS request to the gateway and wait for its outcome (Debian's amqp-tools).
#
#   apt install amqp-tools
#   AMQP_URL=amqp://guest:guest@127.0.0.1:5672 SMS_ACCOUNT=demo SMS_TO=+48500600700 ./send_sms.sh
#
# The outcome comes back on a queue of our own named in reply_to. amqp-publish cannot set
# message_id or correlation_id, so the unique_id travels in the body.
set -eu
URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}  # librabbitmq: a trailing / means the vhost ""; /%2f is "/"
ACCOUNT=${SMS_ACCOUNT:-demo}
# The account's urgent lane: a one-time code goes ahead of the account's campaigns
# (`<account>` is the normal lane, `<account>.bulk` the campaigns').
LANE_KEY="$ACCOUNT.urgent"
ID=${SMS_UNIQUE_ID:-sh-$(date +%s)-$$}
REPLY=reply.$ID

amqp-declare-queue -u "$URL" -q "$REPLY" >/dev/null     # declared before publishing: no race
trap 'amqp-delete-queue -u "$URL" -q "$REPLY" >/dev/null' EXIT

amqp-publish -u "$URL" -e sms.send -r "$LANE_KEY" -p -C application/json -t "$REPLY" \
  -b "{\"unique_id\": \"$ID\", \"to\": \"${SMS_TO:-+48500600700}\", \"text\": \"Your code is 4711\"}"

OUTCOME=$(timeout 60 amqp-consume -u "$URL" -q "$REPLY" -c 1 cat)
echo "$OUTCOME"
case "$OUTCOME" in *'"status":"accepted"'*) exit 0 ;; *) exit 1 ;; esac
