"""What training and the evaluators both need: feature extraction (``features``), the weighted k-NN vote (``knn``),
the attention pictures (``attention``) and the pictures' input size and tensors (``images``).

The evaluators' command lines live in ``eval/`` and import from here; nothing here imports ``eval`` or ``launch``.
"""
