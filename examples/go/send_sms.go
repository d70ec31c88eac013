// Publish one SMS request to the gateway and wait for its outcome (amqp091-go).
//
// On Debian or Ubuntu, offline, with the distribution's copy of the client:
//
//	apt install golang-go golang-github-rabbitmq-amqp091-go-dev
//	AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ SMS_ACCOUNT=demo SMS_TO=+48500600700 GO111MODULE=off GOPATH=/usr/share/gocode go run send_sms.go
//
// Anywhere else, with the module from the Go proxy:
//
//	go mod init send_sms && go get github.com/rabbitmq/amqp091-go
//	AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ SMS_ACCOUNT=demo SMS_TO=+48500600700 go run send_sms.go
//
// The outcome comes back on a reply queue of our own (reply_to), matched by our correlation_id.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	os.Exit(run())
}

func run() int {
	conn, err := amqp.Dial(env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	replies, err := ch.QueueDeclare("", false, true, true, false, nil) // ours alone, gone when we are
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	deliveries, err := ch.Consume(replies.Name, "", true, true, false, false, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := ch.Confirm(false); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	correlationID := fmt.Sprintf("go-%d", time.Now().UnixNano())
	request := map[string]any{
		"unique_id": env("SMS_UNIQUE_ID", correlationID), // your idempotency key
		"to":        env("SMS_TO", "+48500600700"),
		"text":      "Your code is {code}",
		"vars":      map[string]string{"code": "4711"},
	}
	body, _ := json.Marshal(request)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// The account's urgent lane: a one-time code goes ahead of the account's campaigns
	// (`<account>` is the normal lane, `<account>.bulk` the campaigns').
	routingKey := env("SMS_ACCOUNT", "demo") + ".urgent"
	confirm, err := ch.PublishWithDeferredConfirmWithContext(ctx, "sms.send", routingKey, false, false, amqp.Publishing{
		ContentType:   "application/json",
		DeliveryMode:  amqp.Persistent,
		CorrelationId: correlationID,
		ReplyTo:       replies.Name,
		Body:          body,
	})
	if err != nil || !confirm.Wait() {
		fmt.Fprintln(os.Stderr, "publish not confirmed:", err)
		return 1
	}
	for {
		select {
		case d := <-deliveries:
			if d.CorrelationId != correlationID {
				continue
			}
			var outcome map[string]any
			if err := json.Unmarshal(d.Body, &outcome); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			fmt.Println(string(d.Body))
			if outcome["status"] == "accepted" {
				return 0
			}
			return 1
		case <-ctx.Done():
			fmt.Fprintln(os.Stderr, "no outcome within 60 s")
			return 1
		}
	}
}
