"""Weight sharing and centroid fine-tuning (hanprune.quantize), and rebuilding a model from a file."""
import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from hanprune import __main__ as cli, encoding, io, pruning, quantize, rules
from hanprune.config import Training
from hanprune.encoding import EncodingError, read_compressed
from hanprune.models import make, prunable_layers
from hanprune.quantize import kmeans_1d, load_into, load_quantized, quantized_layers, round_to_half, share_weights
from hanprune.train import fit


def test_kmeans_finds_separated_clusters_from_linear_init():
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)])
    codebook, codes = kmeans_1d(values, 3)
    assert codebook.tolist() == [-1.0, 0.5, 2.0]
    assert torch.equal(codebook[codes], values)


def test_kmeans_initialises_linearly_and_keeps_empty_clusters():
    # All values at the ends: the middle centroid (0.0 from the linear init) gets no member.
    values = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    codebook, codes = kmeans_1d(values, 3)
    assert codebook.tolist() == [-1.0, 0.0, 1.0]
    assert codes.tolist() == [0, 0, 2, 2]


def _pruned_model(seed=0):
    torch.manual_seed(seed)
    model = make("lenet_300_100")
    rules.prune_round(model, "std", {"fc1": 1.0, "fc2": 0.8, "fc3": 0.3}, pruning.weight_std(model))
    masks = pruning.masks_of(model)
    plain = make("lenet_300_100")
    plain.load_state_dict(pruning.plain_state_dict(model))
    return plain, masks


def test_share_weights_keeps_sparsity_and_uses_at_most_2_to_the_bits_values():
    model, masks = _pruned_model()
    share_weights(model, {"fc1": 4, "fc2": 3, "fc3": 2}, masks)
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        assert torch.equal(w != 0, masks[name])
        assert len(torch.unique(w[masks[name]])) <= 2 ** {"fc1": 4, "fc2": 3, "fc3": 2}[name]


def test_finetuning_trains_codebooks_by_summed_gradients_and_nothing_else():
    model, masks = _pruned_model()
    share_weights(model, {"fc1": 3, "fc2": 3, "fc3": 3}, masks)
    codes = {n: l.codes.clone() for n, l in quantized_layers(model).items()}
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    fc2 = model.fc2.parametrizations.weight
    # Gradient wrt the effective weight, recomputed on a plain copy with the same weights.
    plain = load_into(make("lenet_300_100"), quantized_layers(model))
    F.cross_entropy(plain(x), y).backward()
    expected = torch.zeros(8).index_add_(0, codes["fc2"][codes["fc2"] >= 0], plain.fc2.weight.grad[codes["fc2"] >= 0])
    assert torch.allclose(fc2[0].codebook.grad, expected, atol=1e-6)
    assert fc2.original.grad is None
    # A few SGD steps move the codebooks but never the codes or the zeros.
    cfg = Training(seed=0, epochs=1, batch_size=16, lr=0.01, momentum=0.9, schedule="constant",
                   regularization={"kind": "l2", "strength": 0.0})
    before = {n: l.codebook.clone() for n, l in quantized_layers(model).items()}
    data = (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    fit(model, cfg, data, data)
    after = quantized_layers(model)
    assert any(not torch.equal(before[n], after[n].codebook) for n in after)
    for name, layer in after.items():
        assert torch.equal(layer.codes, codes[name])
        assert torch.equal(prunable_layers(model)[name].weight.detach() != 0, masks[name])


def test_round_to_half_moves_codebooks_and_biases_to_the_nearest_float16_and_the_file_stores_them_in_2_bytes():
    model, masks = _pruned_model()
    share_weights(model, {"fc1": 4, "fc2": 3, "fc3": 2}, masks)
    before = quantized_layers(model)
    round_to_half(model)
    after = quantized_layers(model)
    for name, layer in after.items():
        for old, new in ((before[name].codebook, layer.codebook), (before[name].bias, layer.bias)):
            assert new.dtype == torch.float32 and torch.equal(new, old.half().float()), name
            assert not torch.equal(new, old), name  # random float32 values: rounding moved some
        assert torch.equal(layer.codes, before[name].codes)
        assert torch.equal(prunable_layers(model)[name].weight.detach() != 0, masks[name])
    rows = encoding.describe(encoding.encode("lenet_300_100", "lenet_300_100", {}, after))
    used = {n: torch.unique(layer.codes[layer.codes >= 0]).numel() for n, layer in after.items()}  # the file's codebook
    assert [(r["bytes_codebook"], r["bytes_bias"]) for r in rows] == [
        (4 + 1 + 2 * used[n], 1 + 4 + 2 * len(after[n].bias)) for n in after]


def _quantized_checkpoint(tmp_path):
    model, masks = _pruned_model()
    share_weights(model, {"fc1": 4, "fc2": 4, "fc3": 4}, masks)
    layers = quantized_layers(model)
    plain = load_into(make("lenet_300_100"), layers)
    pruning.attach_masks(plain, {n: m.float() for n, m in masks.items()})
    ckpt = pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, plain, {n: 1.0 for n in layers}, [])
    ckpt["quantized"] = {n: {"codes": l.codes.int(), "codebook": l.codebook} for n, l in layers.items()}
    path = tmp_path / "quantized.pt"
    io.save_torch(path, ckpt)
    return path, ckpt, layers


def test_quantized_checkpoint_round_trip_and_file_decodes_to_the_same_model(tmp_path):
    path, _, layers = _quantized_checkpoint(tmp_path)
    model, loaded = load_quantized(path, "lenet_300_100")
    for name in layers:
        assert torch.equal(loaded[name].weight(), layers[name].weight())
    blob = tmp_path / "compressed.bin"
    blob.write_bytes(encoding.encode("lenet_300_100", "lenet_300_100", {}, loaded))
    _, decoded = read_compressed(blob, "lenet_300_100")
    x = torch.randn(16, 1, 28, 28)
    model.eval(), decoded.eval()
    assert torch.equal(model(x), decoded(x))
    for name, layer in prunable_layers(decoded).items():
        assert int(layer.weight.count_nonzero()) == int(layers[name].codes.ge(0).sum())


def test_quantized_checkpoint_without_codes_or_with_wrong_codes_is_refused(tmp_path):
    path, ckpt, _ = _quantized_checkpoint(tmp_path)
    bare = {k: v for k, v in ckpt.items() if k != "quantized"}
    io.save_torch(path, bare)
    with pytest.raises(pruning.CheckpointError, match="quantize stage"):
        load_quantized(path, "lenet_300_100")
    ckpt["quantized"]["fc3"]["codebook"] = ckpt["quantized"]["fc3"]["codebook"] + 1
    io.save_torch(path, ckpt)
    with pytest.raises(pruning.CheckpointError, match="fc3 do not give its weights"):
        load_quantized(path, "lenet_300_100")


def test_read_compressed_names_the_file_and_the_problem(tmp_path):
    path, _, layers = _quantized_checkpoint(tmp_path)
    blob = tmp_path / "compressed.bin"
    blob.write_bytes(encoding.encode("lenet_300_100", "lenet_300_100", {}, layers))
    with pytest.raises(EncodingError, match=r"compressed.bin: holds model 'lenet_300_100', expected 'lenet5'"):
        read_compressed(blob, "lenet5")
    blob.write_bytes(encoding.encode("lenet5", "lenet5", {}, layers))
    with pytest.raises(EncodingError, match="compressed.bin: layers .* do not match"):
        read_compressed(blob)
    blob.write_bytes(b"not a model")
    with pytest.raises(EncodingError, match="compressed.bin: "):
        read_compressed(blob)


GOLDEN = Path(__file__).parent / "data"  # files of versions 1 and 2, made by the code of commit 2eb6934
SMALL_RESNET = ("examples.small_resnet:SmallResNet", {"channels": 4})  # small_resnet-v2.bin's, batch norm set


def _digest(model) -> str:
    return hashlib.md5(b"".join(t.numpy().tobytes() for t in pruning.plain_state_dict(model).values())).hexdigest()


@pytest.mark.parametrize("name, key, given, digest", [
    ("lenet_300_100-v1.bin", "lenet_300_100", (None, None), "e82b60f11f5ac76f4ab30ab1c07bda69"),
    ("small_resnet-v2.bin", "small_resnet", SMALL_RESNET, "1c03eb7089ab97116a7ae3ec4afcdf4f"),
])
def test_compressed_files_of_versions_1_and_2_still_load(name, key, given, digest):
    """The digest is what commit 2eb6934 decoded them to (weights, biases, batch norm's tensors)."""
    assert encoding.decode_all((GOLDEN / name).read_bytes()).arch is None
    found, model = read_compressed(GOLDEN / name, key, *given)
    assert (found.model_key, found.arch, found.kwargs) == (key, given[0] or key, given[1] or {})
    assert _digest(model) == digest


def test_a_version_2_file_of_a_model_not_built_in_needs_its_arch():
    with pytest.raises(EncodingError, match=r"small_resnet-v2.bin: of an older format, which does not name the "
                                            r"architecture: model 'small_resnet' is not built in"):
        read_compressed(GOLDEN / "small_resnet-v2.bin")


def _version_3_of_small_resnet(path: Path) -> Path:
    found, model = read_compressed(GOLDEN / "small_resnet-v2.bin", "small_resnet", *SMALL_RESNET)
    path.write_bytes(encoding.encode("small_resnet", *SMALL_RESNET, found.layers, other=found.other))
    return path


def test_a_version_3_file_makes_its_model_from_what_it_says(tmp_path):
    path = _version_3_of_small_resnet(tmp_path / "v3.bin")
    found, model = read_compressed(path)
    assert (found.arch, found.kwargs) == SMALL_RESNET and _digest(model) == "1c03eb7089ab97116a7ae3ec4afcdf4f"
    with pytest.raises(EncodingError, match=r"v3.bin: holds model small_resnet of arch .* with kwargs "
                                            r"\{'channels': 4\}, expected arch .* with kwargs \{'channels': 16\}"):
        read_compressed(path, "small_resnet", SMALL_RESNET[0], {"channels": 16})


def test_decode_command_without_params_for_a_model_of_an_import_path(tmp_path, capsys):
    """python -m hanprune decode FILE: the file names its arch; the --out checkpoint does too."""
    path = _version_3_of_small_resnet(tmp_path / "v3.bin")
    cli.main(["decode", str(path), "--out", str(tmp_path / "decoded.pt")])
    out = capsys.readouterr().out
    assert f"{path}: small_resnet, {path.stat().st_size} bytes" in out and "block.conv2" in out
    (found, rebuilt), rows = read_compressed(path), encoding.describe(path.read_bytes())
    codes = {name: layer.codes for name, layer in found.layers.items()}
    bound = sum(cli.entropy_bytes([r["nonzero"], codes[r["layer"]].numel() - r["nonzero"]])
                + cli.entropy_bytes(torch.bincount(codes[r["layer"]][codes[r["layer"]] >= 0]).tolist()) for r in rows)
    sections = sum(r["bytes_index"] + r["bytes_codes"] for r in rows)
    assert f"codes at their frequencies: {bound:.0f} bytes in all; the file's gap and code sections take {sections}" in out
    model, ckpt = pruning.load_checkpoint(tmp_path / "decoded.pt")
    assert (ckpt["arch"], ckpt["kwargs"]) == SMALL_RESNET
    decoded, written = pruning.plain_state_dict(rebuilt), pruning.plain_state_dict(model)
    assert decoded.keys() == written.keys() and all(torch.equal(decoded[k], written[k]) for k in decoded)


def test_entropy_bytes_is_shannon_s_bound_for_independent_symbols():
    assert cli.entropy_bytes([1, 1]) == 0.25  # two equally likely symbols: 1 bit each
    assert cli.entropy_bytes([5, 0]) == 0.0  # one symbol: nothing to code
    assert cli.entropy_bytes([1, 3]) == pytest.approx((2 + 3 * math.log2(4 / 3)) / 8)


def test_decode_command_takes_the_arch_of_an_older_file_from_params(tmp_path, capsys, project_params):
    path = GOLDEN / "small_resnet-v2.bin"
    with pytest.raises(SystemExit) as e:
        cli.main(["decode", str(path)])
    assert e.value.code == 1 and capsys.readouterr().err.startswith(
        f"error: {path}: of an older format, which does not name the architecture: model 'small_resnet'")
    project_params["models"]["small_resnet"] = {  # the example model of examples/, as README's "Your own model" adds it
        **project_params["models"]["lenet5"], "arch": SMALL_RESNET[0], "kwargs": SMALL_RESNET[1],
        "code": "examples/small_resnet.py",
        "quantize": {**project_params["models"]["lenet5"]["quantize"],
                     "bits": {"stem": 8, "block.conv1": 8, "block.conv2": 8, "head": 5}}}
    project_params["prune"]["small_resnet-iter1"] = {"model": "small_resnet", "iteration": 1, "rule": "std",
                                                     "start": "models/small_resnet/dense.pt", "s": {"head": 1.0},
                                                     "epochs": 1, "lr": 0.01}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(project_params, sort_keys=False))
    cli.main(["decode", str(path), "--params", str(params)])
    assert f"{path}: small_resnet, {path.stat().st_size} bytes" in capsys.readouterr().out


def test_shared_weight_gradient_is_the_per_code_sum_and_repeatable_to_the_bit():
    """The codebook's gradient is the sum of the weight gradients of each code, the same as
    indexing's autograd gives, and the same bytes every time on 2 threads for a layer as large as
    lenet_300_100's fc1 (indexing's own backward was not)."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (300, 784), generator=g)
    grad = torch.randn(300, 784, generator=g)
    codebook = torch.randn(64, generator=g)
    grads = []
    for _ in range(3):
        c = codebook.clone().requires_grad_()
        quantize._Lookup.apply(c, codes, None).backward(grad)
        grads.append(c.grad.numpy().tobytes())
    assert grads[0] == grads[1] == grads[2]
    reference = codebook.clone().requires_grad_()
    reference[codes].backward(grad)
    assert torch.allclose(torch.frombuffer(bytearray(grads[0]), dtype=torch.float32), reference.grad, atol=1e-3)


@pytest.mark.parametrize("key", ["lenet_300_100", "lenet5"])
def test_after_weight_sharing_every_surviving_weight_has_its_nearest_centroid(key):
    """k-means converged: each surviving weight's code names the codebook entry nearest to it
    (ties within float rounding allowed), and pruned weights stay zero with code -1."""
    torch.manual_seed(0)
    model = make(key)
    rules.prune_round(model, "std", {name: 0.8 for name in prunable_layers(model)}, pruning.weight_std(model))
    masks = pruning.masks_of(model)
    original = {name: m.weight.detach().clone() for name, m in prunable_layers(model).items()}
    plain = make(key)
    plain.load_state_dict(pruning.plain_state_dict(model))
    share_weights(plain, {name: 4 for name in masks}, masks)
    for name, q in quantized_layers(plain).items():
        w, survivors = original[name], masks[name]
        assert (q.codes[~survivors] == -1).all() and (q.codes[survivors] >= 0).all()
        distance = (w[survivors].double().unsqueeze(1) - q.codebook.double()).abs()  # (survivors, k)
        chosen = distance.gather(1, q.codes[survivors].unsqueeze(1)).squeeze(1)
        assert (chosen <= distance.min(1).values + 1e-6).all(), name


def test_a_file_s_other_tensors_load_into_the_model_and_must_be_the_model_s(tmp_path):
    """Batch norm's tensors come from the file as they are (read_compressed); a file that lacks one,
    has one the model does not, or one of another shape is refused with its name."""
    found, _ = read_compressed(GOLDEN / "small_resnet-v2.bin", "small_resnet", *SMALL_RESNET)
    assert found.other and any(t.dtype == torch.int64 for t in found.other.values())  # num_batches_tracked
    path = tmp_path / "v3.bin"
    changed = {**found.other}
    name, tensor = next((k, v) for k, v in found.other.items() if k.endswith("running_mean"))
    changed[name] = tensor + 1
    path.write_bytes(encoding.encode("small_resnet", *SMALL_RESNET, found.layers, other=changed))
    _, model = read_compressed(path)
    assert torch.equal(model.state_dict()[name], tensor + 1)
    for other, message in [({k: v for k, v in found.other.items() if k != name}, "holds the tensors"),
                           ({**found.other, "extra": torch.zeros(1)}, "holds the tensors"),
                           ({**found.other, name: torch.zeros(2)}, rf"tensor {name}: shape \(2,\), small_resnet has")]:
        path.write_bytes(encoding.encode("small_resnet", *SMALL_RESNET, found.layers, other=other))
        with pytest.raises(EncodingError, match=message):
            read_compressed(path)
