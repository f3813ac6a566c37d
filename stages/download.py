"""Stage download: put verified MNIST into <out>/MNIST/raw/ (torchvision's layout)."""
from common import load_params, opening, parser, run
from hanprune import data


def main():
    ap = parser(__doc__)
    ap.add_argument("--out", default="data", help="root directory (default: data)")
    args = ap.parse_args()
    params = load_params(args.params)
    p = params.data
    with opening(params, "download") as (_, _, mlrun):
        source, files = data.fetch(p.source, p.md5, p.local_dir)
        raw = data.write_raw(files, args.out)
        mlrun.params({"data": p.model_dump(exclude={"md5"}), "source_used": source})
        mlrun.run_tags({"dataset_md5": data.verified_md5(args.out, p.md5)})
    print(f"download: {len(files)} files from {source} into {raw}, md5 verified")


if __name__ == "__main__":
    run(main)
