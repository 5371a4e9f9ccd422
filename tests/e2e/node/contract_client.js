// A Node.js app using agentchassis' task contract through celery-node (npm), as another
// team's service would: start a registered plan, wait on the result, read the status
// until the workflow waits for approval, resume it, read COMPLETED. Then the refusals:
// another client's status request, and a start sent to Celery's default queue.
// Prints one JSON line per step; the pytest side (test_contract_node.py) checks them.
//
// env: BROKER, BACKEND (redis URLs), CID (a UUID), PLAN (registered plan), CLIENT.
const celery = require("celery-node");

const { BROKER, BACKEND, CID, CID2, PLAN, CLIENT } = process.env;
const TIMEOUT = 30000;

function out(what, value) {
  console.log(JSON.stringify({ what, value }));
}

async function call(client, name, args) {
  const result = client.createTask(name).applyAsync(args);
  return result.get(TIMEOUT);
}

async function refused(client, name, args) {
  try {
    const value = await call(client, name, args);
    return { refused: false, value };
  } catch (err) {
    // celery-node rejects with the task's state; the stored exception's type and
    // message (Celery's exc_type, exc_message) are on the error
    const words = [].concat(err.exc_message || []).join(" ");
    return { refused: true, state: err.message, type: err.exc_type, message: words };
  }
}

async function until(client, wanted) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const doc = await call(client, "chassis.status", [CID, CLIENT]);
    if (wanted.includes(doc.status) || Date.now() > deadline) return doc;
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function main() {
  const client = celery.createClient(BROKER, BACKEND, "chassis.coordination");
  const started = await call(client, "chassis.start", [
    { plan: PLAN, correlation_id: CID, client_id: CLIENT, input: { topic: "node" } },
  ]);
  out("start", started);
  const again = await call(client, "chassis.start", [
    { plan: PLAN, correlation_id: CID, client_id: CLIENT, input: { topic: "node" } },
  ]);
  out("start_again", again);
  const paused = await until(client, ["PAUSED_FOR_HUMAN_INPUT", "FAILED"]);
  out("paused", { status: paused.status, current_step: paused.current_step });
  out("resume", await call(client, "chassis.resume", [CID, true, { by: "node" }, CLIENT]));
  const done = await until(client, ["COMPLETED", "FAILED"]);
  out("done", { status: done.status, final_result: done.final_result });
  out("not_yours", await refused(client, "chassis.status", [CID, "someone-else"]));
  out("bad_args", await refused(client, "chassis.resume", [CID, "yes", null, CLIENT]));
  // an app that names no queue: Celery's default one, which the coordinator consumes
  const plain = celery.createClient(BROKER, BACKEND);
  out("default_queue", await call(plain, "chassis.start", [
    { plan: PLAN, correlation_id: CID2, client_id: CLIENT },
  ]));
  client.disconnect();
  plain.disconnect();
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err && err.stack ? err.stack : String(err));
    process.exit(1);
  },
);
