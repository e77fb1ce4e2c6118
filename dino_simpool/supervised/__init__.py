"""Supervised image classification with any backbone and any pooling (the SimPool paper's supervised rows).

``config`` (the options, each declared once), ``model`` (backbone + linear classifier), ``data`` (timm's transforms,
mixup and losses; the resumable loaders), ``step`` (one iteration), ``trainer`` (the loop, validation, checkpoints);
the command line is ``python -m dino_simpool.supervised`` (``dino-simpool-supervised``).
"""
