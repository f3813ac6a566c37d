"""The DVC graph is right: each stage's deps are exactly the project code it runs, its params cover
what its data loading and numerics read, and every tracked file under metrics/, plots/ and reports/
is an output of some stage (no orphans left from a dropped stage or round).

Deps are derived, not copied by hand: the transitive closure of project-internal imports from the
stage script (stages/common.py, hanprune/*), counting every import in the file, including those
inside functions (imported lazily, they still run and can change an output). hanprune/tracking.py
is left out on purpose: it only logs to MLflow and cannot change a stage's outputs, so listing it
would only re-run stages for nothing. A false dep costs up to 20 minutes of training; a missing one
leaves a stale output that `dvc status` does not report.
"""
import ast
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hanprune"
STAGES_DIR = ROOT / "stages"          # the stage scripts run from here: it is sys.path[0]
NOT_DEPS = {"hanprune/tracking.py"}   # MLflow logging only: cannot change an output
DATA_PARAMS = {"data.name"}  # a stage that reads args.data finds the dataset's directory by its name
SPLIT_PARAMS = {"run", "data.val_size", "data.val_seed"}  # one that opens it with opening() also splits it


def _rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def _module_file(dotted: str) -> Path | None:
    """The project file that `import dotted` executes last (package __init__ or module), or None
    when it is not a project module (stdlib, third party, a namespace package without __init__)."""
    parts = dotted.split(".")
    if parts[0] == PACKAGE:
        base = ROOT.joinpath(*parts)
    elif len(parts) == 1 and (STAGES_DIR / f"{parts[0]}.py").is_file():
        base = STAGES_DIR / parts[0]
    else:
        return None
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_inits(dotted: str) -> list[Path]:
    """The __init__.py files that importing `dotted` runs on the way (hanprune/ has none today)."""
    parts = dotted.split(".")
    inits = []
    for i in range(1, len(parts) + 1):
        f = ROOT.joinpath(*parts[:i], "__init__.py")
        if parts[0] == PACKAGE and f.is_file():
            inits.append(f)
    return inits


def _module_name(path: Path) -> str:
    rel = path.resolve().relative_to(ROOT)
    if rel.parts[0] == "stages":
        return rel.stem
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _direct_imports(path: Path) -> set[Path]:
    """Project files imported anywhere in `path` (module level or inside functions)."""
    found: set[Path] = set()

    def add(dotted: str):
        found.update(_package_inits(dotted))
        f = _module_file(dotted)
        if f is not None:
            found.add(f)

    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _module_name(path).split(".")
                if path.name != "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module
            add(base)
            for alias in node.names:   # `from hanprune import data`: data may be a module
                if alias.name != "*" and _module_file(f"{base}.{alias.name}") is not None:
                    add(f"{base}.{alias.name}")
    found.discard(path)
    return found


def import_closure(script: Path) -> set[str]:
    """The stage script and every project file it imports, transitively; paths from the root."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_direct_imports(f) - seen)
    return {_rel(f) for f in seen}


def stage_specs(dvc_yaml: dict):
    """(name, spec) of each stage, with the `do` block for foreach stages."""
    for name, stage in dvc_yaml["stages"].items():
        yield name, stage["do"] if "foreach" in stage else stage


def stage_script(spec: dict) -> str:
    cmd = spec["cmd"] if isinstance(spec["cmd"], str) else spec["cmd"][0]
    tokens = shlex.split(cmd)
    i = next(i for i, t in enumerate(tokens) if Path(t).name.startswith("python"))
    return tokens[i + 1]


def expected_py_deps(spec: dict, root: Path = ROOT) -> set[str]:
    """From the project root; `root` is the stage's working directory (its dvc.yaml's folder)."""
    return import_closure(root / stage_script(spec)) - NOT_DEPS


def _dep_name(dep) -> str:
    return dep if isinstance(dep, str) else next(iter(dep))


def _sorted_py(paths: set[str], script: str) -> list[str]:
    first = [p for p in (script, "stages/common.py") if p in paths]
    return first + sorted(paths - set(first))


def check_deps(dvc_yaml: dict, base: Path = ROOT) -> list[str]:
    """One message per stage whose .py deps differ from its import closure (`base`: the folder of
    the dvc.yaml, which its paths are relative to)."""
    problems = []
    for name, spec in stage_specs(dvc_yaml):
        deps = [_dep_name(d) for d in spec.get("deps", [])]
        listed = {_rel(base / d) for d in deps if d.endswith(".py")}
        script = _rel(base / stage_script(spec))
        expected = expected_py_deps(spec, base)
        if listed == expected:
            continue
        corrected = [Path(os.path.relpath(ROOT / d, base)).as_posix() for d in _sorted_py(expected, script)] + [
            d for d in deps if not d.endswith(".py")]
        indent = " " * (8 if "foreach" in dvc_yaml["stages"][name] else 6)
        problems.append(
            f"stage {name}: deps do not match the imports of {script}\n"
            f"  add:    {sorted(expected - listed)}\n"
            f"  remove: {sorted(listed - expected)}\n"
            f"  corrected deps:\n" + "".join(f"{indent}- {d}\n" for d in corrected))
    return problems


def _is_args_data(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "data"
            and isinstance(node.value, ast.Name) and node.value.id == "args")


def data_params(script: Path) -> set[str]:
    """The params a stage depends on through its data: data.name if it reads args.data at all; and
    the split and the numeric settings if it passes args.data to data.open_splits(...), which
    verifies the data, splits it and puts it on the device that common.start chose."""
    tree = ast.parse(script.read_text())
    if not any(_is_args_data(node) for node in ast.walk(tree)):
        return set()
    opened = any(isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "open_splits"
                 and any(_is_args_data(a) for a in node.args) for node in ast.walk(tree))
    return DATA_PARAMS | (SPLIT_PARAMS if opened else set())


def check_params(dvc_yaml: dict, base: Path = ROOT) -> list[str]:
    problems = []
    for name, spec in stage_specs(dvc_yaml):
        params = {p for p in spec.get("params", []) if isinstance(p, str)}
        missing = sorted(data_params(base / stage_script(spec)) - params)
        if missing:
            problems.append(f"stage {name} loads the data (args.data): add params {missing}")
    return problems


STUDIES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "studies").glob("*/dvc.yaml"))
PIPELINES = ["dvc.yaml", *STUDIES]  # the paper's run, and the studies beside it


def test_every_study_runs_the_same_stage_file():
    """One pipeline for every study, each folder with its own params: copies, not links (DVC reads a
    dvc.yaml from each commit for `dvc exp show` and `dvc params diff`, and follows no link there)."""
    files = {path: (ROOT / path) for path in STUDIES}
    assert len(files) >= 2 and not any(f.is_symlink() for f in files.values())
    first, *rest = files
    assert all(files[path].read_bytes() == files[first].read_bytes() for path in rest), \
        f"studies' dvc.yaml files differ: copy {first} over the others"


@pytest.fixture(scope="module", params=PIPELINES)
def dvc_yaml(request) -> tuple[dict, Path]:
    """A pipeline file and its folder (the stages' working directory)."""
    path = ROOT / request.param
    return yaml.safe_load(path.read_text()), path.parent


def test_import_closure_follows_common_and_relative_imports():
    closure = import_closure(ROOT / "stages/sensitivity.py")
    # through stages/common.py (config -> models, data -> io) and pruning's relative imports
    assert {"stages/common.py", "hanprune/config.py", "hanprune/data.py", "hanprune/io.py",
            "hanprune/models.py", "hanprune/pruning.py", "hanprune/train.py"} <= closure
    assert "hanprune/tracking.py" in closure      # imported, but excluded from the deps


def test_each_stage_lists_exactly_the_code_it_imports(dvc_yaml):
    """Missing: a change to that file leaves the output stale and `dvc status` silent.
    Extra: a change to that file re-runs the stage (up to 20 minutes) for nothing."""
    problems = check_deps(*dvc_yaml)
    assert not problems, "\n" + "\n".join(problems)


def test_stages_that_load_data_list_the_params_it_depends_on(dvc_yaml):
    """open_splits() finds the data by data.name and splits it with data.val_size/val_seed, on the
    device, threads and numeric mode that `run` sets: all decide the bits of a training or evaluation."""
    problems = check_params(*dvc_yaml)
    assert not problems, "\n".join(problems)


def _git_ls_files(*paths: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.split("\0") if p]


@pytest.fixture(scope="module")
def dvc_stages():
    repo_mod = pytest.importorskip("dvc.repo")
    with repo_mod.Repo(str(ROOT)) as repo:
        yield [(s.addressing, [_rel(Path(o.fs_path)) for o in s.outs], [_rel(Path(d.fs_path)) for d in s.deps])
               for s in repo.index.stages]


def _covered(path: str, outs: list[str]) -> bool:
    return any(path == o or path.startswith(o + "/") for o in outs)


# Results that no stage writes, each with what writes it.
NOT_STAGE_OUTPUTS = {"reports/SEEDS.md": "studies/seeds.py, from the seed experiments (dvc exp show)",
                     "reports/SEEDS-records.md": "studies/seeds.py --study studies/records, likewise",
                     "reports/FRONTIER.md": "studies/frontier.py, from the run and its experiments",
                     "reports/frontier": "studies/frontier.py: its figures"}


def test_every_tracked_result_is_an_output_of_a_stage(dvc_stages):
    """A file left in metrics/, plots/ or reports/ by a dropped stage or round shows in
    `dvc metrics show`, `dvc plots` and the report as if it were a result of the current pipeline."""
    outs = [o for _, stage_outs, _ in dvc_stages for o in stage_outs]
    orphans = [f for f in _git_ls_files("metrics", "plots", "reports")
               if not _covered(f, outs) and not _covered(f, list(NOT_STAGE_OUTPUTS))]
    assert not orphans, f"tracked but produced by no stage of dvc.yaml (git rm them): {orphans}"


def test_every_dep_is_produced_by_a_stage_or_tracked(dvc_stages):
    """A dep that nothing produces and git does not hold fails in a fresh clone (a typo in a path,
    or a stage that starts from a checkpoint no stage writes)."""
    outs = [o for _, stage_outs, _ in dvc_stages for o in stage_outs]
    tracked = _git_ls_files()
    problems: dict[str, list[str]] = {}
    for name, _, deps in dvc_stages:
        for dep in deps:
            produced = _covered(dep, outs) or any(o.startswith(dep + "/") for o in outs)
            if not produced and not any(t == dep or t.startswith(dep + "/") for t in tracked):
                problems.setdefault(dep, []).append(name)
    assert not problems, "deps neither produced by a stage nor tracked by git (git add them?):\n" + "".join(
        f"  {dep} (dep of {len(names)} stages, e.g. {names[0]})\n" for dep, names in problems.items())


def test_model_stages_depend_on_the_architecture_s_file_and_params(dvc_yaml):
    """Every stage that builds a model lists the file that defines its architecture
    (models.<key>.code) and its arch and kwargs. A prune round reaches the file through its start
    checkpoint, which pretrain wrote, and a round's schedule through the scan."""
    pipeline, base = dvc_yaml
    per_model = [(name, spec) for name, spec in stage_specs(pipeline) if "foreach" in pipeline["stages"][name]]
    per_round = {"schedule", "prune"}
    assert {name for name, _ in per_model} == {"pretrain", "sensitivity", "quantize", "encode", "evaluate", "select"} | per_round
    for name, spec in per_model:
        deps = [_dep_name(d) for d in spec.get("deps", [])]
        params = {p for p in spec.get("params", []) if isinstance(p, str)}
        key = "${item.model}" if name in per_round else "${key}"
        if name not in per_round:
            assert "${item.code}" in deps, f"stage {name}: add the dep ${{item.code}}"
        assert {f"models.{key}.arch", f"models.{key}.kwargs"} <= params, f"stage {name}: add the arch params"


def test_each_model_s_code_is_the_file_of_its_arch(dvc_yaml):
    """models.<key>.code is what DVC watches: it must be the file the import path names."""
    base = dvc_yaml[1]
    params = yaml.safe_load((base / "params.yaml").read_text())
    for key, m in params["models"].items():
        module = m["arch"].partition(":")[0] if ":" in m["arch"] else "hanprune.models"
        assert _rel(base / m["code"]) == module.replace(".", "/") + ".py", key
        assert (base / m["code"]).is_file(), key
    train = base / "train.yaml"  # a study's models that it trains itself, each with its code again
    for key, t in (yaml.safe_load(train.read_text())["train"] if train.exists() else {}).items():
        assert t["code"] == params["models"][key]["code"], f"{train}: {key}'s code is not models.{key}.code"


def _pipeline_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("pipeline", ROOT / "benchmarks" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pipeline_without_dvc_runs_dvc_lock_s_stages_in_dependency_order():
    """benchmarks/pipeline.py runs dvc.lock's commands, each stage after every stage whose outputs
    it depends on (dvc.lock lists a stage added later at the end, after stages that depend on it)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    order = _pipeline_module().in_order(lock)
    assert sorted(order) == sorted((name, s["cmd"]) for name, s in lock["stages"].items())
    position = {name: i for i, (name, _) in enumerate(order)}
    for name, stage in lock["stages"].items():
        for other, o in ((m, o["path"]) for m, s in lock["stages"].items() for o in s.get("outs", [])):
            if other != name and any(_covered(d["path"], [o]) or _covered(o, [d["path"]]) for d in stage.get("deps", [])):
                assert position[other] < position[name], f"{name} runs before {other}, whose {o} it reads"


def test_the_pipeline_without_dvc_refuses_a_cycle():
    lock = {"stages": {"a": {"cmd": "a", "deps": [{"path": "y"}], "outs": [{"path": "x"}]},
                       "b": {"cmd": "b", "deps": [{"path": "x"}], "outs": [{"path": "y"}]}}}
    with pytest.raises(SystemExit, match="pipeline: dependency cycle among"):
        _pipeline_module().in_order(lock)


def test_no_stage_script_shadows_a_standard_module():
    """stages/ is sys.path[0] of every stage (and of the MLflow worker it starts): a stages/select.py
    would be imported by `subprocess` in place of the standard `select` and break it."""
    import sys
    clash = sorted(p.stem for p in STAGES_DIR.glob("*.py") if p.stem in sys.stdlib_module_names)
    assert not clash, f"rename these stage scripts: {clash}"
