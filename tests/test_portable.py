"""Portable numerics (run.portable): the same bytes whatever CPU runs them.

The probe (tests/numerics_probe.py) trains, prunes and weight-shares two models on tiny data. In the
portable mode its md5s must equal the committed reference (tests/portable_reference.json, which
names the CPUs that gave it): a CPU of another model or vendor that gives other bytes fails here.
Within one CPU, one without AVX-512 is stood in for by capping MKL, oneDNN and ATen at AVX2 through
their own environment variables: the portable mode must give the same bytes with and without the
caps, and the fast mode must not (on a CPU with AVX-512, which is what lets that test fail)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.results import cpu_model
from tests.tiny import HAS_AVX512, ROOT

pytestmark = pytest.mark.slow
AVX2_CAPS = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
NATIVE = {k: "" for k in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_CBWR")}


def probe(mode: str, env: dict) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in NATIVE}
    e.update({k: v for k, v in env.items() if v})
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "numerics_probe.py"), mode], env=e,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_portable_mode_gives_the_committed_reference_bytes():
    reference = json.loads((ROOT / "tests" / "portable_reference.json").read_text())
    got = probe("portable", {})
    assert got.pop("capability") == "AVX2"
    differ = {k: (got[k][:8], v[:8]) for k, v in reference["md5"].items() if got[k] != v}
    assert not differ, (f"this CPU ({cpu_model()}) gives other bytes in the portable mode than "
                        f"{'; '.join(reference['cpus'])} (probe step: this CPU's md5, the reference's): {differ}")


def test_portable_mode_gives_the_same_bytes_natively_and_under_avx2_caps():
    native = probe("portable", {"ATEN_CPU_CAPABILITY": "avx512"})  # the portable mode overrides a user's setting
    capped = probe("portable", AVX2_CAPS)
    assert native.pop("capability") == capped.pop("capability") == "AVX2"
    assert native == capped


@pytest.mark.skipif(not HAS_AVX512, reason="needs a CPU with AVX-512 to show the fast mode's bytes differ")
def test_fast_mode_gives_other_bytes_under_avx2_caps():
    native = probe("fast", NATIVE)
    capped = probe("fast", AVX2_CAPS)
    assert native.pop("capability") == "AVX512" and capped.pop("capability") == "AVX2"
    differ = [k for k in native if native[k] != capped[k]]
    assert differ, "the fast mode gave the same bytes with and without AVX-512: this test could not fail"
