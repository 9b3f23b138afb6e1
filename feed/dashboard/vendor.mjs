// Copies the pinned chart library into the Rust crate, which embeds it in the
// binary (the Rust build never needs Node). Run after changing package.json:
//   cd feed/dashboard && npm ci && npm run vendor
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";

const out = new URL("../src/dashboard/vendor/", import.meta.url);
mkdirSync(out, { recursive: true });
const pkg = JSON.parse(readFileSync(new URL("node_modules/lightweight-charts/package.json", import.meta.url)));
copyFileSync(
  new URL("node_modules/lightweight-charts/dist/lightweight-charts.standalone.production.js", import.meta.url),
  new URL("lightweight-charts.js", out),
);
copyFileSync(new URL("node_modules/lightweight-charts/LICENSE", import.meta.url), new URL("LICENSE-lightweight-charts", out));
writeFileSync(new URL("VERSION", out), `lightweight-charts ${pkg.version}\n`);
console.log(`vendored lightweight-charts ${pkg.version}`);
