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

function fixture(name) {
  return fs.readFileSync(path.join(REPO, 'tests', 'fixtures', name), 'utf8');
}

module.exports = { REPO, startAgent, tempRoot, fixture };
