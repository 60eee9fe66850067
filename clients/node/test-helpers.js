'use strict';
// Start real Python agents on 127.0.0.1 for the tests: `python -m agent --port 0` in a temp folder.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const REPO = path.resolve(__dirname, '..', '..');
const PYTHON = process.env.PIFLEET_PYTHON || 'python3';

function tempRoot(prefix = 'pifleet-node-') {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Start an agent; resolves to {port, root, process, stop()} once it prints "listening on". */
function startAgent({ root = tempRoot(), args = [], env = {} } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(PYTHON, ['-m', 'agent', '--host', '127.0.0.1', '--port', '0', '--root', root, ...args], {
      cwd: REPO, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d) => { stderr += d; });
    const lines = readline.createInterface({ input: child.stdout });
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`agent did not start: ${stderr}`)); }, 20000);
    lines.once('line', (line) => {
      clearTimeout(timer);
      const match = /listening on [^ ]+:(\d+)/.exec(line);
      if (!match) { child.kill('SIGKILL'); reject(new Error(`unexpected first line: ${line} ${stderr}`)); return; }
      const agent = {
        port: Number(match[1]), root, process: child,
        stop(signal = 'SIGTERM') {
          return new Promise((done) => {
            if (child.exitCode !== null || child.signalCode !== null) { done(); return; }
            child.once('exit', () => done());
            child.kill(signal);
          });
        },
      };
      resolve(agent);
    });
    child.once('error', (err) => { clearTimeout(timer); reject(err); });
  });
}

/**
 * A fleet CA made by the Python controller (fleet/ca.py) in `dir`: device certificates for d0 and d1, a
 * controller's, and one from another CA; and a release key with its public half in dir/trusted.
 * Resolves to their paths.
 */
function makePki(dir) {
  const script = `
import json, sys
from pathlib import Path
from fleet.ca import FleetCA
from fleet.keys import init_key
base = Path(sys.argv[1])
ca = FleetCA(base / "ca"); ca.init()
out = {"ca": str(ca.cert_path), "crl": str(ca.crl_path)}
for d in ("d0", "d1"):
    i = ca.issue(d, base / d); out[d] = {"cert": str(i.cert), "key": str(i.key)}
c = ca.issue("node", base / "node", kind="controller"); out["controller"] = {"cert": str(c.cert), "key": str(c.key)}
other = FleetCA(base / "other"); other.init()
s = other.issue("node", base / "stranger", kind="controller"); out["stranger"] = {"cert": str(s.cert), "key": str(s.key)}
key, pub, key_id = init_key(base / "keys"); (base / "trusted").mkdir(); (base / "trusted" / "release.pub").write_bytes(pub.read_bytes())
out.update(signing_key=str(key), trusted=str(base / "trusted"))
print(json.dumps(out))
`;
  return runPython(['-c', script, dir]).then((text) => JSON.parse(text));
}

/** The base64 signature of `code` as handler file `filename`, by the release key at `keyPath` (fleet/keys.py). */
function sign(keyPath, filename, code) {
  const script = `
import hashlib, json, sys
from fleet.keys import load_key
key = load_key(sys.argv[1])
code = sys.stdin.read()
print(json.dumps({"signature": key.sign(sys.argv[2], hashlib.sha256(code.encode()).hexdigest()), "key_id": key.key_id}))
`;
  return runPython(['-c', script, keyPath, filename], code).then((text) => JSON.parse(text));
}

function runPython(args, input = '') {
  return new Promise((resolve, reject) => {
    const child = spawn(PYTHON, args, { cwd: REPO, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { err += d; });
    child.once('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`python failed: ${err}`))));
    child.stdin.end(input);
  });
}

function fixture(name) {
  return fs.readFileSync(path.join(REPO, 'tests', 'fixtures', name), 'utf8');
}

module.exports = { REPO, startAgent, tempRoot, fixture, makePki, sign };
