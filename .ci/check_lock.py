"""Check that every package pinned in requirements.lock installs on CPython 3.11, 3.12 and 3.13 on
x86-64 Linux: for each pin, PyPI's simple index (PEP 691 JSON, what pip reads) must list a wheel
whose tags that interpreter accepts and whose requires-python admits it. Nothing is downloaded.
A pin published only as a source distribution must be pure Python: SDIST_OK names those, and why.

    python .ci/check_lock.py [requirements.lock]
"""
import json
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from packaging.specifiers import SpecifierSet
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

PYTHONS = [(3, 11), (3, 12), (3, 13)]
PLATFORMS = ([f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)]  # glibc 2.39: Ubuntu 24.04
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"])
SDIST_OK = {"antlr4-python3-runtime": "pure Python (omegaconf, for DVC's hydra, pins 4.9.*, which has no wheel)"}


def tags(version):
    return set(cpython_tags(version, platforms=PLATFORMS)) | set(compatible_tags(version, f"cp{version[0]}{version[1]}", PLATFORMS))


def files(name: str) -> list[dict]:
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)["files"]


def problems(pin: str, listed: list[dict]) -> list[str]:
    name, version = pin.split("==")
    out = []
    ours = [f for f in listed if not f.get("yanked")]
    wheels = []
    for f in ours:
        if f["filename"].endswith(".whl") and f"-{version}-" in f["filename"]:
            _, whl_version, _, whl_tags = parse_wheel_filename(f["filename"])
            if str(whl_version) == version:
                wheels.append((f, whl_tags))
    for py in PYTHONS:
        accepted = tags(py)
        ok = [f for f, t in wheels if t & accepted
              and SpecifierSet(f.get("requires-python") or "").contains(f"{py[0]}.{py[1]}.0")]
        if not ok and canonicalize_name(name) not in SDIST_OK:
            out.append(f"{pin}: no wheel for CPython {py[0]}.{py[1]} on x86-64 Linux")
    return out


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "requirements.lock"
    pins = [line.split("#")[0].strip() for line in open(path)]
    pins = [p for p in pins if re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s;]+", p)]
    with ThreadPoolExecutor(16) as pool:
        listed = list(pool.map(lambda p: files(canonicalize_name(p.split("==")[0])), pins))
    found = [msg for pin, fs in zip(pins, listed) for msg in problems(pin, fs)]
    print(f"{path}: {len(pins)} pins checked for CPython " + ", ".join(f"{a}.{b}" for a, b in PYTHONS)
          + f" on x86-64 Linux; sdist-only, pure Python: {', '.join(SDIST_OK)}")
    for msg in found:
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
