"""Stage encode: write the quantized model in the project's compressed format (sparse index
differences, codebooks, Huffman coding; see hanprune/encoding.py) and check it decodes back exactly."""
import torch

from common import open_run, config, parser, run
from hanprune import encoding, io
from hanprune.quantize import load_quantized


def main():
    ap = parser(__doc__)
    ap.add_argument("model", help="model key")
    ap.add_argument("--quantized", required=True, help="checkpoint written by the quantize stage")
    ap.add_argument("--out", required=True, help="compressed model file to write")
    args = ap.parse_args()
    p = config.load(args.params)
    _, layers = load_quantized(args.quantized, args.model)
    blob = encoding.encode(args.model, layers)
    key, decoded = encoding.decode(blob)
    for name, layer in layers.items():
        back = decoded[name]
        if key != args.model or not (torch.equal(back.codes, layer.codes) and torch.equal(back.codebook, layer.codebook)
                                     and torch.equal(back.weight(), layer.weight())):
            raise RuntimeError(f"{args.out}: {name} does not decode to the quantized weights; nothing written")
    with open_run(p, f"encode@{args.model}", args.model, None) as mlrun:
        io.write_bytes(args.out, blob)
        mlrun.metrics({"compressed_bytes": len(blob)})
        mlrun.artifact(args.out)
    print(f"encode {args.model}: {len(blob)} bytes -> {args.out}")


if __name__ == "__main__":
    run(main)
