"""Run in a fresh process by tests/test_portable.py (and, until commit 58a3336, benchmarks/numerics.py; docs/numerics.md) (the numeric mode is
fixed when torch loads): train, prune and retrain, share weights and fine-tune lenet_300_100 and
lenet5 on tiny data at 2 threads, as the stages do, and print the md5 of each step's weights as JSON.

    python tests/numerics_probe.py portable|fast     # hanprune.runtime's modes
    python tests/numerics_probe.py env 0|1           # the environment's settings as given, oneDNN off|on
"""
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hanprune import runtime  # noqa: E402

mode = sys.argv[1]
portable = mode == "portable"
runtime.configure(portable)
import torch  # noqa: E402

from hanprune.config import Training  # noqa: E402
from hanprune.models import make  # noqa: E402
from hanprune.pruning import plain_state_dict, weight_std  # noqa: E402
from hanprune.quantize import share_weights  # noqa: E402
from hanprune.rules import prune_round  # noqa: E402
from hanprune.train import fit  # noqa: E402


def digest(model) -> str:
    return hashlib.md5(b"".join(t.numpy().tobytes() for t in plain_state_dict(model).values())).hexdigest()


device = runtime.start("cpu", 2, portable, seed=0)
if mode == "env":
    torch.backends.mkldnn.enabled = sys.argv[2] == "1"
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 1, 28, 28, generator=g)
y = torch.randint(0, 10, (512,), generator=g)
cfg = Training(seed=0, epochs=1, batch_size=32, lr=0.05, momentum=0.9, schedule="cosine",
               regularization={"kind": "l2", "strength": 1e-4}, shift=2)
out = {"capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.enabled}
for key in ("lenet_300_100", "lenet5", "lenet5_caffe"):
    torch.manual_seed(0)
    model = make(key)
    fit(model, cfg, (x, y), (x[:64], y[:64]))
    out[f"{key}/pretrain"] = digest(model)
    prune_round(model, "std", {name: 0.5 for name in weight_std(model)}, weight_std(model))
    fit(model, cfg, (x, y), (x[:64], y[:64]))
    out[f"{key}/prune"] = digest(model)
    masks = {name: m.weight_mask.bool() for name, m in model.named_modules() if hasattr(m, "weight_mask")}
    plain = make(key)
    plain.load_state_dict(plain_state_dict(model))
    share_weights(plain, {name: 4 for name in masks}, masks)
    fit(plain, cfg, (x, y), (x[:64], y[:64]))
    out[f"{key}/quantize"] = hashlib.md5(b"".join(
        m.parametrizations.weight[0].codebook.detach().numpy().tobytes() for m in plain.modules()
        if hasattr(m, "parametrizations"))).hexdigest()
print(json.dumps(out))
