// Publish one SMS request to the gateway and wait for its outcome (amqplib).
//
//   npm ci     (amqplib, at the version package-lock.json pins; or: npm install amqplib)
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ SMS_ACCOUNT=demo SMS_TO=+48500600700 node send_sms.js
//
// The outcome comes back through RabbitMQ's direct reply-to (no queue to declare), matched on
// our own correlation_id, which the gateway keeps.
const amqp = require('amqplib');
const crypto = require('node:crypto');

async function main() {
  const connection = await amqp.connect(process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/');
  try {
    const channel = await connection.createConfirmChannel();
    const correlationId = crypto.randomUUID();
    const outcome = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no outcome within 60 s')), 60000);
      // Consume from direct reply-to before publishing (no-ack is required there).
      channel.consume('amq.rabbitmq.reply-to', (message) => {
        if (message.properties.correlationId === correlationId) {
          clearTimeout(timer);
          resolve(JSON.parse(message.content.toString('utf8')));
        }
      }, { noAck: true });
    });
    const request = {
      unique_id: process.env.SMS_UNIQUE_ID || `node-${correlationId}`, // your idempotency key
      to: process.env.SMS_TO || '+48500600700',
      text: 'Your code is {code}',
      vars: { code: '4711' },
    };
    // The account's urgent lane: a one-time code goes ahead of the account's campaigns
    // (`<account>` is the normal lane, `<account>.bulk` the campaigns').
    const routingKey = (process.env.SMS_ACCOUNT || 'demo') + '.urgent';
    channel.publish('sms.send', routingKey, Buffer.from(JSON.stringify(request)), {
      contentType: 'application/json',
      persistent: true,
      correlationId,
      replyTo: 'amq.rabbitmq.reply-to',
    });
    await channel.waitForConfirms();
    const result = await outcome;
    console.log(JSON.stringify(result));
    return result.status === 'accepted' ? 0 : 1;
  } finally {
    await connection.close();
  }
}

main().then((code) => process.exit(code), (err) => { console.error(err.message); process.exit(1); });
