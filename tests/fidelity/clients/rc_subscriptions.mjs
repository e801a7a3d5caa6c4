// Drive the official @ringcentral/sdk + @ringcentral/subscriptions 5.0.11 (unmodified).
//
//   node rc_subscriptions.mjs SERVER CLIENT_ID CLIENT_SECRET JWT COUNT FILTER...
//
// Logs in with the JWT grant, registers one subscription and prints one JSON line per event
// on stdout ("subscribed", "notification"); after COUNT notifications it revokes the
// subscription, logs out and exits 0.
import { SDK } from "@ringcentral/sdk";
import { Subscriptions } from "@ringcentral/subscriptions";

const [server, clientId, clientSecret, jwt, count, ...filters] = process.argv.slice(2);
const emit = (event, fields = {}) => process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");

process.on("unhandledRejection", (e) => {
  emit("unhandledRejection", { error: String(e?.message ?? e) });
  process.exit(1);
});

const sdk = new SDK({ server, clientId, clientSecret, appName: "faxd-fidelity", appVersion: "0.1" });
await sdk.platform().login({ jwt });
emit("loggedIn");
const subscriptions = new Subscriptions({ sdk });
const subscription = subscriptions.createSubscription();
let received = 0;
const finished = new Promise((resolve) => {
  subscription.on(subscription.events.notification, (event) => {
    received += 1;
    emit("notification", { body: event });
    if (received >= Number(count)) resolve();
  });
});
const wsSub = await subscription.setEventFilters(filters).register();
emit("subscribed", { subscriptionId: wsSub.subscriptionInfo.id });
await finished;
await wsSub.revoke();
await sdk.platform().logout();
emit("done");
process.exit(0);
