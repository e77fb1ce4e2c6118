"""dino-simpool: DINO self-supervised pretraining with SimPool pooling."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="dino-simpool",
    version="0.1.0",
    description="DINO self-supervised pretraining where the pooled vector comes from SimPool (ICCV 2023).",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The repository's top-level eval/ and launch/ install as dino_simpool.eval and dino_simpool.launch, so that no
    # top-level "eval" or "launch" package lands in site-packages (both names collide with other installs). From the
    # repository root, `python -m eval.knn` keeps working: eval/ and launch/ import each other's modules relatively.
    packages=[*find_packages(include=["dino_simpool", "dino_simpool.*"]), "dino_simpool.eval", "dino_simpool.launch"],
    package_dir={"dino_simpool.eval": "eval", "dino_simpool.launch": "launch"},
    package_data={"dino_simpool.launch": ["recipes/*.yaml", "recipes/supervised/*.yaml", "templates/*"]},
    install_requires=[
        # Floors only: pip on the reference machine is capped at torch<=2.14.1 / torchvision<=0.29.1.
        # Never add an upper pin below 2.14 (it resolves to a CPU build that no torchvision imports with).
        "torch>=2.5",  # torch.serialization.get_unsafe_globals_in_checkpoint (weights_only loading)
        "torchvision>=0.20",
        "timm>=1.0.10",  # 1.0.10 adds test_resnet / test_convnext (the tiny CNNs of the tests)
        "faiss-cpu>=1.8",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "pillow>=10.0",
        "tqdm>=4.66",
        "scipy>=1.10",
        "kornia>=0.7",  # batched Gaussian blur with one sigma per image (multi-crop stage 2)
    ],
    extras_require={
        "dev": ["pytest>=8.0", "hypothesis>=6.100", "pytest-timeout>=2.3",
                "scikit-learn>=1.3"],  # benchmarks/small_images.py: the digits data set (load_digits)
    },
    entry_points={
        "console_scripts": [
            "dino-simpool-train=dino_simpool.train:main",
            "dino-simpool-supervised=dino_simpool.supervised.cli:main",
            "dino-simpool-knn=dino_simpool.eval.knn:main",
            "dino-simpool-linear=dino_simpool.eval.linear:main",
            "dino-simpool-launch=dino_simpool.launch.slurm:main",
            "dino-simpool-export=dino_simpool.eval.export:main",
            "dino-simpool-attention=dino_simpool.eval.attention:main",
        ],
    },
)
