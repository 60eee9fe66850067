'use strict';
// Node.js over mutual TLS to real Python agents: the fleet CA's certificates, the device id check,
// signatures passed through unchanged, and errors that say which device and why.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');

const { PiFleetClient, loadDevices } = require('..');
const { startAgent, tempRoot, makePki, sign } = require('../test-helpers');

const V1 = "VERSION = 1\n\ndef handle_version(data):\n    return {'version': VERSION}\n";
const MARK = "import os\n\ndef handle_mark(data):\n    open(os.path.join(os.path.dirname(__file__), '..', 'marked'), 'w').close()\n    return {}\n";

function tlsArgs(pki, device) {
  return ['--tls-cert', pki[device].cert, '--tls-key', pki[device].key, '--tls-ca', pki.ca, '--tls-crl', pki.crl];
}

function clientFor(pki, who, id, port) {
  const client = new PiFleetClient({ heartbeatInterval: 0, reconnect: false });
  client.addRaspberryPi({
    id, host: '127.0.0.1', port,
    tls: { ca: fs.readFileSync(pki.ca), cert: fs.readFileSync(pki[who].cert), key: fs.readFileSync(pki[who].key) },
  });
  return client;
}

test('over mutual TLS the client deploys signed code, and an unsigned push is refused', async (t) => {
  const dir = tempRoot();
  const pki = await makePki(dir);
  const agent = await startAgent({ args: [...tlsArgs(pki, 'd0'), '--trusted-keys', pki.trusted] });
  t.after(() => agent.stop());
  const client = clientFor(pki, 'controller', 'd0', agent.port);
  t.after(() => client.close());

  assert.equal((await client.request('d0', { command: 'ping' })).success, true);
  const signature = await sign(pki.signing_key, 'ver.py', V1);
  const pushed = await client.request('d0', { command: 'update_handler', filename: 'ver.py', code: V1, ...signature });
  assert.equal(pushed.success, true, JSON.stringify(pushed));
  assert.equal((await client.request('d0', { command: 'version' })).version, 1);
  const unsigned = await client.request('d0', { command: 'update_handler', filename: 'ver.py', code: V1 + '# 2\n' });
  assert.equal(unsigned.code, 'unsigned');
});

test('an agent with another device\'s certificate is refused before anything is sent', async (t) => {
  const pki = await makePki(tempRoot());
  const root = tempRoot();
  fs.mkdirSync(path.join(root, 'handlers'));
  fs.writeFileSync(path.join(root, 'handlers', 'mark.py'), MARK);
  const impostor = await startAgent({ root, args: tlsArgs(pki, 'd1') });
  t.after(() => impostor.stop());
  const client = clientFor(pki, 'controller', 'd0', impostor.port);
  t.after(() => client.close());
  await assert.rejects(client.request('d0', { command: 'mark' }), (err) => {
    assert.equal(err.code, 'wrong_device');
    assert.match(err.message, /^d0: .*presented a certificate for d1, not d0/);
    return true;
  });
  assert.equal(fs.existsSync(path.join(root, 'marked')), false);
});

test('a certificate from another CA is refused by the agent and nothing runs', async (t) => {
  const pki = await makePki(tempRoot());
  const root = tempRoot();
  fs.mkdirSync(path.join(root, 'handlers'));
  fs.writeFileSync(path.join(root, 'handlers', 'mark.py'), MARK);
  const agent = await startAgent({ root, args: tlsArgs(pki, 'd0') });
  t.after(() => agent.stop());
  const client = clientFor(pki, 'stranger', 'd0', agent.port);
  t.after(() => client.close());
  await assert.rejects(client.request('d0', { command: 'mark' }), (err) => {
    assert.equal(err.code, 'tls_failed');
    assert.match(err.message, /^d0: .*TLS refused/);
    return true;
  });
  assert.equal(fs.existsSync(path.join(root, 'marked')), false);
});

test('an offline device\'s error names it and says it is unreachable', async () => {
  const client = new PiFleetClient({ heartbeatInterval: 0, reconnect: false });
  client.addRaspberryPi({ id: 'raspi_pit', host: '127.0.0.1', port: 1 });
  await assert.rejects(client.request('raspi_pit', { command: 'ping' }), (err) => {
    assert.equal(err.code, 'unreachable');
    assert.equal(err.message, 'raspi_pit: unreachable: 127.0.0.1:1: connection refused (is pi-agent running there, on this port?)');
    return true;
  });
  client.close();
});

test('loadDevices reads the TLS files a devices.json names, relative to it', async () => {
  const dir = tempRoot();
  fs.mkdirSync(path.join(dir, 'pki'));
  for (const name of ['ca.crt', 'me.crt', 'me.key']) fs.writeFileSync(path.join(dir, 'pki', name), `${name} PEM`);
  const inventory = path.join(dir, 'devices.json');
  fs.writeFileSync(inventory, JSON.stringify({
    defaults: { tls: true, ca: 'pki/ca.crt', cert: 'pki/me.crt', key: 'pki/me.key' },
    raspberryPiDevices: [{ id: 'd0', host: '10.0.0.5' }, { id: 'd1', host: '10.0.0.6', tls: false }],
  }));
  const [d0, d1] = loadDevices(inventory);
  assert.equal(d0.tls.cert.toString(), 'me.crt PEM');
  assert.equal(d1.tls, undefined);
});
