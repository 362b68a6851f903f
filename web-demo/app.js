// The demo page: logs a user in and out through the proxy with grpc-web.js and lists every call.
//
// Stable hooks for tests: #proxy, #mode-binary, #mode-text, #username, #password, #login, #logout,
// #status (data-state = idle|pending|ok|error, data-code), and one `#calls tbody tr` per finished
// call, newest first, with data-seq, data-method, data-mode, data-code, data-code-name,
// data-replica and data-ok.

import { GrpcError, GrpcWebClient, StatusCode, codeName } from './grpc-web.js';
import { UserClient } from './demo-user.js';

const DEADLINE_MS = 10000;
const $ = (id) => document.getElementById(id);

/** The proxy to call: `?proxy=URL`, else this page's own origin (the proxy can serve the page). */
export function defaultProxy(location) {
  const fromQuery = new URLSearchParams(location.search).get('proxy');
  if (fromQuery) return fromQuery;
  if (location.protocol === 'http:' || location.protocol === 'https:') return location.origin;
  return 'http://127.0.0.1:8080';
}

let seq = 0;

function selectedMode() {
  return $('mode-text').checked ? 'text' : 'binary';
}

function setStatus(state, text, code) {
  const status = $('status');
  status.dataset.state = state;
  if (code === undefined) delete status.dataset.code;
  else status.dataset.code = String(code);
  status.textContent = text;
}

function cell(text, className) {
  const td = document.createElement('td');
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function addRow({ method, mode, code, message, replica, ms }) {
  seq += 1;
  const tr = document.createElement('tr');
  const name = codeName(code);
  Object.assign(tr.dataset, {
    seq: String(seq), method, mode, code: String(code), codeName: name, replica, ok: String(code === StatusCode.OK),
  });
  const time = new Date().toLocaleTimeString([], { hour12: false });
  tr.append(cell(String(seq), 'num'), cell(time, 'mono'), cell(method, 'mono'), cell(mode, 'mono'));
  const status = document.createElement('td');
  const badge = document.createElement('span');
  badge.className = 'code';
  badge.textContent = `${code} ${name}`;
  status.append(badge);
  tr.append(status, cell(message, 'message'));
  const replicaCell = document.createElement('td');
  if (replica) {
    const tag = document.createElement('span');
    tag.className = 'replica';
    tag.textContent = replica;
    replicaCell.append(tag);
  } else {
    replicaCell.textContent = '—';
  }
  tr.append(replicaCell, cell(ms.toFixed(1), 'num'));
  $('calls').tBodies[0].prepend(tr);
  $('call-count').textContent = String(seq);
  $('calls-empty').hidden = true;
}

/** A readable one-line outcome for an error (a GrpcError, or anything else thrown). */
export function describeError(err) {
  if (err instanceof GrpcError) {
    const http = err.httpStatus && (err.httpStatus < 200 || err.httpStatus > 299) ? ` (HTTP ${err.httpStatus})` : '';
    return { code: err.code, message: `${err.message || '(no message)'}${http}`, replica: err.metadata['x-replica'] || '' };
  }
  return { code: StatusCode.UNKNOWN, message: String(err && err.message ? err.message : err), replica: '' };
}

async function run(method) {
  const mode = selectedMode();
  const proxy = $('proxy').value.trim();
  const username = $('username').value.trim();
  let users;
  try {
    const url = new URL(proxy);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error('not http(s)');
    users = new UserClient(new GrpcWebClient(proxy, { mode }));
  } catch {
    setStatus('error', `Invalid proxy address ${JSON.stringify(proxy)}: write it like http://127.0.0.1:8080`);
    return;
  }
  setStatus('pending', `Calling ${method} (${mode}) on ${proxy} …`);
  const started = performance.now();
  try {
    const result = method === 'login'
      ? await users.login({ username, password: $('password').value }, { deadlineMs: DEADLINE_MS })
      : await users.logout({ username }, { deadlineMs: DEADLINE_MS });
    const ms = performance.now() - started;
    const { reply, replica } = result;
    addRow({ method, mode, code: StatusCode.OK, message: reply.res, replica, ms });
    setStatus('ok', `OK — ${reply.res}${replica ? ` (replica ${replica})` : ''}`, StatusCode.OK);
  } catch (err) {
    const ms = performance.now() - started;
    const { code, message, replica } = describeError(err);
    addRow({ method, mode, code, message, replica, ms });
    setStatus('error', `${codeName(code)} (${code}): ${message}`, code);
    if (!(err instanceof GrpcError)) console.error(err);
  }
}

function init() {
  $('proxy').value = defaultProxy(window.location);
  $('login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    run('login');
  });
  $('logout').addEventListener('click', () => run('logout'));
  $('clear').addEventListener('click', () => {
    $('calls').tBodies[0].replaceChildren();
    seq = 0;
    $('call-count').textContent = '0';
    $('calls-empty').hidden = false;
    setStatus('idle', 'No call yet.');
  });
  document.body.dataset.ready = 'true';
}

if (typeof document !== 'undefined') {
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
}
