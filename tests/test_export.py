"""Export of trained backbones: files, timm loading, round trips, torch.hub, safe reading."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from dino_simpool.checkpoint import CheckpointError, save_atomic
from dino_simpool.export import export_backbone, export_checkpoint, load_exported, read_export_weights
from dino_simpool.models.backbones import build_backbone
from dino_simpool.models.weights import build_backbone_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


def tiny(pooling="simpool", arch="vit_tiny"):
    kw = TINY if arch.startswith("vit") else {}
    return build_backbone(arch, pooling=pooling, **kw).eval()


def perturbed(model, seed):
    """A copy with different weights (so teacher and student differ, and nothing is left at its init)."""
    g = torch.Generator().manual_seed(seed)
    m = build_backbone(**model.config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def fake_training_checkpoint(path, model, student=None):
    """The training checkpoint layout of docs/reliability.md: backbone.* + head.* per network, config with backbone."""
    student = student or model
    head = {"head.mlp.0.weight": torch.randn(8, model.embed_dim), "head.last_layer.weight_g": torch.ones(16, 1)}
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in model.state_dict().items()}, **head},
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "config": {"backbone": dict(model.config), "lr": 0.0005, "epochs": 1},
        "epoch": 1, "iteration": 7,
    }
    save_atomic(ckpt, path)
    return ckpt


def x_of(model, n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_export_from_training_checkpoint(tmp_path):
    teacher = perturbed(tiny("simpool"), 1)
    student = perturbed(tiny("simpool"), 2)
    ckpt = fake_training_checkpoint(tmp_path / "checkpoint.pth", teacher, student)
    meta = export_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "exp")
    files = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert files == ["backbone.pth", "backbone.safetensors", "config.json"]
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg == json.loads(json.dumps(meta))
    assert (cfg["arch"], cfg["pooling"], cfg["gamma"], cfg["patch_size"], cfg["embed_dim"]) == ("vit_tiny", "simpool", 1.25, 8, 32)
    assert cfg["backbone"] == teacher.config
    blob = json.dumps(ckpt["config"], sort_keys=True, separators=(",", ":"), default=str)
    assert cfg["training_config_sha256"] == hashlib.sha256(blob.encode()).hexdigest()
    assert cfg["source"]["iteration"] == 7
    sd = read_export_weights(tmp_path / "exp" / "backbone.safetensors")
    assert set(sd) == set(teacher.state_dict())  # module./backbone. stripped, head dropped
    assert all(torch.equal(sd[k], v) for k, v in teacher.state_dict().items())
    # --key student takes the other network
    export_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "exp_s", checkpoint_key="student")
    x = x_of(teacher)
    assert torch.equal(load_exported(tmp_path / "exp_s")(x), student(x))
    assert not torch.equal(load_exported(tmp_path / "exp")(x), student(x))


@pytest.mark.parametrize("arch,pooling", [
    ("vit_tiny", "cls"), ("vit_tiny", "gap"),
    pytest.param("resnet_test", "gap", marks=pytest.mark.slow), pytest.param("convnext_test", "gap", marks=pytest.mark.slow),
    # timm model names (issue 13 §2): the export names exactly that timm model
    pytest.param("resnet10t", "gap", marks=pytest.mark.slow), pytest.param("convnext_atto", "gap", marks=pytest.mark.slow),
    pytest.param("deit_tiny_patch16_224", "cls", marks=pytest.mark.slow),
])
def test_timm_loads_cls_and_gap_exports(tmp_path, arch, pooling):
    import timm

    model = perturbed(tiny(pooling, arch), 3)
    meta = export_backbone(model, tmp_path)
    spec = meta["timm"]
    assert meta["layout"] == "timm" and spec["complete"]
    for fname in ("backbone.safetensors", "backbone.pth"):
        t = timm.create_model(spec["model_name"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / fname)), **spec["kwargs"]).eval()
        sd = read_export_weights(tmp_path / fname)
        # timm loads non-strictly when num_classes differs from the pretrained cfg: check the keys ourselves
        assert set(t.state_dict()) == set(sd), (set(t.state_dict()) ^ set(sd))
        assert all(torch.equal(t.state_dict()[k], v) for k, v in sd.items())
        x = x_of(model)
        with torch.no_grad():
            torch.testing.assert_close(t(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,pooling,layout", [
    ("vit_tiny", "cls", "auto"), ("vit_tiny", "gap", "auto"), ("vit_tiny", "cls", "official"),
    pytest.param("resnet_test", "gap", "auto", marks=pytest.mark.slow),
    pytest.param("resnet_test", "gap", "official", marks=pytest.mark.slow),
    pytest.param("convnext_test", "gap", "auto", marks=pytest.mark.slow),
])
def test_timm_local_dir_loads_cls_and_gap_exports_strictly(tmp_path, arch, pooling, layout):
    """config.json is also a timm local-folder config: timm.create_model("local-dir:<folder>") builds the model and
    loads it strictly (num_classes 0 on both sides), with the same features; a new head only adds head keys. The
    official ViT cls and ResNet gap keys are timm's, so those official exports are timm models too."""
    import timm

    model = perturbed(tiny(pooling, arch), 3)
    meta = export_backbone(model, tmp_path / "exp", layout=layout)
    assert meta["timm"]["complete"] and meta["layout"] == ("timm" if layout == "auto" else "official")
    t = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True).eval()
    sd = read_export_weights(tmp_path / "exp" / "backbone.safetensors")
    assert t.num_classes == 0 and set(t.state_dict()) == set(sd)
    x = x_of(model)
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(x), rtol=1e-5, atol=1e-5)
    with_head = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True, num_classes=5)
    assert with_head.num_classes == 5
    assert all(torch.equal(with_head.state_dict()[k], v) for k, v in sd.items())


SIMPOOL_LIKE = [
    ("vit_tiny", "simpool", "auto"), ("vit_tiny", "gem", "auto"), ("vit_tiny", "simpool", "official"),
    pytest.param("resnet_test", "simpool", "auto", marks=pytest.mark.slow),
    pytest.param("convnext_test", "simpool", "official", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch,pooling,layout", SIMPOOL_LIKE)
def test_timm_route_refuses_exports_that_are_not_timm_models(tmp_path, arch, pooling, layout):
    """A SimPool (or any own-pooling) export through the cls/gap recipe, or through timm's local-dir route, must fail
    with a message that names this project's loader, not load nothing and hand back a random network."""
    import timm

    model = perturbed(tiny(pooling, arch), 7)
    meta = export_backbone(model, tmp_path / "exp", layout=layout)
    spec = json.loads((tmp_path / "exp" / "config.json").read_text())["timm"]
    assert spec == json.loads(json.dumps(meta["timm"])) and not spec["complete"] and spec["kwargs"] == {}
    for fname in ("backbone.safetensors", "backbone.pth"):
        with pytest.raises(RuntimeError, match=r"Unknown model \(dino-simpool .* load it with load_exported\(folder\)"):
            timm.create_model(spec["model_name"], pretrained=True, num_classes=0, **spec["kwargs"],
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "exp" / fname)))
    with pytest.raises(RuntimeError, match=r"load it with load_exported\(folder\) from dino_simpool's export module"):
        timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True)
    x = x_of(model)
    with torch.no_grad():  # while the project's loader reads it completely
        assert torch.equal(load_exported(tmp_path / "exp")(x), model(x))


def test_simpool_round_trip_from_config_json_alone(tmp_path):
    import timm

    from dino_simpool.models.weights import build_backbone_from_checkpoint
    from dino_simpool.pooling import SimPool

    model = perturbed(tiny("simpool"), 4)
    meta = export_backbone(model, tmp_path / "exp")
    x = x_of(model)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(load_exported(tmp_path / "exp")(x), ref)
        assert torch.equal(load_exported(tmp_path / "exp" / "backbone.pth")(x), ref)
        other, _ = build_backbone_from_checkpoint(tmp_path / "exp")  # the evaluators' loader reads exports too
        assert torch.equal(other.eval()(x), ref)
        # the documented timm equivalent: timm ViT without class token + SimPool + final norm
        enc = meta["timm"]["encoder"]
        sd = read_export_weights(tmp_path / "exp" / "backbone.safetensors")
        t = timm.create_model(enc["model_name"], pretrained=False, num_classes=0, **enc["kwargs"]).eval()
        assert enc["kwargs"]["class_token"] is False and enc["kwargs"]["global_pool"] == ""
        t.load_state_dict({k[len(enc["prefix"]):]: v for k, v in sd.items() if k.startswith(enc["prefix"])},
                          strict=True)
        sp = SimPool(32, gamma=meta["gamma"], use_beta=True).eval()
        sp.load_state_dict({k[len("pool."):]: v for k, v in sd.items() if k.startswith("pool.")}, strict=True)
        tokens = t.blocks(t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x)))))
        torch.testing.assert_close(t.norm(sp(tokens)), ref, rtol=1e-5, atol=1e-5)


def test_safetensors_preferred_when_both_exist(tmp_path):
    model = perturbed(tiny("cls"), 5)
    export_backbone(model, tmp_path)
    sd = read_export_weights(tmp_path / "backbone.pth")
    torch.save({k: torch.zeros_like(v) for k, v in sd.items()}, tmp_path / "backbone.pth")  # now they differ
    x = x_of(model)
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path)(x), model(x))  # the folder reads backbone.safetensors
    # the altered .pth is not the file config.json describes: refused by every loader, not loaded under that config
    for load in (load_exported, build_backbone_from_checkpoint):
        with pytest.raises(CheckpointError, match="sha256 differs"):
            load(tmp_path / "backbone.pth")
    (tmp_path / "backbone.safetensors").unlink()
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_exported(tmp_path)  # falls back to the .pth, which is refused


def test_weights_copied_over_another_export_are_refused(tmp_path):
    """Same architecture, other weights: the keys and shapes all match, so only the digest can tell."""
    a, b = perturbed(tiny("simpool"), 1), perturbed(tiny("simpool"), 2)
    export_backbone(a, tmp_path / "a")
    export_backbone(b, tmp_path / "b")
    (tmp_path / "a" / "backbone.safetensors").write_bytes((tmp_path / "b" / "backbone.safetensors").read_bytes())
    for load in (load_exported, build_backbone_from_checkpoint):
        with pytest.raises(CheckpointError, match="sha256 differs.*export it again"):
            load(tmp_path / "a")


def test_an_interrupted_export_leaves_no_config_over_new_weights(tmp_path, monkeypatch):
    """config.json is removed before the weights are replaced and written last (each file atomically): a crash in
    between leaves weights without a config, which loaders refuse, never new weights under the old config."""
    import dino_simpool.export as ex

    old, new = perturbed(tiny("simpool"), 1), perturbed(tiny("simpool"), 2)
    export_backbone(old, tmp_path)
    real = ex.write_atomic

    def crash_on_config(path, write, *a, **k):
        if Path(path).name == "config.json":
            raise KeyboardInterrupt  # the job killed between the weights and the config
        return real(path, write, *a, **k)

    monkeypatch.setattr(ex, "write_atomic", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        export_backbone(new, tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pth", "backbone.safetensors"]  # no temporaries
    with pytest.raises(CheckpointError):
        load_exported(tmp_path)
    export_backbone(new, tmp_path)  # exporting again repairs it
    x = x_of(new)
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path)(x), new(x))


class _Payload:  # any non-plain object: unpickling it would need arbitrary code
    def __reduce__(self):
        return (print, ("this should never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    model = tiny("cls")
    export_backbone(model, tmp_path)
    (tmp_path / "backbone.safetensors").unlink()
    torch.save({**model.state_dict(), "evil": _Payload()}, tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match="sha256 differs"):  # not the exported file: refused before reading
        load_exported(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["files"]  # a config without digests (hand-written): the unpickler itself must refuse the code
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing"):
        load_exported(tmp_path)
    assert "should never run" not in capsys.readouterr().out


def test_export_errors(tmp_path):
    torch.save(tiny("cls").state_dict(), tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match="config.json"):
        load_exported(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an export folder"):
        load_exported(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        load_exported(tmp_path / "missing")


def test_hub_entries(tmp_path):
    model = perturbed(tiny("simpool"), 6)
    export_backbone(model, tmp_path / "exp")
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    names = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]  # torch.hub's rule
    assert hubconf.dependencies == ["torch", "timm"]
    assert {"vit_small_simpool", "vit_small_cls", "resnet50_simpool", "resnet50_gap", "convnext_small_simpool"} <= set(names)
    hub = torch.hub.load(str(REPO), "vit_tiny_simpool", source="local", weights=str(tmp_path / "exp"))
    x = x_of(model)
    with torch.no_grad():
        assert torch.equal(hub(x), model(x))
    rand = torch.hub.load(str(REPO), "vit_tiny_cls", source="local", **TINY)
    assert rand.config["pooling"] == "cls" and rand.embed_dim == 32
    with pytest.raises(ValueError, match="vit_tiny_simpool"):
        torch.hub.load(str(REPO), "vit_tiny_cls", source="local", weights=str(tmp_path / "exp"))


def test_export_cli(tmp_path, capsys):
    from eval.export import main

    fake_training_checkpoint(tmp_path / "checkpoint.pth", tiny("gap"))
    assert main(["--checkpoint", str(tmp_path), "--output_dir", str(tmp_path / "exp")]) == 0
    out = capsys.readouterr().out
    assert "timm.create_model('vit_tiny_patch16_224', pretrained=True" in out
    assert main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--output_dir", str(tmp_path / "e2"), "--key", "ema"]) == 2
    err = capsys.readouterr().err
    assert "no 'ema' entry" in err and len(err.strip().splitlines()) == 1
    assert main(["--checkpoint", str(tmp_path / "nope.pth"), "--output_dir", str(tmp_path / "e3")]) == 2
    assert "not found" in capsys.readouterr().err
