"""Stage download: put verified MNIST into <out>/MNIST/raw/ (torchvision's layout)."""
from common import config, parser, run
from hanprune import data


def main():
    ap = parser(__doc__)
    ap.add_argument("--out", default="data", help="root directory (default: data)")
    args = ap.parse_args()
    p = config.load(args.params).data
    source, files = data.fetch(p.source, p.md5, p.local_dir)
    raw = data.write_raw(files, args.out)
    print(f"download: {len(files)} files from {source} into {raw}, md5 verified")


if __name__ == "__main__":
    run(main)
