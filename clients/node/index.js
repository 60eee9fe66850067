'use strict';
/**
 * pifleet Node.js client: talk to pi-agents directly from a Node.js server.
 *
 * A drop-in for the HW_RASPI_MULTI controller (same five functions), plus
 * what it lacks: request() returns a Promise of the device's reply (matched
 * by id), every request has a timeout, connections reconnect with backoff and
 * jitter, a heartbeat ping notices dead links, the token is added to every
 * request, and replies nobody awaits (and agent events) go to onMessage.
 * With `tls: {ca, cert, key}` on a device, it speaks mutual TLS and requires
 * the agent's certificate to name that device id, as the Python controller does.
 *
 * No dependencies: Node.js 18 or newer.
 */

const net = require('node:net');
const tls = require('node:tls');
const fs = require('node:fs');
const path = require('node:path');
const { EventEmitter } = require('node:events');

const DEFAULTS = Object.freeze({
  requestTimeout: 30000, // ms
  connectTimeout: 5000, // ms
  heartbeatInterval: 15000, // ms; 0 turns the heartbeat off
  reconnect: true,
  backoffFirst: 500, // ms
  backoffMax: 30000, // ms
  maxLineBytes: 64 * 1024 * 1024,
});

/** An error about one device; `code` is the agent's code or one of ours. */
class PiFleetError extends Error {
  constructor(raspiId, code, message, reply) {
    super(`${raspiId}: ${message}`);
    this.name = 'PiFleetError';
    this.raspiId = raspiId;
    // 'timeout', 'unreachable', 'connection_lost', 'not_connected', 'protocol_error', 'tls_failed',
    // 'wrong_device', or the agent's code
    this.code = code;
    if (reply !== undefined) this.reply = reply;
  }
}

class Connection {
  constructor(config, options, fleet) {
    this.config = config;
    this.options = options;
    this.fleet = fleet;
    this.socket = null;
    this.connected = false;
    this.connecting = null;
    this.pending = new Map();
    this.partial = []; // chunks of a line not yet whole
    this.partialBytes = 0;
    this.lastError = null;
    this.reconnects = 0;
    this.attempt = 0;
    this.closed = false;
    this.reconnectTimer = null;
    this.heartbeatTimer = null;
    this.lastReplyAt = 0;
    this.openedAt = 0;
  }

  connect() {
    if (this.connected) return Promise.resolve();
    if (this.connecting) return this.connecting;
    this.closed = false;
    this.connecting = new Promise((resolve, reject) => {
      const secure = this.config.tls;
      const where = { host: this.config.host, port: this.config.port };
      const socket = secure
        ? tls.connect({ ...where, ca: secure.ca, cert: secure.cert, key: secure.key, servername: '',
          minVersion: 'TLSv1.2', checkServerIdentity: (host, cert) => this.checkIdentity(cert) })
        : net.createConnection(where);
      socket.setNoDelay(true);
      const timer = setTimeout(() => {
        socket.destroy();
        fail(new PiFleetError(this.config.id, 'unreachable', `no connection within ${this.options.connectTimeout} ms`));
      }, this.options.connectTimeout);
      const fail = (error) => {
        clearTimeout(timer);
        this.connecting = null;
        this.lastError = error.message;
        // A device that is down now is retried in the background (until close()).
        if (!this.closed && this.options.reconnect) this.scheduleReconnect();
        reject(error);
      };
      socket.once('error', (err) => fail(this.connectError(err)));
      socket.once(secure ? 'secureConnect' : 'connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        this.attach(socket);
        this.connecting = null;
        resolve();
      });
    });
    return this.connecting;
  }

  /** Over TLS: the agent's certificate must name this device id (a DNS subject alternative name). */
  checkIdentity(cert) {
    const names = String(cert.subjectaltname || '').split(', ').filter((n) => n.startsWith('DNS:')).map((n) => n.slice(4));
    if (names.includes(this.config.id)) return undefined;
    const error = new Error(`the agent there presented a certificate for ${names.join(', ') || 'nothing'}, ` +
      `not ${this.config.id}: a device cannot answer for another`);
    error.code = 'WRONG_DEVICE';
    return error;
  }

  /** Why a connection could not be made, in words, naming the device: unreachable, or a TLS refusal. */
  connectError(err) {
    const id = this.config.id;
    const address = `${this.config.host}:${this.config.port}`;
    if (err.code === 'WRONG_DEVICE') return new PiFleetError(id, 'wrong_device', `${address}: ${err.message}`);
    if (this.config.tls && /CERT|SSL|TLS|SELF_SIGNED|VERIFY/.test(String(err.code))) {
      return new PiFleetError(id, 'tls_failed', `${address}: TLS refused: the agent's certificate is not from ` +
        `this fleet's CA, has expired or was revoked (${err.code}: ${err.message})`);
    }
    const reasons = {
      ECONNREFUSED: 'connection refused (is pi-agent running there, on this port?)',
      EHOSTUNREACH: 'no route to the host (is it on the network?)',
      ENETUNREACH: 'no route to the network',
      ETIMEDOUT: 'the connection timed out (is the device up?)',
      ENOTFOUND: 'no such host name',
    };
    const reason = reasons[err.code] || `${err.code || ''} ${err.message}`.trim();
    return new PiFleetError(id, 'unreachable', `unreachable: ${address}: ${reason}`);
  }

  attach(socket) {
    this.socket = socket;
    this.connected = true;
    this.openedAt = Date.now();
    this.lastError = null;
    this.attempt = 0;
    this.partial = [];
    this.partialBytes = 0;
    socket.on('data', (chunk) => this.onData(chunk));
    socket.on('error', (err) => { this.lastError = err.code || err.message; });
    socket.on('close', () => this.onClose());
    this.fleet.emit('connected', this.config.id);
    if (this.options.heartbeatInterval > 0) {
      this.startHeartbeat();
      // Say who we are at once: the agent closes a connection that sends no authenticated request for
      // 10 s (so that strangers cannot hold its connection slots), and the first heartbeat is later.
      this.request({ command: 'ping' }, 10000).catch(() => {});
    }
  }

  onData(chunk) {
    // Split on newline bytes before decoding, so a UTF-8 character split across chunks survives.
    // Only the new chunk is searched, and the pieces of a line are joined once, when it is whole:
    // a reply that arrives in a thousand chunks costs one pass, not a thousand growing copies.
    let start = 0;
    let newline;
    while ((newline = chunk.indexOf(10, start)) !== -1) {
      const end = chunk.subarray(start, newline);
      const whole = this.partial.length ? Buffer.concat([...this.partial, end]) : end;
      this.partial = [];
      this.partialBytes = 0;
      const line = whole.toString('utf8').trim();
      if (line) this.onLine(line);
      start = newline + 1;
    }
    if (start < chunk.length) {
      this.partial.push(chunk.subarray(start));
      this.partialBytes += chunk.length - start;
    }
    if (this.partialBytes > this.options.maxLineBytes) {
      this.drop(`a reply longer than the client's limit of ${this.options.maxLineBytes} bytes (maxLineBytes)`);
    }
  }

  /** The device broke the protocol: fail what waits on it with `protocol_error`, and hang up. */
  drop(reason) {
    this.lastError = reason;
    for (const [id, waiter] of this.pending) {
      clearTimeout(waiter.timer);
      waiter.reject(new PiFleetError(this.config.id, 'protocol_error', reason));
      this.pending.delete(id);
    }
    this.socket.destroy();
  }

  onLine(line) {
    let message;
    try {
      message = JSON.parse(line);
    } catch (err) {
      const excerpt = JSON.stringify(line.slice(0, 40)) + (line.length > 40 ? '...' : '');
      this.drop(`the device answered ${excerpt}, which is not JSON ` +
        '(is something other than pi-agent listening on this port?)');
      return;
    }
    this.lastReplyAt = Date.now();
    const waiter = message && this.pending.get(message.id);
    if (waiter) {
      this.pending.delete(message.id);
      clearTimeout(waiter.timer);
      waiter.resolve(message);
    } else if (this.fleet.onMessage) {
      this.fleet.onMessage(this.config.id, message);
    }
    this.fleet.emit('message', this.config.id, message);
  }

  onClose() {
    const wasConnected = this.connected;
    this.connected = false;
    this.socket = null;
    this.stopHeartbeat();
    // A TLS connection closed before a single reply: the agent refused this client's certificate (with TLS 1.3
    // it checks it after the handshake has completed on our side), and nothing ran.
    const refused = this.config.tls && this.lastReplyAt < this.openedAt;
    for (const [id, waiter] of this.pending) {
      clearTimeout(waiter.timer);
      // Sent, never answered: the device may or may not have run it (the Python controller says the same).
      waiter.reject(refused
        ? new PiFleetError(this.config.id, 'tls_failed', `${this.config.host}:${this.config.port}: TLS refused: ` +
          "the agent refused this client's certificate (from another CA, expired, or revoked); nothing ran")
        : new PiFleetError(this.config.id, 'connection_lost',
          `${this.lastError || 'connection closed'} before it answered (it may or may not have run the request)`));
      this.pending.delete(id);
    }
    if (wasConnected) this.fleet.emit('disconnected', this.config.id);
    if (!this.closed && this.options.reconnect) this.scheduleReconnect();
  }

  scheduleReconnect() {
    if (this.reconnectTimer) return;
    const base = Math.min(this.options.backoffMax, this.options.backoffFirst * 2 ** this.attempt);
    const delay = base * (0.5 + Math.random()); // jitter: a fleet that lost its network does not return in lockstep
    this.attempt += 1;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.connect().then(() => {
        this.reconnects += 1;
        this.fleet.emit('reconnected', this.config.id);
      }, () => {
        if (!this.closed) this.scheduleReconnect();
      });
    }, delay);
  }

  startHeartbeat() {
    this.stopHeartbeat();
    this.heartbeatTimer = setInterval(() => {
      if (!this.connected || Date.now() - this.lastReplyAt < this.options.heartbeatInterval) return;
      this.request({ command: 'ping' }, Math.min(this.options.heartbeatInterval, 10000)).catch(() => {
        if (this.socket) this.socket.destroy(); // dead link: reconnect
      });
    }, this.options.heartbeatInterval);
    this.heartbeatTimer.unref();
  }

  stopHeartbeat() {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }

  write(command, id) {
    const payload = { ...command, id };
    const token = this.config.token !== undefined ? this.config.token : this.fleet.token;
    if (token) payload.token = token;
    this.socket.write(JSON.stringify(payload) + '\n');
  }

  request(command, timeout) {
    if (!this.connected) {
      return Promise.reject(new PiFleetError(this.config.id, 'not_connected', this.lastError || 'not connected'));
    }
    const id = this.fleet.nextId();
    const limit = timeout === undefined ? this.options.requestTimeout : timeout;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new PiFleetError(this.config.id, 'timeout',
          `no reply to '${command.command}' within ${limit} ms (the device is busy or hung; pass a longer {timeout} for slow commands)`));
      }, limit);
      this.pending.set(id, { resolve, reject, timer });
      this.write(command, id);
    });
  }

  close() {
    this.closed = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.stopHeartbeat();
    if (this.socket) this.socket.destroy();
  }

  status() {
    return {
      id: this.config.id,
      name: this.config.name || this.config.id,
      host: this.config.host,
      port: this.config.port,
      connected: this.connected,
      lastError: this.lastError,
      reconnects: this.reconnects,
    };
  }
}

class PiFleetClient extends EventEmitter {
  /**
   * @param {object} [options]
   * @param {string} [options.token] sent with every request (a device's own `token` wins)
   * @param {(raspiId: string, message: object) => void} [options.onMessage] replies nobody awaits, and events
   * @param {number} [options.requestTimeout=30000] ms
   */
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    this.token = options.token;
    this.onMessage = options.onMessage;
    this.devices = new Map();
    this.counter = 0;
  }

  nextId() {
    this.counter += 1;
    return `n${this.counter}`;
  }

  // HW_RASPI_MULTI's five functions

  /** Add a device: {id, host, port, name?, type?, description?, token?}. */
  addRaspberryPi(config) {
    if (!config || typeof config.id !== 'string' || !config.host) {
      throw new TypeError('addRaspberryPi needs a config with at least an id and a host');
    }
    if (this.devices.has(config.id)) throw new Error(`device ${config.id} is already added`);
    this.devices.set(config.id, new Connection({ port: 3000, ...config }, this.options, this));
    return true;
  }

  /** Connect one device. Resolves when connected; rejects (code 'unreachable') when it cannot. */
  connectToRaspberryPi(raspiId) {
    return this.device(raspiId).connect();
  }

  /** Fire and forget, as the original: true if the command was written. The reply goes to onMessage. */
  sendCommandToRaspberryPi(raspiId, command) {
    const connection = this.devices.get(raspiId);
    if (!connection || !connection.connected) return false;
    connection.write(command, this.nextId());
    return true;
  }

  /** Fire and forget to every connected device: {raspiId: written}. */
  sendCommandToAllRaspberryPis(command) {
    const sent = {};
    for (const raspiId of this.devices.keys()) sent[raspiId] = this.sendCommandToRaspberryPi(raspiId, command);
    return sent;
  }

  /** {raspiId: {id, name, host, port, connected, lastError, reconnects}} */
  getConnectionStatus() {
    const status = {};
    for (const [raspiId, connection] of this.devices) status[raspiId] = connection.status();
    return status;
  }

  // What the original lacks

  /** The device's reply to `command` (it may say success: false); rejects on timeout or a lost link. */
  async request(raspiId, command, { timeout } = {}) {
    const connection = this.device(raspiId);
    if (!connection.connected) await connection.connect();
    return connection.request(command, timeout);
  }

  /** One settled result per device: {raspiId: {status: 'fulfilled', value} | {status: 'rejected', reason}}. */
  async requestAll(command, { timeout, targets } = {}) {
    const ids = targets || [...this.devices.keys()];
    const settled = await Promise.allSettled(ids.map((raspiId) => this.request(raspiId, command, { timeout })));
    const results = {};
    ids.forEach((raspiId, index) => { results[raspiId] = settled[index]; });
    return results;
  }

  /** Connect every device; resolves to {raspiId: true | PiFleetError}. */
  async connectAll() {
    const ids = [...this.devices.keys()];
    const settled = await Promise.allSettled(ids.map((raspiId) => this.connectToRaspberryPi(raspiId)));
    const results = {};
    ids.forEach((raspiId, index) => { results[raspiId] = settled[index].status === 'fulfilled' ? true : settled[index].reason; });
    return results;
  }

  /** Close every connection and stop reconnecting. */
  close() {
    for (const connection of this.devices.values()) connection.close();
  }

  device(raspiId) {
    const connection = this.devices.get(raspiId);
    if (!connection) throw new PiFleetError(raspiId, 'unknown_device', 'no such device (addRaspberryPi it first)');
    return connection;
  }
}

/**
 * Read a pifleet devices.json into device configs for addRaspberryPi.
 * Tokens come from each entry's `token`, or from the environment variable named by
 * its `token_env` (or the file's defaults.token_env, PI_AGENT_TOKEN by default).
 */
function loadDevices(path, env = process.env) {
  const data = JSON.parse(fs.readFileSync(path, 'utf8'));
  const defaults = data.defaults || {};
  if (!Array.isArray(data.raspberryPiDevices)) {
    throw new Error(`${path}: "raspberryPiDevices" must be a list of devices`);
  }
  const seen = new Set();
  return data.raspberryPiDevices.map((entry, index) => {
    const where = `${path}: raspberryPiDevices[${index}]`;
    for (const field of ['id', 'host']) {
      if (!entry[field]) throw new Error(`${where}: missing required field '${field}'`);
    }
    if (seen.has(entry.id)) throw new Error(`${where}: duplicate id '${entry.id}'`);
    seen.add(entry.id);
    const port = entry.port !== undefined ? entry.port : (defaults.port || 3000);
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`${where}: 'port' must be 1-65535`);
    const tokenEnv = entry.token_env || defaults.token_env || 'PI_AGENT_TOKEN';
    const token = entry.token || env[tokenEnv] || undefined;
    return { ...entry, port, token, tls: tlsFiles(entry, defaults, where, path) };
  });
}

/** `"tls": true` with `ca`, `cert`, `key` paths (the entry's or defaults', relative to devices.json): their contents. */
function tlsFiles(entry, defaults, where, inventoryPath) {
  const enabled = entry.tls !== undefined ? entry.tls : defaults.tls;
  if (!enabled) return undefined;
  const files = {};
  for (const name of ['ca', 'cert', 'key']) {
    const value = entry[name] || defaults[name];
    if (typeof value !== 'string' || !value) {
      throw new Error(`${where}: with "tls": true, '${name}' must name a file (in the entry or in defaults)`);
    }
    files[name] = fs.readFileSync(path.resolve(path.dirname(inventoryPath), value));
  }
  return files;
}

module.exports = { PiFleetClient, PiFleetError, loadDevices, DEFAULTS };
