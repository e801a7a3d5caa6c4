// Drive the official @rc-ex/core 1.8.6 + @rc-ex/ws 1.4.2 (unmodified) against a server.
//
//   node rc_ex_ws.mjs SERVER CLIENT_ID CLIENT_SECRET JWT COUNT CHECK_INTERVAL_MS FILTER...
//
// Logs in with the JWT grant, installs the WebSocket extension (auto-recover on, checking every
// CHECK_INTERVAL_MS), subscribes and prints one JSON line per event on stdout: "subscribed",
// "notification", "autoRecoverSuccess" / "autoRecoverFailed" / "autoRecoverError" (each with
// the current subscription id). After COUNT notifications it revokes the subscription and the
// token (the normal shutdown) and exits 0. The copy run lives next to the npm cache's
// node_modules (tests/fidelity/installs.py).
import RingCentral from "@rc-ex/core";
import WebSocketExtension, { Events } from "@rc-ex/ws";

const [server, clientId, clientSecret, jwt, count, checkInterval, ...filters] = process.argv.slice(2);
const emit = (event, fields = {}) => process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");

process.on("unhandledRejection", (e) => {
  emit("unhandledRejection", { error: String(e?.message ?? e) });
  process.exit(1);
});

const rc = new RingCentral({ server, clientId, clientSecret, appName: "faxd-fidelity", appVersion: "0.1" });
await rc.authorize({ jwt });
emit("loggedIn");
const wse = new WebSocketExtension({
  autoRecover: { enabled: true, checkInterval: () => Number(checkInterval) },
});
await rc.installExtension(wse);
const current = () => wse.subscription?.subscriptionInfo?.id;
for (const name of [Events.autoRecoverSuccess, Events.autoRecoverFailed]) {
  wse.eventEmitter.on(name, () => emit(name, { subscriptionId: current() }));
}
wse.eventEmitter.on(Events.autoRecoverError, (e) => emit(Events.autoRecoverError, { error: String(e) }));

let received = 0;
const finished = new Promise((resolve) => {
  wse.subscribe(filters, (event) => {
    received += 1;
    emit("notification", { subscriptionId: current(), body: event });
    if (received >= Number(count)) resolve();
  }).then((sub) => emit("subscribed", { subscriptionId: sub.subscriptionInfo.id }));
});
await finished;
await wse.revoke();
await rc.revoke();
emit("done");
process.exit(0);
