// The reference of caudal's `workflow-chain` benchmark: a chain of N jobs in
// graphile-worker on the same PostgreSQL, each job adding the next one as
// its last act. Latency of one link: from the end of a job's function
// (after it added the next job) to the start of the next job's function,
// both read from one monotonic clock in this process. Prints one JSON line.
//   node chain.js postgres://… 200
const { run } = require("graphile-worker");

const [connectionString, countText] = process.argv.slice(2);
const count = Number(countText || 200);
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms

async function main() {
  const latencies = [];
  let endedAt = null;
  let done;
  const finished = new Promise((resolve) => (done = resolve));
  const runner = await run({
    connectionString,
    concurrency: 1,
    noHandleSignals: true,
    pollInterval: 2000,
    logger: new (require("graphile-worker").Logger)(() => () => {}),
    taskList: {
      link: async (payload, helpers) => {
        const startedAt = now();
        if (endedAt !== null) latencies.push(startedAt - endedAt);
        if (payload.i >= count) {
          done();
          return;
        }
        await helpers.addJob("link", { i: payload.i + 1 });
        endedAt = now();
      },
    },
  });
  const started = now();
  await runner.addJob("link", { i: 1 });
  await finished;
  const total = now() - started;
  await runner.stop();
  latencies.sort((a, b) => a - b);
  const pick = (q) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))];
  console.log(JSON.stringify({ links: latencies.length, p50_ms: pick(0.5), p99_ms: pick(0.99), max_ms: latencies[latencies.length - 1], total_ms: total }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
