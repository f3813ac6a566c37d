"""Stage report: reports/REPORT.md and its PNG figures (reports/figures/) from every model's metrics
and plot data."""
import json
from pathlib import Path

from common import dataset_tags, load_params, opening, parser, run_stage
from hanprune import data, io, report


def save_png(fig, path: Path) -> str:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return path.name


def main():
    ap = parser(__doc__, "--data")
    ap.add_argument("--metrics", default="metrics", help="directory of <model>.json metrics")
    ap.add_argument("--plots", default="plots", help="directory of <model>/ plot data")
    ap.add_argument("--out", default="reports", help="output directory")
    args = ap.parse_args()
    p = load_params(args.params)
    out = Path(args.out)
    dataset = data.verified(data.raw_dir(args.data, p.data.name), p.data.name)
    with opening(p, "report") as (_, _, mlrun):
        mlrun.run_tags(dataset_tags(dataset))
        models, iterations, images, schedules, quantize = {}, {}, {}, {}, {}
        for key in p.models:
            models[key] = json.loads(Path(args.plots, key, "final", "detail.json").read_text())
            quantize[key] = {**json.loads(Path(args.metrics, "quantize", f"{key}.json").read_text()),
                             "bits": p.models[key].quantize.bits}
            iterations[key] = Path(args.plots, key, "final", "iterations.csv").read_text()
            made = report.figures(key, Path(args.plots, key), out / "figures", save_png)
            images[key] = {title: f"figures/{name}" for title, name in made.items()}
            last = max((it for it in p.prune.values() if it.model == key), key=lambda it: it.iteration)
            schedules[key] = report.schedule_table(last.s, Path(args.plots, key, "sensitivity.csv").read_text(), models[key])
        io.write_text(out / "REPORT.md", report.render(dataset, models, iterations, images, schedules, quantize))
        mlrun.artifact(out / "REPORT.md")
        for names in images.values():
            for name in names.values():
                mlrun.artifact(out / name, "figures")
    print(f"report: {out / 'REPORT.md'} with {sum(len(v) for v in images.values())} figures for {', '.join(models)}")


if __name__ == "__main__":
    run_stage(main)
