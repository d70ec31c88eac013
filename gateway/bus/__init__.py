"""The broker side: consuming account queues, settling each delivery (publish, then ack), publishing
outcomes and retries, and declaring the topology."""
