"""``--num_threads`` on every command (issue 13 §5): one helper (dino_simpool.cli), applied when parsed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_simpool.cli import OneLineErrorParser, add_num_threads_flag, apply_num_threads
from eval import attention, discovery, export, knn, linear, localization

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {
    "knn": knn.build_parser, "linear": linear.get_args_parser, "attention": attention.build_parser,
    "localization": localization.build_parser, "discovery": discovery.build_parser, "export": export.build_parser,
}
REQUIRED = {"attention": ["--output_dir", "x"], "export": ["--pretrained_weights", "w", "--output_dir", "x"]}


@pytest.fixture
def threads():
    """Restore the test process's thread count and OMP_NUM_THREADS afterwards."""
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_evaluator_applies_num_threads_when_parsed(name, threads, capsys):
    parser = PARSERS[name]()
    torch.set_num_threads(1)
    args = parser.parse_args(REQUIRED.get(name, []) + ["--num_threads", "3"])
    assert args.num_threads == 3 and torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    args = parser.parse_args(REQUIRED.get(name, []))
    assert args.num_threads is None and torch.get_num_threads() == 3  # not given: left as it is
    assert "--num_threads N" in parser.format_help()
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(REQUIRED.get(name, []) + ["--num_threads", bad])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.count("\n") == 0 and "--num_threads" in err, err


def test_demo_applies_num_threads_and_passes_it_to_training(tmp_path, threads, capsys):
    from eval import demo

    torch.set_num_threads(1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("not the demo's")
    assert demo.main(["--num_threads", "2", "--output_dir", str(busy)]) == 2  # refused after parsing
    assert torch.get_num_threads() == 2 and (busy / "keep.txt").is_file()
    assert "not written by the demo" in capsys.readouterr().err
    assert "--num_threads 2" in " ".join(demo.demo_argv("o", num_threads=2))
    with pytest.raises(SystemExit) as e:
        demo.main(["--num_threads", "0"])
    assert e.value.code == 2


@pytest.mark.slow
def test_apply_num_threads_reaches_faiss_imported_before_torch():
    """faiss imported first keeps its own OpenMP pool, which torch.set_num_threads does not reach (measured: 1 vs 2);
    the helper sets it too. A fresh process, since the import order is what matters."""
    pytest.importorskip("faiss")
    code = ("import faiss, torch\n"
            "from dino_simpool.cli import OneLineErrorParser\n"
            "p = OneLineErrorParser('x'); p.add_num_threads_flag(); p.parse_args(['--num_threads', '3'])\n"
            "print(torch.get_num_threads(), faiss.omp_get_max_threads())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["3", "3"]


def test_helper_on_a_plain_parser_and_none(threads):
    import argparse

    p = argparse.ArgumentParser()
    add_num_threads_flag(p)
    torch.set_num_threads(1)
    assert p.parse_args(["--num_threads", "2"]).num_threads == 2 and torch.get_num_threads() == 2
    apply_num_threads(None)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="--num_threads must be >= 1"):
        apply_num_threads(0)
    assert isinstance(OneLineErrorParser("y"), argparse.ArgumentParser)


@pytest.mark.slow
def test_supervised_command_applies_num_threads(tmp_path):
    """``dino-simpool-supervised --num_threads N`` (and the recipe key) sets torch's threads before training: the
    run's first step sees N threads (a real process, one iteration on the embedded data)."""
    code = ("import sys, torch\n"
            "from dino_simpool.supervised.cli import main\n"
            "from dino_simpool.supervised.trainer import Hooks\n"
            "seen = []\n"
            "rc = main(sys.argv[1:], hooks=Hooks(before_step=lambda it: seen.append(torch.get_num_threads())))\n"
            "print('THREADS', seen[0], rc)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    common = ["--gp", "avg", "--epochs", "1", "--max-iters", "1", "--synthetic-per-class", "4", "-b", "8", "--workers", "0",
              "--attention-images", "0"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_threads: 1\n")
    for extra, want in ((["--num_threads", "2"], "2"), (["--config", str(recipe)], "1")):
        out = tmp_path / want
        r = subprocess.run([sys.executable, "-c", code, *common, *extra, "--output", str(out)], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"THREADS {want} 0" in r.stdout, r.stdout[-1000:]
