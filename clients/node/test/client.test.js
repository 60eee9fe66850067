'use strict';
// Node.js against real Python agents on loopback: the seed's own code, and our client.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { once } = require('node:events');

const { PiFleetClient, PiFleetError, loadDevices } = require('..');
const { REPO, startAgent, tempRoot, fixture } = require('../test-helpers');

const SEED_COMMANDS = ['start_recording', 'stop_recording', 'camera_status'];
const SLOW_HANDLER = 'import time\n\ndef handle_slow(data):\n    time.sleep(data.get("seconds", 2))\n    return {"slept": True}\n';

function waitFor(predicate, what, timeoutMs = 20000) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = setInterval(() => {
      if (predicate()) { clearInterval(poll); resolve(); }
      else if (Date.now() - started > timeoutMs) { clearInterval(poll); reject(new Error(`timed out waiting for ${what}`)); }
    }, 10);
  });
}

test('a bare net.Socket written like the seed\'s Option B deploys the camera handler', async (t) => {
  const agent = await startAgent();
  t.after(() => agent.stop());
  const newHandlerCode = fixture('seed_camera_step2.py');

  // The user's Option B, as written in their document (less the console output).
  const response = await new Promise((resolve, reject) => {
    const client = new net.Socket();
    client.connect(agent.port, '127.0.0.1', () => {
      const updateCommand = {
        command: 'update_handler',
        filename: 'camera_handlers.py',
        code: newHandlerCode,
      };
      client.write(JSON.stringify(updateCommand) + '\n');
    });
    client.on('data', (data) => {
      const parsed = JSON.parse(data.toString());
      client.destroy();
      resolve(parsed);
    });
    client.on('error', reject);
  });

  assert.equal(response.success, true);
  assert.equal(response.message, 'Handler camera_handlers.py updated successfully with safety checks');
  assert.equal(response.filename, 'handlers/camera_handlers.py');
  assert.equal(response.validation_passed, true);
  assert.deepEqual(response.reload.commands, SEED_COMMANDS);
  assert.equal(response.reload.command_count, 3);
});

test('the HW_RASPI_MULTI functions work as the seed uses them', async (t) => {
  const agent = await startAgent();
  const messages = [];
  const multi = new PiFleetClient({ onMessage: (raspiId, message) => messages.push({ raspiId, message }) });
  t.after(async () => { multi.close(); await agent.stop(); });

  assert.equal(multi.addRaspberryPi({ id: 'raspi_main', name: 'Main', host: '127.0.0.1', port: agent.port }), true);
  assert.equal(multi.sendCommandToRaspberryPi('raspi_main', { command: 'ping' }), false); // not connected yet
  await multi.connectToRaspberryPi('raspi_main');
  assert.equal(multi.getConnectionStatus().raspi_main.connected, true);

  const updateCommand = { command: 'update_handler', filename: 'camera_handlers.py', code: fixture('seed_camera_step1.py') };
  const sent = multi.sendCommandToRaspberryPi('raspi_main', updateCommand);
  assert.equal(sent, true);
  await waitFor(() => messages.length === 1, 'the update reply');
  assert.equal(messages[0].raspiId, 'raspi_main');
  assert.deepEqual(messages[0].message.reload.commands, SEED_COMMANDS);

  // Step 4: the new commands are available at once.
  multi.sendCommandToRaspberryPi('raspi_main', { command: 'camera_status' });
  await waitFor(() => messages.length === 2, 'the camera_status reply');
  assert.equal(messages[1].message.type, 'camera_status');
  assert.equal(messages[1].message.recording, false);

  const all = multi.sendCommandToAllRaspberryPis({ command: 'ping' });
  assert.deepEqual(all, { raspi_main: true });
  await waitFor(() => messages.length === 3, 'the ping reply');

  // Step 5: roll back to the previous version (there is none before the first deploy).
  const rollback = await multi.request('raspi_main', { command: 'rollback_handler', filename: 'camera_handlers.py' });
  assert.equal(rollback.success, false);
  assert.equal(rollback.code, 'not_found');
});

test('request returns the reply matched by id, and times out against a slow handler', async (t) => {
  const agent = await startAgent();
  const client = new PiFleetClient();
  t.after(async () => { client.close(); await agent.stop(); });
  client.addRaspberryPi({ id: 'a', host: '127.0.0.1', port: agent.port });

  const deployed = await client.request('a', { command: 'update_handler', filename: 'slow.py', code: SLOW_HANDLER });
  assert.equal(deployed.success, true, JSON.stringify(deployed));

  const slow = client.request('a', { command: 'slow', seconds: 2 }, { timeout: 200 });
  await assert.rejects(slow, (err) => err instanceof PiFleetError && err.code === 'timeout' && /200 ms/.test(err.message));

  // Many requests at once on one connection: each gets its own reply.
  const replies = await Promise.all(Array.from({ length: 50 }, () => client.request('a', { command: 'ping' })));
  assert.ok(replies.every((r) => r.message === 'pong'));
  const ids = new Set(replies.map((r) => r.id));
  assert.equal(ids.size, 50);
});

test('requestAll settles one result per device, with a device down', async (t) => {
  const agent = await startAgent();
  const client = new PiFleetClient({ connectTimeout: 2000, reconnect: false });
  t.after(async () => { client.close(); await agent.stop(); });
  const down = net.createServer();
  down.listen(0, '127.0.0.1');
  await once(down, 'listening');
  const downPort = down.address().port;
  down.close(); // nothing listens there any more
  client.addRaspberryPi({ id: 'up', host: '127.0.0.1', port: agent.port });
  client.addRaspberryPi({ id: 'down', host: '127.0.0.1', port: downPort });

  const results = await client.requestAll({ command: 'ping' });
  assert.equal(results.up.status, 'fulfilled');
  assert.equal(results.up.value.message, 'pong');
  assert.equal(results.down.status, 'rejected');
  assert.equal(results.down.reason.code, 'unreachable');
});

test('a device that answers something other than JSON fails with protocol_error, naming what it sent', async (t) => {
  const agent = await startAgent();
  const web = net.createServer((socket) => {
    socket.once('data', () => socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n'));
  });
  web.listen(0, '127.0.0.1');
  await once(web, 'listening');
  const client = new PiFleetClient({ connectTimeout: 2000, reconnect: false });
  t.after(async () => { client.close(); web.close(); await agent.stop(); });
  client.addRaspberryPi({ id: 'pi', host: '127.0.0.1', port: agent.port });
  client.addRaspberryPi({ id: 'web', host: '127.0.0.1', port: web.address().port });

  const results = await client.requestAll({ command: 'ping' });
  assert.equal(results.pi.value.message, 'pong');
  assert.equal(results.web.status, 'rejected');
  assert.equal(results.web.reason.code, 'protocol_error');
  assert.match(results.web.reason.message, /answered "HTTP\/1\.1 400 Bad Request", which is not JSON/);
  assert.match(results.web.reason.message, /something other than pi-agent/);
});

test('replies split anywhere, even inside a UTF-8 character, or packed together, are read whole', async (t) => {
  // A stand-in device that answers each request with a long reply, sent in small pieces, then two in one write.
  const big = 'é'.repeat(300000); // 600,000 bytes of two-byte characters
  const device = net.createServer((socket) => {
    let received = '';
    socket.on('data', async (data) => {
      received += data.toString();
      if (received.split('\n').length <= 3) return; // until all three requests are in
      const ids = received.trim().split('\n').map((line) => JSON.parse(line).id);
      const reply = Buffer.from(JSON.stringify({ id: ids[0], success: true, text: big }) + '\n');
      for (let at = 0; at < reply.length; at += 4097) { // odd-sized pieces cut characters in half
        socket.write(reply.subarray(at, at + 4097));
        await new Promise((resolve) => setImmediate(resolve));
      }
      socket.write(ids.slice(1).map((id) => JSON.stringify({ id, success: true, text: 'short' }) + '\n').join(''));
    });
  });
  device.listen(0, '127.0.0.1');
  await once(device, 'listening');
  const client = new PiFleetClient({ reconnect: false, heartbeatInterval: 0 });
  t.after(() => { client.close(); device.close(); });
  client.addRaspberryPi({ id: 'd', host: '127.0.0.1', port: device.address().port });
  await client.connectToRaspberryPi('d');
  const replies = await Promise.all([1, 2, 3].map(() => client.request('d', { command: 'x' })));
  assert.equal(replies[0].text, big);
  assert.deepEqual(replies.slice(1).map((r) => r.text), ['short', 'short']);
});

test('a reply longer than maxLineBytes fails with protocol_error, naming the limit', async (t) => {
  const device = net.createServer((socket) => { socket.once('data', () => socket.write('{"id":1,"text":"' + 'x'.repeat(5000))); });
  device.listen(0, '127.0.0.1');
  await once(device, 'listening');
  const client = new PiFleetClient({ reconnect: false, heartbeatInterval: 0, maxLineBytes: 1000 });
  t.after(() => { client.close(); device.close(); });
  client.addRaspberryPi({ id: 'd', host: '127.0.0.1', port: device.address().port });
  await assert.rejects(client.request('d', { command: 'x' }), (err) => {
    assert.equal(err.code, 'protocol_error');
    assert.match(err.message, /longer than the client's limit of 1000 bytes/);
    return true;
  });
});

test('a connection that drops with a request unanswered rejects it with connection_lost', async (t) => {
  const hangUp = net.createServer((socket) => { socket.once('data', () => socket.end()); });
  hangUp.listen(0, '127.0.0.1');
  await once(hangUp, 'listening');
  const client = new PiFleetClient({ connectTimeout: 2000, reconnect: false });
  t.after(() => { client.close(); hangUp.close(); });
  client.addRaspberryPi({ id: 'flaky', host: '127.0.0.1', port: hangUp.address().port });
  await assert.rejects(client.request('flaky', { command: 'ping' }), (err) => {
    assert.equal(err.code, 'connection_lost');
    assert.match(err.message, /may or may not have run the request/);
    return true;
  });
});

test('the client reconnects by itself after the agent restarts', async (t) => {
  const root = tempRoot();
  let agent = await startAgent({ root });
  const port = agent.port;
  const client = new PiFleetClient({ backoffFirst: 50, backoffMax: 500 });
  t.after(async () => { client.close(); await agent.stop(); });
  client.addRaspberryPi({ id: 'a', host: '127.0.0.1', port });
  await client.connectToRaspberryPi('a');
  const disconnected = once(client, 'disconnected');
  await agent.stop('SIGKILL');
  await disconnected;
  assert.equal(client.getConnectionStatus().a.connected, false);

  agent = await startAgent({ root, args: ['--port', String(port)] });
  await once(client, 'reconnected');
  assert.equal(client.getConnectionStatus().a.reconnects, 1);
  const reply = await client.request('a', { command: 'ping' });
  assert.equal(reply.message, 'pong');
});

test('the token is added to every request', async (t) => {
  const root = tempRoot();
  const tokenFile = path.join(root, 'token');
  fs.writeFileSync(tokenFile, 'node-secret\n');
  const agent = await startAgent({ root: path.join(root, 'agent'), args: ['--token-file', tokenFile] });
  const withToken = new PiFleetClient({ token: 'node-secret' });
  const without = new PiFleetClient();
  t.after(async () => { withToken.close(); without.close(); await agent.stop(); });
  withToken.addRaspberryPi({ id: 'a', host: '127.0.0.1', port: agent.port });
  without.addRaspberryPi({ id: 'a', host: '127.0.0.1', port: agent.port });
  without.addRaspberryPi({ id: 'b', host: '127.0.0.1', port: agent.port, token: 'node-secret' }); // per device

  assert.equal((await withToken.request('a', { command: 'ping' })).message, 'pong');
  const denied = await without.request('a', { command: 'ping' });
  assert.equal(denied.success, false);
  assert.equal(denied.code, 'unauthorized');
  assert.equal((await without.request('b', { command: 'ping' })).message, 'pong');
});

test('loadDevices reads devices.json and resolves tokens from the environment', () => {
  const devices = loadDevices(path.join(REPO, 'devices.json'), { PI_AGENT_TOKEN: 'from-env' });
  assert.ok(devices.length >= 1);
  assert.ok(devices.every((d) => d.host === '127.0.0.1' && Number.isInteger(d.port) && d.token === 'from-env'));
  const bad = path.join(tempRoot(), 'devices.json');
  fs.writeFileSync(bad, JSON.stringify({ raspberryPiDevices: [{ id: 'x' }] }));
  assert.throws(() => loadDevices(bad), /raspberryPiDevices\[0\]: missing required field 'host'/);
});

test('unknown devices and bad configs are clear errors', () => {
  const client = new PiFleetClient();
  assert.throws(() => client.addRaspberryPi({ host: 'x' }), /id and a host/);
  assert.throws(() => client.connectToRaspberryPi('nope'), /no such device/);
});
