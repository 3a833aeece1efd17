#!/usr/bin/env node
// A flowfabric worker in Node.js with `pg`.
//
// LISTENs on its lane's channel instead of polling, claims one execution at
// a time, renews the lease on long work, reports token usage against the
// budget named in the payload, then completes or fails the execution.
// Payload keys: work_ms, tokens, budget, fail. Prints one JSON summary line
// when it exits.
'use strict';
const { Client } = require('pg');

const LEASE_MS = 10000;

function parseArgs(argv) {
  const args = { workerId: 'node-worker', idleExitS: null, capabilities: [] };
  for (let i = 2; i < argv.length; i += 2) {
    const [k, v] = [argv[i], argv[i + 1]];
    if (k === '--dsn') args.dsn = v;
    else if (k === '--lane') args.lane = v;
    else if (k === '--worker-id') args.workerId = v;
    else if (k === '--capability') args.capabilities.push(v);
    else if (k === '--idle-exit-s') args.idleExitS = Number(v);
    else throw new Error(`unknown argument ${k}`);
  }
  if (!args.dsn || !args.lane) throw new Error('usage: worker.js --dsn DSN --lane LANE [--worker-id ID] [--idle-exit-s S]');
  return args;
}

// pg takes a connection string; accept libpq key=value DSNs too.
function clientFor(dsn) {
  if (dsn.includes('://')) return new Client({ connectionString: dsn });
  const cfg = {};
  for (const part of dsn.trim().split(/\s+/)) {
    const [k, v] = part.split('=');
    cfg[{ dbname: 'database' }[k] || k] = v;
  }
  return new Client(cfg);
}

class Worker {
  constructor(args) {
    this.args = args;
    this.instance = `${args.workerId}-${Date.now()}`;
    this.stats = { worker: args.workerId, lang: 'node', completed: 0, failed: 0, lost: 0, budget_refused: 0 };
    this.stopping = false;
    this.wake = null;
  }

  async start() {
    this.db = clientFor(this.args.dsn);
    this.listener = clientFor(this.args.dsn);
    await this.db.connect();
    await this.listener.connect();
    const { rows } = await this.db.query('SELECT ff_lane_channel($1) AS channel', [this.args.lane]);
    this.listener.on('notification', () => { if (this.wake) this.wake(); });
    await this.listener.query(`LISTEN "${rows[0].channel.replace(/"/g, '""')}"`);
  }

  waitForWork(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => { this.wake = null; resolve(); }, ms);
      this.wake = () => { clearTimeout(timer); this.wake = null; resolve(); };
    });
  }

  async claim() {
    const { rows } = await this.db.query(
      'SELECT execution_id, grant_key FROM ff_claim_for_worker($1, $2, $3, $4, grant_ttl_ms => $5)',
      [this.args.lane, this.args.workerId, this.instance, this.args.capabilities, LEASE_MS]);
    return rows[0] || null;
  }

  async handle(id, grant) {
    const info = await this.db.query("SELECT ff_get_execution($1) -> 'payload' AS payload", [id]);
    const payload = info.rows[0].payload || {};
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    try {
      const workMs = Number(payload.work_ms || 0);
      await sleep(workMs / 2);
      if (workMs > 0) await this.db.query('SELECT ff_renew_lease($1, $2, $3)', [id, grant, LEASE_MS]);
      await sleep(workMs / 2);
      if (payload.fail) {
        await this.db.query('SELECT ff_fail_execution($1, $2, $3, false)', [id, grant, payload.error || 'task failed']);
        this.stats.failed += 1;
        return;
      }
      if (payload.budget && payload.tokens) {
        const spend = await this.db.query(
          'SELECT outcome FROM ff_record_spend($1, $2, $3, $4)',
          [payload.budget, id, JSON.stringify({ tokens: Number(payload.tokens) }), `${id}/${grant.slice(-16)}`]);
        if (spend.rows[0].outcome === 'hard_breach') {
          await this.db.query("SELECT ff_fail_execution($1, $2, 'budget exhausted', false)", [id, grant]);
          this.stats.budget_refused += 1;
          return;
        }
      }
      await this.db.query('SELECT ff_complete_execution($1, $2, $3)',
        [id, grant, JSON.stringify({ worker: this.args.workerId, lang: 'node' })]);
      this.stats.completed += 1;
    } catch (e) {
      if (e.code === '55000') { this.stats.lost += 1; return; } // lease gone: cancelled or reclaimed
      throw e;
    }
  }

  async run() {
    let idleSince = Date.now();
    while (!this.stopping) {
      const row = await this.claim();
      if (row) {
        await this.handle(row.execution_id, row.grant_key);
        idleSince = Date.now();
        continue;
      }
      const idleMs = Date.now() - idleSince;
      if (this.args.idleExitS !== null && idleMs >= this.args.idleExitS * 1000) break;
      const limit = this.args.idleExitS === null ? 5000 : Math.min(5000, this.args.idleExitS * 1000);
      await this.waitForWork(limit);
    }
    await this.db.end();
    await this.listener.end();
    return this.stats;
  }
}

async function main() {
  const worker = new Worker(parseArgs(process.argv));
  process.on('SIGTERM', () => { worker.stopping = true; if (worker.wake) worker.wake(); });
  await worker.start();
  const stats = await worker.run();
  console.log(JSON.stringify(stats));
}

main().catch((e) => { console.error(e); process.exit(1); });
