"""Stage download: put the verified dataset data.name into <out>/<directory>/raw (torchvision's
layout) with its dataset.json."""
from common import dataset_tags, load_params, parser, run_stage, tracked
from hanprune import data, sources


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--out", default="data", help="root directory (default: data)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    p = params.data
    spec = p.spec
    with tracked(params, "download") as mlrun:
        source, files = sources.fetch(spec, p.source, p.local_dir)
        dataset = data.write_raw(files, args.out, spec)
        mlrun.params({"data": p.model_dump(exclude={"md5"}), "source_used": source})
        mlrun.run_tags(dataset_tags(dataset))
    print(f"download: {spec.title}, {len(files)} files from {source} into {dataset.raw}, md5 verified")


if __name__ == "__main__":
    run_stage(main)
