"""The layers: the library (dino_simpool/) never imports the evaluators (eval/) or the launcher (launch/), and an
install puts them under the dino_simpool namespace, never as top-level ``eval`` / ``launch`` packages."""
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UPPER = ("eval", "launch", "dino_simpool.eval", "dino_simpool.launch")

# Imports every module named on the command line, in order, and prints {module: [upper-layer modules it loaded]}.
_CHECK = """
import importlib, json, sys
UPPER = {upper!r}
def upper():
    return sorted(m for m in sys.modules if any(m == u or m.startswith(u + ".") for u in UPPER))
found = {{}}
for name in sys.argv[1:]:
    importlib.import_module(name)
    if upper():
        found[name] = upper()
        break
print(json.dumps(found))
"""


def library_modules() -> list[str]:
    names = []
    for path in sorted((REPO / "dino_simpool").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__main__":  # a package's command line (python -m): importing it runs the command
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def first_upward_import(modules: list[str]) -> dict:
    """Import ``modules`` one after another in a fresh interpreter that *can* import eval/ and launch/ (the repository
    root is on its path); return the first module after whose import one of them is loaded."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CHECK.format(upper=UPPER), *modules], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_library_file_names_eval_or_launch_in_an_import():
    """Static: also the imports inside functions (the ones that only run when, say, the periodic k-NN runs)."""
    bad = []
    for path in sorted((REPO / "dino_simpool").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                    if any(n == u or n.startswith(u + ".") for u in UPPER)]
    assert not bad, "the library imports an upper layer:\n" + "\n".join(bad)


@pytest.mark.slow
def test_importing_every_library_module_loads_no_evaluator_or_launcher():
    modules = library_modules()
    assert "dino_simpool.dino.trainer" in modules and "dino_simpool.evaluation.knn" in modules
    assert first_upward_import(modules) == {}


@pytest.mark.slow
def test_the_import_check_sees_an_upward_import():
    """The check above can fail: a module that imports eval is caught, and named."""
    found = first_upward_import(["dino_simpool.checkpoint", "eval.knn", "dino_simpool.logs"])
    assert list(found) == ["eval.knn"] and "eval" in found["eval.knn"]


# ------------------------------------------------------------------------------------------------- installation
def _source_copy(tmp_path: Path) -> Path:
    """The working tree's package sources, copied (pip's in-tree build would write build/ into the checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    for name in ("dino_simpool", "eval", "launch"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def _venv_with_this_env(tmp_path: Path) -> tuple[Path, Path]:
    """A new venv that sees this interpreter's site-packages (torch, timm, setuptools: nothing is downloaded) after
    its own; returns (its python, its site-packages)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_dino_simpool_test_parent.pth").write_text("\n".join(sorted(here)) + "\n")
    return py, site


def _pip_install(py: Path, *args: str) -> None:
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--ignore-installed", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _run_outside(tmp_path: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run from a folder that is not the repository, without PYTHONPATH: only what was installed is importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run(list(cmd), cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)


_WHERE = """
import json, sys
import dino_simpool.eval.knn, dino_simpool.eval.linear, dino_simpool.launch.slurm
out = {"knn": dino_simpool.eval.knn.__file__, "template": dino_simpool.launch.slurm.TEMPLATE.is_file(),
       "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("eval", "launch"))}
for name in ("eval", "launch"):
    try:
        __import__(name)
        out[name] = sys.modules[name].__file__
    except ModuleNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


@pytest.mark.slow
def test_pip_install_puts_no_top_level_eval_or_launch(tmp_path):
    src = _source_copy(tmp_path)
    py, site = _venv_with_this_env(tmp_path)
    _pip_install(py, str(src))
    meta = _run_outside(tmp_path, str(py), "-c", (
        "import importlib.metadata as m, json; d = m.distribution('dino-simpool'); "
        "print(json.dumps({'at': str(d.locate_file('')), 'top': d.read_text('top_level.txt').split(), "
        "'files': [str(f) for f in d.files]}))"))
    assert meta.returncode == 0, meta.stderr[-3000:]
    info = json.loads(meta.stdout)
    assert Path(info["at"]).resolve() == site.resolve()  # the new venv's dino-simpool, not this environment's
    assert info["top"] == ["dino_simpool"]
    tops = {Path(f).parts[0] for f in info["files"]}
    assert "eval" not in tops and "launch" not in tops, sorted(tops)
    assert "dino_simpool/eval/knn.py" in info["files"] and "dino_simpool/launch/templates/slurm.sbatch" in info["files"]
    assert not (site / "eval").exists() and not (site / "launch").exists()

    where = _run_outside(tmp_path, str(py), "-c", _WHERE)
    assert where.returncode == 0, where.stderr[-3000:]
    got = json.loads(where.stdout)
    assert got["knn"] == str(site / "dino_simpool" / "eval" / "knn.py") and got["template"]
    assert got["loaded"] == [] and got["eval"] is None and got["launch"] is None
    for script in ("dino-simpool-knn", "dino-simpool-launch"):
        res = _run_outside(tmp_path, str(py.parent / script), "--help")
        assert res.returncode == 0 and res.stdout.startswith(f"usage: {script}"), (script, res.stderr[-2000:])


@pytest.mark.slow
def test_editable_install_maps_eval_and_launch_under_dino_simpool(tmp_path):
    """``pip install -e .`` (what dev.sh does): the console scripts import the checkout's eval/ as dino_simpool.eval,
    and outside the repository there is no top-level eval or launch."""
    src = _source_copy(tmp_path)
    py, _ = _venv_with_this_env(tmp_path)
    _pip_install(py, "-e", str(src))
    where = _run_outside(tmp_path, str(py), "-c", _WHERE)
    assert where.returncode == 0, where.stderr[-3000:]
    got = json.loads(where.stdout)
    assert got["knn"] == str(src / "eval" / "knn.py") and got["template"]
    assert got["loaded"] == [] and got["eval"] is None and got["launch"] is None
    res = _run_outside(tmp_path, str(py.parent / "dino-simpool-knn"), "--help")
    assert res.returncode == 0 and "--pretrained_weights" in res.stdout, res.stderr[-2000:]
    # from the repository root, the evaluators still run as python -m eval.<name>
    res = subprocess.run([str(py), "-m", "eval.knn", "--help"], cwd=src, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0 and res.stdout.startswith("usage: dino-simpool-knn"), res.stderr[-2000:]
