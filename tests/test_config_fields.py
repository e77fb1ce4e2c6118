"""The flag machinery (one field per flag; the parser, coercion, checks and help derived) and result_differences."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest
import yaml

from dino_simpool.config import TrainConfig, build_parser, parse_config, result_differences
from dino_simpool.config.fields import (Alias, add_flags, at_least, check_fields, coerce_fields, flag_fields,
                                        flag_group, help_text)

demo = flag_group("demo")


@dataclass
class Tiny:
    steps: int = demo(10, "steps to run", dino=20, embedded=2, check=at_least(1))
    rate: float | None = demo(None, "a rate", default_text="per model")
    kind: str = demo("fast", "fast or slow", choices=("fast", "slow"))
    span: tuple[float, float] = demo((0.1, 1.0), "a range")
    ks: tuple[int, ...] = demo((1, 2), "some k", affects_result=False)
    verbose: bool = demo(False, "chatty", aliases=("--chatty",))


def _parser() -> argparse.ArgumentParser:
    return add_flags(argparse.ArgumentParser(argument_default=argparse.SUPPRESS), Tiny, ["demo"],
                     [Alias("fast", "kind", "alias of --kind fast")])


def test_one_field_gives_the_flag_its_type_help_and_checks():
    p = _parser()
    ns = vars(p.parse_args("--steps 3 --rate none --kind SLOW --span 0.2 0.5 --ks 5 6 7 --chatty yes".split()))
    assert ns == {"steps": 3, "rate": None, "kind": "slow", "span": [0.2, 0.5], "ks": [5, 6, 7], "verbose": True}
    t = Tiny(**ns)
    coerce_fields(t)
    assert (t.span, t.ks) == ((0.2, 0.5), (5, 6, 7))
    assert vars(p.parse_args([])) == {}  # only what is given: a recipe below is not overridden
    helps = {a.dest: a.help for a in p._actions}
    assert helps["steps"] == "steps to run [DINO: 20] (default: 10) [embedded: 2]"
    assert helps["rate"] == "a rate (default: per model)"
    assert "--fast" in p.format_help() and "--chatty" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "1.5"])
    with pytest.raises(SystemExit):
        p.parse_args(["--kind", "medium"])
    # values from YAML: strings and lists are coerced; the range check names the flag
    t = Tiny(steps="4", rate="0.5", span=[0, 1], ks=3)
    coerce_fields(t)
    assert (t.steps, t.rate, t.span, t.ks) == (4, 0.5, (0.0, 1.0), (3,))
    t = Tiny(steps=0)
    coerce_fields(t)
    with pytest.raises(ValueError, match="--steps must be >= 1; got 0"):
        check_fields(t)
    with pytest.raises(ValueError, match="--kind must be one of fast, slow; got 'medium'"):
        coerce_fields(Tiny(kind="medium"))
    assert [f.name for f in flag_fields(Tiny) if not f.flag.affects_result] == ["ks"]


def test_every_trainconfig_field_is_a_flag_and_round_trips(tmp_path):
    """The parser, to_dict and from_dict are all derived from the same fields."""
    dests = {a.dest for a in build_parser()._actions} - {"help", "mode", "use_fp16"}
    assert dests == set(TrainConfig().to_dict()) == {f.name for f in flag_fields(TrainConfig)}
    for f in flag_fields(TrainConfig):
        assert f.flag.help and help_text(f)
    c = parse_config(["--data_path", "/d", "--arch", "resnet_test", "--nb_knn", "3", "--num_threads", "2"])
    back = TrainConfig.from_dict(yaml.safe_load(c.save_yaml(tmp_path / "config.yaml").read_text()))
    assert back == c and back.preset == "dino" and back.num_threads == 2


# flags whose value does not change what a run computes (they may differ on a resume); every other flag does
NOT_RESULT = {"num_workers", "loader_nice", "output_dir", "saveckp_freq", "max_iters", "log_every", "eval_every",
              "nb_knn", "temperature", "dist_url", "backend", "local_rank", "num_threads", "config", "preset",
              "compile", "resume_force", "aug_pipeline"}


def test_affects_result_is_decided_for_every_flag():
    assert {f.name for f in flag_fields(TrainConfig) if not f.flag.affects_result} == NOT_RESULT


def test_result_differences_lists_what_changes_the_result(tmp_path):
    base = ["--data_path", "/data/a", "--arch", "vit_small"]
    stored_cfg = parse_config(base).resolve("cpu")
    stored = yaml.safe_load(stored_cfg.save_yaml(tmp_path / "config.yaml").read_text())  # as a run stores it
    assert result_differences(stored, stored_cfg.to_dict()) == []
    # flags that do not change the result may differ
    same = parse_config(base + ["--num_workers", "0", "--loader_nice", "5", "--output_dir", "/else", "--log_every", "1",
                                "--eval_every", "0", "--saveckp_freq", "1", "--max_iters", "7", "--num_threads", "1",
                                "--dist_url", "tcp://h:1", "--backend", "gloo", "--local_rank", "3",
                                "--nb_knn", "1", "--temperature", "0.1"]).resolve("cpu")
    assert result_differences(stored, same.to_dict()) == []
    # those that do are listed, one line each, naming the flag and both values
    other = parse_config(["--data_path", "/data/b", "--arch", "vit_tiny", "--gamma", "None", "--lr", "0.001",
                          "--seed", "1", "--batch_size_per_gpu", "32", "--epochs", "50", "--local_crops_number", "2",
                          "--optimizer", "sgd", "--out_dim", "1000", "--pooling", "simpool"]).resolve("cpu")
    lines = result_differences(stored, other.to_dict())
    flags = [line.split(":")[0] for line in lines]
    assert flags == ["--arch", "--pooling", "--gamma", "--out_dim", "--batch_size_per_gpu", "--epochs", "--lr",
                     "--optimizer", "--local_crops_number", "--data_path", "--seed"]
    assert "--lr: 0.0005 in the stored run, 0.001 now" in lines
    assert "--gamma: 1.25 in the stored run, None now" in lines
    # a run stored before a flag existed: the missing key counts as the flag's default
    older = {k: v for k, v in stored.items() if k != "clip_grad_mode"}
    assert result_differences(older, stored_cfg.to_dict()) == []
    assert result_differences(older, {**stored, "clip_grad_mode": "global"}) == \
        ["--clip_grad_mode: per_tensor in the stored run, global now"]
    assert result_differences({**stored, "removed_flag": 1}, stored) == []  # not a flag: ignored
