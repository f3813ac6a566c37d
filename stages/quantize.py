"""Stage quantize: weight sharing on the final pruned model (Deep Compression, Han et al. 2016).

Clusters each layer's surviving weights into 2**bits shared values, fine-tunes the shared values
(codes and sparsity pattern fixed), rounds the shared values and the biases to half precision (what
the compressed file stores) and writes a checkpoint that also holds codes and codebooks. Its
val_finetuned is the rounded model's: the compressed file's validation accuracy."""
from common import epoch_logger, load_params, parser, run_stage, start, tracked
from hanprune import config, data, io
from hanprune.models import make, prunable_layers
from hanprune.pruning import attach_masks, checkpoint, load_checkpoint
from hanprune.quantize import load_into, other_state, quantized_layers, round_to_half, share_weights
from hanprune.selection import refuse_chance_level
from hanprune.train import accuracy, fit


def main(argv=None):
    ap = parser(__doc__, "model", "--data", "--pruned")
    ap.add_argument("--out", required=True, help="quantized checkpoint to write")
    ap.add_argument("--metrics", required=True, help="JSON metrics to write")
    args = ap.parse_args(argv)
    p = load_params(args.params, args.model)
    m = p.models[args.model]
    q = m.quantize
    _, ckpt = load_checkpoint(args.pruned, args.model, m.arch, m.kwargs)
    model = make(m.arch, m.kwargs)
    config.check_bits(p, args.model, list(prunable_layers(model)))
    model.load_state_dict(ckpt["state_dict"])
    device = start(p, q.finetune.seed)
    splits = data.open_splits(args.data, p.data, device)
    with tracked(p, f"quantize@{args.model}", args.model, splits.dataset) as mlrun:
        mlrun.params({"quantize": q.model_dump()})
        val_before = accuracy(model.to(device), *splits.val)
        share_weights(model.cpu(), q.bits, ckpt["masks"])
        val_shared = accuracy(model.to(device), *splits.val)
        epochs = fit(model, q.finetune, splits.train, splits.val, None, device,
                     log=epoch_logger(mlrun, f"quantize {args.model}"), label=f"quantize {args.model}",
                     lr_key=f"models.{args.model}.quantize.finetune.lr")
        round_to_half(model)
        val_finetuned = accuracy(model, *splits.val)
        refuse_chance_level(f"quantize {args.model}: the weight-shared model (val {val_before:.4f} before)",
                            val_finetuned, splits.classes,
                            f"give models.{args.model}.quantize.bits more bits or fine-tune slower")
        layers = quantized_layers(model.cpu())
        plain = load_into(make(m.arch, m.kwargs), layers)
        kept = plain.state_dict()  # and what is not weight-shared (batch norm's, say), as fine-tuned
        plain.load_state_dict({k: v for k, v in other_state(plain, model.state_dict()).items() if k in kept}, strict=False)
        attach_masks(plain, {name: m.float() for name, m in ckpt["masks"].items()})
        saved = checkpoint(args.model, m.arch, m.kwargs, plain, ckpt["dense_std"], ckpt["history"])
        saved["quantized"] = {name: {"codes": l.codes.int(), "codebook": l.codebook} for name, l in layers.items()}
        record = {"val_before": val_before, "val_shared": val_shared,
                  "val_finetuned": val_finetuned}
        io.save_torch(args.out, saved)
        io.write_json(args.metrics, record)
        mlrun.metrics(record)
    print(f"quantize {args.model}: val {val_before:.4f} -> shared weights {val_shared:.4f} -> "
          f"fine-tuned {epochs[-1]['val_accuracy']:.4f} -> half precision {val_finetuned:.4f}, bits "
          + " ".join(f"{n} {b}" for n, b in q.bits.items()) + f" -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
