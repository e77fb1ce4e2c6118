"""The shared model options: one gamma parser and one pooling/mode resolver for every command line."""
import pytest

from dino_simpool.models.options import parse_gamma, resolve_gamma, resolve_pooling


@pytest.mark.parametrize("raw, want", [(1.25, 1.25), ("2", 2.0), ("None", None), ("null", None), (None, None),
                                       ("DEFAULT", "default"), (" 0.5 ", 0.5)])
def test_parse_gamma_accepts(raw, want):
    assert parse_gamma(raw) == want


@pytest.mark.parametrize("raw", ["abc", "0", "-1", 0, True, "inf", ""])
def test_parse_gamma_refuses(raw):
    with pytest.raises(ValueError, match="gamma"):
        parse_gamma(raw)


def test_resolve_gamma_per_family():
    assert resolve_gamma("default", "vit") == 1.25
    assert resolve_gamma("default", "resnet") == 2.0
    assert resolve_gamma("None", "convnext") is None


@pytest.mark.parametrize("family, want", [("vit", "cls"), ("resnet", "gap"), ("convnext", "gap")])
def test_official_mode_is_the_familys_pooling(family, want):
    assert resolve_pooling(None, family, mode="official") == want
    assert resolve_pooling("official", family) == want
    assert resolve_pooling(want, family, mode="official") == want


def test_mode_and_pooling_must_agree():
    assert resolve_pooling(None, "vit", mode="simpool") == "simpool"
    assert resolve_pooling("GeM", "resnet") == "gem"
    with pytest.raises(ValueError, match="give only one"):
        resolve_pooling("gap", "vit", mode="simpool")
    with pytest.raises(ValueError, match="--mode"):
        resolve_pooling(None, "vit", mode="nope")
