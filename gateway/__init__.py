"""sms-gateway: the outbound SMS path from RabbitMQ to SerwerSMS.pl and Mobizon (README.md)."""
