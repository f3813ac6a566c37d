"""Milliseconds per training step (batch 64, SGD with momentum, in hanprune.train's layout) of a built-in model
on the real MNIST files, with the numeric settings of the environment as given; run in a fresh
process by benchmarks/numerics.py (the settings are fixed when torch loads):

    python benchmarks/steps.py DATA_ROOT MODEL STEPS 0|1      (last argument: oneDNN off|on)

Prints one JSON line: the model, ms per step and the md5 of the weights after the steps."""
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hanprune import data  # noqa: E402
from hanprune.models import make  # noqa: E402
from hanprune.train import in_layout, memory_format  # noqa: E402

root, key, steps, onednn = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
torch.backends.mkldnn.enabled = onednn
torch.manual_seed(0)
torch.set_num_threads(2)
x, y = data.Splits(data.verified(data.raw_dir(root, "mnist"), "mnist"), 5000, 0).train
model = make(key).to(memory_format=memory_format(torch.device("cpu")))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def step(i):
    batch = slice(i * 64, (i + 1) * 64)
    loss = F.cross_entropy(model(in_layout(x[batch])), y[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


for i in range(5):  # warm-up: oneDNN creates its primitives, allocators settle
    step(i)
start = time.perf_counter()
for i in range(5, 5 + steps):
    step(i)
ms = (time.perf_counter() - start) / steps * 1000
md5 = hashlib.md5(b"".join(p.detach().contiguous().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"model": key, "ms_per_step": round(ms, 2), "md5": md5}))
