// The reference of caudal's `cluster-dispatch` benchmark: N jobs queued in
// graphile-worker on the same PostgreSQL, each running `true` as a child
// process (the same work as caudal's no-op command task), run by one
// worker process with the given concurrency. Rate: N over the time from the
// first job's start to the last job's end, read from one monotonic clock in
// this process. Prints one JSON line.
//   node dispatch.js postgres://… 5000 16
const { run, makeWorkerUtils, Logger } = require("graphile-worker");
const { execFile } = require("node:child_process");
const { promisify } = require("node:util");

const exec = promisify(execFile);
const [connectionString, countText, concurrencyText] = process.argv.slice(2);
const count = Number(countText || 5000);
const concurrency = Number(concurrencyText || 16);
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms
const quiet = new Logger(() => () => {});

async function main() {
  const utils = await makeWorkerUtils({ connectionString, logger: quiet });
  await utils.migrate();
  for (let i = 0; i < count; i += 200) {
    const batch = [];
    for (let j = i; j < Math.min(count, i + 200); j++) batch.push(utils.addJob("noop", { j }));
    await Promise.all(batch);
  }
  await utils.release();
  let first = null;
  let last = null;
  let done = 0;
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  const runner = await run({
    connectionString,
    concurrency,
    noHandleSignals: true,
    pollInterval: 2000,
    logger: quiet,
    taskList: {
      noop: async () => {
        if (first === null) first = now();
        await exec("true");
        last = now();
        if (++done === count) finish();
      },
    },
  });
  await finished;
  await runner.stop();
  const spanMs = last - first;
  console.log(JSON.stringify({ jobs: done, concurrency, span_ms: spanMs, jobs_per_s: (done * 1000) / spanMs }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
