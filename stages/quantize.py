"""Stage quantize: weight sharing on the final pruned model (Deep Compression, Han et al. 2016).

Clusters each layer's surviving weights into 2**bits shared values, fine-tunes the shared values
(codes and sparsity pattern fixed) and writes a checkpoint that also holds codes and codebooks."""
from common import epoch_logger, load_params, opening, parser, run
from hanprune import io
from hanprune.models import build
from hanprune.pruning import attach_masks, checkpoint, load_checkpoint
from hanprune.quantize import load_into, other_state, quantized_layers, share_weights
from hanprune.train import accuracy, fit


def main():
    ap = parser(__doc__)
    ap.add_argument("model", help="model key")
    ap.add_argument("--data", default="data", help="data root")
    ap.add_argument("--pruned", required=True, help="the selected pruned checkpoint (select stage)")
    ap.add_argument("--out", required=True, help="quantized checkpoint to write")
    ap.add_argument("--metrics", required=True, help="JSON metrics to write")
    args = ap.parse_args()
    p = load_params(args.params, args.model)
    q = p.models[args.model].quantize
    _, ckpt = load_checkpoint(args.pruned, args.model)
    model = build(args.model)
    model.load_state_dict(ckpt["state_dict"])
    with opening(p, f"quantize@{args.model}", args.model, q.finetune.seed, args.data) as (device, splits, mlrun):
        mlrun.params({"quantize": q.model_dump()})
        val_before = accuracy(model.to(device), *splits.val)
        share_weights(model.cpu(), q.bits, ckpt["masks"])
        val_shared = accuracy(model.to(device), *splits.val)
        epochs = fit(model, q.finetune, splits.train, splits.val, None, device,
                     log=epoch_logger(mlrun, f"quantize {args.model}"))
        layers = quantized_layers(model.cpu())
        plain = load_into(build(args.model), layers)
        kept = plain.state_dict()  # and what is not weight-shared (batch norm's, say), as fine-tuned
        plain.load_state_dict({k: v for k, v in other_state(plain, model.state_dict()).items() if k in kept}, strict=False)
        attach_masks(plain, {name: m.float() for name, m in ckpt["masks"].items()})
        saved = checkpoint(args.model, plain, ckpt["dense_std"], ckpt["history"])
        saved["quantized"] = {name: {"codes": l.codes.int(), "codebook": l.codebook} for name, l in layers.items()}
        record = {"val_before": val_before, "val_shared": val_shared,
                  "val_finetuned": epochs[-1]["val_accuracy"]}
        io.save_torch(args.out, saved)
        io.write_json(args.metrics, record)
        mlrun.metrics(record)
    print(f"quantize {args.model}: val {val_before:.4f} -> shared weights {val_shared:.4f} -> "
          f"fine-tuned {record['val_finetuned']:.4f}, bits "
          + " ".join(f"{n} {b}" for n, b in q.bits.items()) + f" -> {args.out}")


if __name__ == "__main__":
    run(main)
