// Screenshots of the MLflow UI for the README, from a real run's store, in headless Chromium.
//   mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5055 &
//   npm install playwright-core   (its own browser download is not needed: Debian's chromium is used)
//   node docs/mlflow_screenshots.mjs http://127.0.0.1:5055 <experiment id> <parent run id> <git commit> docs
// MLflow 3.17's UI picks its page set from a global GenAI / Model training switch (remembered per
// browser, GenAI by default), not from the experiment's kind tag: ?workflowType=machine_learning
// selects model training.
import { chromium } from "playwright-core";

const [base, experiment, parent, commit, out] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const mode = "workflowType=machine_learning";

// The pipeline run of one commit: a parent run per model, its stage runs below it.
const filter = encodeURIComponent(`tags.git_commit LIKE '${commit}%'`);
await page.goto(`${base}/#/experiments/${experiment}/runs?${mode}&searchFilter=${filter}`);
await page.waitForSelector("text=lenet5_caffe", { timeout: 60000 });
await page.waitForTimeout(3000);
await page.mouse.click(1564, 35).catch(() => {});  // close the assistant panel (its X, top right)
const row = page.getByRole("row").filter({ hasText: "lenet_300_100" }).first();
await row.getByRole("button").first().click().catch(() => {});  // expand the parent
await page.waitForTimeout(3000);
await page.screenshot({ path: `${out}/mlflow-grouped-runs.png` });

// A parent run's charts: metrics logged per prune iteration (step = iteration).
await page.goto(`${base}/#/experiments/${experiment}/runs/${parent}/model-metrics?${mode}`);
await page.waitForTimeout(10000);
await page.screenshot({ path: `${out}/mlflow-iteration-charts.png` });
await browser.close();
