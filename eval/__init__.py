"""The evaluators' command lines (k-NN, linear probe, attention, localization, discovery, export, the demo) and the work
only they do. The repository runs them as ``python -m eval.<name>``; an install names this folder ``dino_simpool.eval``
(setup.py's package_dir), so modules here import each other relatively and the library absolutely."""
