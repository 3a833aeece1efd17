#!/usr/bin/env node
// A flowfabric worker in Node.js with `pg`.
//
// LISTENs on its lanes' channels instead of polling and claims up to
// --batch executions at a time with ff_claim_batch (each row carries the
// payload). For each one it does the "work", renews the lease on long work,
// reads upstream results with ff_get_inputs when the payload asks, then
// records token spend and completes in one transaction; a spend refused
// with hard_breach fails the execution for good instead. Calls are
// schema-qualified (flowfabric.ff_...).
// Payload keys: work_ms, tokens, budget, inputs, fail, error. Prints one
// JSON summary line when it exits.
'use strict';
const { Client } = require('pg');

const LEASE_MS = 10000;

function parseArgs(argv) {
  const args = { workerId: 'node-worker', idleExitS: null, capabilities: [], lanes: [], batch: 10 };
  for (let i = 2; i < argv.length; i += 2) {
    const [k, v] = [argv[i], argv[i + 1]];
    if (k === '--dsn') args.dsn = v;
    else if (k === '--lane') args.lanes.push(v);
    else if (k === '--worker-id') args.workerId = v;
    else if (k === '--capability') args.capabilities.push(v);
    else if (k === '--batch') args.batch = Number(v);
    else if (k === '--idle-exit-s') args.idleExitS = Number(v);
    else throw new Error(`unknown argument ${k}`);
  }
  if (!args.dsn || !args.lanes.length) {
    throw new Error('usage: worker.js --dsn DSN --lane LANE [--lane ...] [--worker-id ID] [--batch N] [--idle-exit-s S]');
  }
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
    this.stats = { worker: args.workerId, lang: 'node', completed: 0, failed: 0, lost: 0, budget_refused: 0, tokens: 0 };
    this.stopping = false;
    this.wake = null;
  }

  async start() {
    this.db = clientFor(this.args.dsn);
    this.listener = clientFor(this.args.dsn);
    await this.db.connect();
    await this.listener.connect();
    this.listener.on('notification', () => { if (this.wake) this.wake(); });
    for (const lane of this.args.lanes) {
      const { rows } = await this.db.query('SELECT flowfabric.ff_lane_channel($1) AS channel', [lane]);
      await this.listener.query(`LISTEN "${rows[0].channel.replace(/"/g, '""')}"`);
    }
  }

  waitForWork(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => { this.wake = null; resolve(); }, ms);
      this.wake = () => { clearTimeout(timer); this.wake = null; resolve(); };
    });
  }

  // One transaction of its own: the leases are held once it commits.
  async claim() {
    const { rows } = await this.db.query(
      'SELECT execution_id, grant_key, payload, attempt FROM flowfabric.ff_claim_batch($1, $2, $3, $4, grant_ttl_ms => $5, max_count => $6)',
      [this.args.lanes, this.args.workerId, this.instance, this.args.capabilities, LEASE_MS, this.args.batch]);
    return rows;
  }

  async handle({ execution_id: id, grant_key: grant, payload, attempt }) {
    payload = payload || {};
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    try {
      const workMs = Number(payload.work_ms || 0);
      await sleep(workMs / 2);
      if (workMs > 0) await this.db.query('SELECT flowfabric.ff_renew_lease($1, $2, $3)', [id, grant, LEASE_MS]);
      await sleep(workMs / 2);
      let inputs = {};
      if (payload.inputs) {
        inputs = (await this.db.query('SELECT flowfabric.ff_get_inputs($1) AS inputs', [id])).rows[0].inputs;
      }
      if (payload.fail) {
        await this.db.query('SELECT flowfabric.ff_fail_execution($1, $2, $3, false)', [id, grant, payload.error || 'task failed']);
        this.stats.failed += 1;
        return;
      }
      const result = { worker: this.args.workerId, lang: 'node', attempt, inputs: Object.keys(inputs).sort() };
      await this.db.query('BEGIN');
      try {
        if (payload.budget && payload.tokens) {
          const tokens = Number(payload.tokens);
          const spend = await this.db.query(
            'SELECT outcome FROM flowfabric.ff_record_spend($1, $2, $3, $4)',
            [payload.budget, id, JSON.stringify({ tokens }), `${id}/attempt-${attempt}`]);
          if (spend.rows[0].outcome === 'hard_breach') {
            // The spend was not booked: the budget is exhausted.
            await this.db.query("SELECT flowfabric.ff_fail_execution($1, $2, 'budget exhausted', false)", [id, grant]);
            await this.db.query('COMMIT');
            this.stats.budget_refused += 1;
            return;
          }
          this.stats.tokens += tokens;
        }
        await this.db.query('SELECT flowfabric.ff_complete_execution($1, $2, $3)', [id, grant, JSON.stringify(result)]);
        await this.db.query('COMMIT');
      } catch (e) {
        await this.db.query('ROLLBACK');
        throw e;
      }
      this.stats.completed += 1;
    } catch (e) {
      if (e.code === '55000') { this.stats.lost += 1; return; } // lease gone: cancelled or reclaimed
      throw e;
    }
  }

  async run() {
    let idleSince = Date.now();
    while (!this.stopping) {
      const rows = await this.claim();
      for (const row of rows) await this.handle(row);
      if (rows.length) {
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
