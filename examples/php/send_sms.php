<?php
// Publish one SMS request to the gateway and wait for its outcome (php-amqplib).
//
//   apt install php-cli php-amqplib     (Debian or Ubuntu; elsewhere: composer require php-amqplib/php-amqplib)
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ SMS_ACCOUNT=demo SMS_TO=+48500600700 php send_sms.php
//
// The outcome is read from a queue of our own bound to sms.outcomes for the account
// (routing key <status>.<account>), matched by unique_id.
$autoload = __DIR__ . '/vendor/autoload.php';
require file_exists($autoload) ? $autoload : '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

$url = parse_url(getenv('AMQP_URL') ?: 'amqp://guest:guest@127.0.0.1:5672/');
$account = getenv('SMS_ACCOUNT') ?: 'demo';
$connection = new AMQPStreamConnection(
    $url['host'], $url['port'] ?? 5672, urldecode($url['user'] ?? 'guest'), urldecode($url['pass'] ?? 'guest'),
    isset($url['path']) && strlen($url['path']) > 1 ? urldecode(substr($url['path'], 1)) : '/'
);
$channel = $connection->channel();

// Bind before publishing, so the outcome cannot pass by unseen.
[$queue] = $channel->queue_declare('', false, false, true, true);
$channel->queue_bind($queue, 'sms.outcomes', '*.' . $account);

$request = [
    'unique_id' => getenv('SMS_UNIQUE_ID') ?: 'php-' . bin2hex(random_bytes(8)), // your idempotency key
    'to' => getenv('SMS_TO') ?: '+48500600700',
    'text' => 'Your code is {code}',
    'vars' => ['code' => '4711'],
];
$channel->confirm_select();
// The account's urgent lane: a one-time code goes ahead of the account's campaigns
// (`<account>` is the normal lane, `<account>.bulk` the campaigns').
$channel->basic_publish(
    new AMQPMessage(json_encode($request), ['content_type' => 'application/json', 'delivery_mode' => 2]),
    'sms.send',
    $account . '.urgent'
);
$channel->wait_for_pending_acks(10);

$outcome = null;
$channel->basic_consume($queue, '', false, true, true, false, function (AMQPMessage $m) use (&$outcome, $request) {
    $doc = json_decode($m->getBody(), true);
    if (($doc['unique_id'] ?? null) === $request['unique_id']) {
        $outcome = $doc;
    }
});
while ($outcome === null) {
    $channel->wait(null, false, 60);
}
echo json_encode($outcome), PHP_EOL;
$channel->close();
$connection->close();
exit($outcome['status'] === 'accepted' ? 0 : 1);
