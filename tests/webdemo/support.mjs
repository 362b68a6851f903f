// Processes for the live tests of web-demo/grpc-web.js: User/Echo service replicas and the proxy on
// loopback, as tests/integration/conftest.py starts them. The proxy's YAML is built by
// tests/support/envoy_yaml.py (run through python3), the same blocks every other test uses.

import { spawn, execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.BIN_DIR || path.join(ROOT, '.build', 'debug');
export const PROXY_BIN = process.env.PROXY_BIN || path.join(BIN, 'grpc-web-proxy');
export const USER_SERVICE_BIN = process.env.USER_SERVICE_BIN || path.join(BIN, 'user-service');

/** Why the live tests cannot run here, or null. */
export function missingBinaries() {
  const missing = [PROXY_BIN, USER_SERVICE_BIN].filter((p) => !existsSync(p));
  return missing.length ? `not built: ${missing.join(', ')} (swift build)` : null;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function canConnect(port) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

export async function waitForPort(port, child, describe, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`${describe} exited (${child.exitCode ?? child.signalCode}): ${child.output()}`);
    }
    if (await canConnect(port)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${describe}: nothing listening on ${port} after ${timeoutMs} ms: ${child.output()}`);
}

// As tests/support/processes.py: the proxy and the User service run as their users run them, as
// `nobody` with no capabilities, when the tests run as root.
const UNPRIVILEGED = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all',
  '--bounding-set=-all', '--no-new-privs', '--'];

function startProcess(command, args, logPath) {
  const log = openSync(logPath, 'w');
  const argv = process.geteuid() === 0 ? [...UNPRIVILEGED, command, ...args] : [command, ...args];
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', log, log] });
  child.output = () => (existsSync(logPath) ? readFileSync(logPath, 'utf8') : '');
  child.stop = () => new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
    setTimeout(() => child.kill('SIGKILL'), 10000).unref();
  });
  return child;
}

/** A user-service replica (demo.User and demo.Echo) on 127.0.0.1. */
export async function startReplica(name, dir) {
  const port = await freePort();
  const child = startProcess(USER_SERVICE_BIN, ['--host', '127.0.0.1', '--port', String(port), '--replica', name],
    path.join(dir, `replica-${name}.log`));
  await waitForPort(port, child, `user-service ${name}`);
  return { name, port, stop: child.stop };
}

/**
 * Envoy-shaped YAML for one listener on `port` with `virtualHosts` (YAML indented for
 * route_config.virtual_hosts) and HTTP/2 clusters {name: [ports]}, from tests/support/envoy_yaml.py.
 */
export function proxyConfig(port, virtualHosts, clusters) {
  const script = [
    'import json, sys',
    `sys.path.insert(0, ${JSON.stringify(path.join(ROOT, 'tests', 'support'))})`,
    'import envoy_yaml as e',
    'a = json.load(sys.stdin)',
    "print(e.config([e.listener('webdemo', a['port'], a['vhosts'])],"
      + " [e.cluster(n, ps, connect_timeout='0.5s') for n, ps in a['clusters'].items()]))",
  ].join('\n');
  return execFileSync('python3', ['-c', script], {
    input: JSON.stringify({ port, vhosts: virtualHosts, clusters }),
    encoding: 'utf8',
  });
}

/** The proxy with `configText` written to a file in `dir`; resolves once it listens on `port`. */
export async function startProxy(configText, port, dir) {
  const config = path.join(dir, 'envoy.yaml');
  writeFileSync(config, configText);
  const child = startProcess(PROXY_BIN, ['-c', config], path.join(dir, 'proxy.log'));
  await waitForPort(port, child, 'grpc-web-proxy');
  return { port, url: `http://127.0.0.1:${port}`, stop: child.stop, output: child.output };
}

export function tempDir() {
  const dir = mkdtempSync(path.join(tmpdir(), 'webdemo-'));
  chmodSync(dir, 0o755); // the unprivileged proxy reads its configuration from here
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}
