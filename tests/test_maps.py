"""eval.maps and eval.model_args: --device validation, the model input size (--image_size / --max_size), unique output names."""
import pytest
import torch

from dino_simpool.evaluation.images import model_input_size, unique_names
from eval.maps import list_images_named
from eval.model_args import resolve_device


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:99", "banana"])
def test_bad_device_is_a_value_error(name):
    with pytest.raises(ValueError, match="--device"):
        resolve_device(name)


def test_device_defaults_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_value_error():
    with pytest.raises(ValueError, match="no CUDA GPU is available here; use --device cpu"):
        resolve_device("cuda")


@pytest.mark.parametrize("module", ["eval.attention", "eval.localization", "eval.discovery"])
def test_evaluators_exit_2_with_one_line_on_a_bad_device(module, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    argv = ["--device", "gpu", "--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2",
            "--patch_size", "8", "--synthetic_size", "32"]
    if module == "eval.attention":
        argv += ["--output_dir", str(tmp_path), "--num_images", "1"]
    else:
        argv += ["--synthetic_per_class", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device 'gpu' is not a torch device" in err


def test_model_input_size():
    # default: longest side capped at 480 (DINO's visualize_attention), aspect kept, patch multiples
    assert model_input_size((3000, 4000), 16, None) == (352, 480)
    assert model_input_size((375, 500), 16, None) == (352, 480)
    assert model_input_size((100, 3000), 14, None) == (14, 476)  # at least one patch; never above the cap
    assert model_input_size((3000, 4000), 16, None, max_size=0) == (3008, 4000)  # 0 / None: full size
    assert model_input_size((3000, 4000), 16, None, max_size=None) == (3008, 4000)
    assert model_input_size((30, 41), 8, None) == (32, 40)  # small images keep their size (rounded)
    assert model_input_size((3000, 4000), 16, 224) == (224, 224)  # --image_size wins


def test_unique_names(tmp_path):
    assert unique_names([("a", "x.png"), ("b", "x.jpg"), ("x.png",), ("x.jpg",), ("y.png",)]) == \
        ["a__x", "b__x", "x_png", "x_jpg", "y"]
    assert unique_names([("x.png",), ("x.png",), ("x.png",)]) == ["x_png", "x_png_2", "x_png_3"]
    (tmp_path / "d" / "s").mkdir(parents=True)
    for rel in ("d/s/p.png", "d/p.png", "q.jpg"):
        (tmp_path / rel).write_bytes(b"")
    got = list_images_named([tmp_path / "d", tmp_path / "q.jpg"])
    assert [(p.relative_to(tmp_path).as_posix(), n) for p, n in got] == \
        [("d/p.png", "p"), ("d/s/p.png", "s__p"), ("q.jpg", "q")]
