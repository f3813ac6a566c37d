// Screenshots of the MLflow UI for the README, from a real run's store, in headless Chromium.
//   mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5055 &
//   npm install playwright-core   (its own browser download is not needed: Debian's chromium is used)
//   node docs/mlflow_screenshots.mjs http://127.0.0.1:5055 <experiment id> <parent run id> docs
import { chromium } from "playwright-core";

const [base, experiment, parent, out] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });

// The experiment as it opens: its kind tag makes MLflow 3 land on the training runs.
await page.goto(`${base}/#/experiments/${experiment}`);
await page.waitForSelector("text=lenet5_caffe", { timeout: 60000 });
await page.waitForTimeout(2000);
const close = page.getByRole("button", { name: /close/i });
if (await close.count()) await close.first().click().catch(() => {});
for (const name of ["lenet_300_100"]) {  // expand one parent: its stage runs below it
  const row = page.getByRole("row").filter({ hasText: new RegExp(`^\\s*${name}\\b`) });
  const expand = row.getByRole("button").first();
  if (await expand.count()) await expand.click().catch(() => {});
}
await page.waitForTimeout(2000);
await page.screenshot({ path: `${out}/mlflow-grouped-runs.png` });

// A parent run's charts: metrics logged per prune iteration (step = iteration).
await page.goto(`${base}/#/experiments/${experiment}/runs/${parent}/model-metrics`);
await page.waitForTimeout(8000);
await page.screenshot({ path: `${out}/mlflow-iteration-charts.png` });
await browser.close();
