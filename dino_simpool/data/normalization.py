"""ImageNet's per-channel mean and std: the normalisation of DINO's crops, of its evaluation transform and of the
pictures fed to the evaluators (the same values as torchvision's and timm's ImageNet weights)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
