"""DINO's multi-crop augmentation (torchvision.transforms.v2) and the evaluation transform.

Recipe (DINO's ``DataAugmentationDINO``), every crop: RandomResizedCrop (bicubic), horizontal flip p=0.5,
colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, grayscale p=0.2, then
  * global crop 1: Gaussian blur p=1.0;
  * global crop 2: Gaussian blur p=0.1, solarization p=0.2;
  * each local crop: Gaussian blur p=0.5;
then ToTensor + Normalize (ImageNet mean/std by default).

Gaussian blur: DINO applies PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` with sigma ~ U(0.1, 2.0). PIL's radius
*is* the standard deviation, in pixels, whatever the crop size. Here ``v2.GaussianBlur`` draws the same sigma (in
pixels); its kernel covers +-3 sigma_max: ``kernel_size = 2 * ceil(3 * sigma_max) + 1`` (13 for sigma_max = 2.0),
capped at the largest odd size that fits the crop (reflect padding needs the kernel to be smaller than twice the
crop side; a kernel wider than the crop adds nothing). ``blur_sigma`` is configurable (tiny crops may want a smaller
range); the default is DINO's.

Two backends run this recipe. ``backend="v2"`` composes stock torchvision.transforms.v2 transforms on a uint8 tensor
(solarization threshold 128, as PIL's ``ImageOps.solarize``). ``backend="fast"`` (default) crops each view with the
same RandomResizedCrop sampling (bicubic, antialiased, rounded to uint8 levels), then applies the colour/blur/
solarize steps to all crops of one size as one batch, with per-crop random decisions and factors, using the kernels
below (each checked against torchvision's functional op in tests/test_augment.py). Same distribution of outputs,
about 3x faster on the demo's tiny crops.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from dino_simpool.data.normalization import IMAGENET_MEAN, IMAGENET_STD


def _check_scale(name, scale):
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (min, max), got {scale!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1 (fractions of the image area), got {scale!r}")
    return lo, hi


def _check_size(name, size):
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {size!r}")
    return int(size)


def blur_kernel_size(crop_size, sigma_max):
    """Odd kernel covering +-3 sigma_max, capped to fit a crop of side ``crop_size``."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    cap = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(k, cap))


class _Solarize(torch.nn.Module):
    """PIL ImageOps.solarize semantics on uint8 (threshold 128) or float (threshold 0.5) tensors, with p."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, img):
        if torch.rand(()) >= self.p:
            return img
        thr = 128 if img.dtype == torch.uint8 else 0.5
        return v2.functional.solarize(img, thr)


# ----------------------------------------------------------------------------------------------------------------
# Fast kernels on plain float tensors (..., 3, H, W) in [0, 1], batched over crops with per-crop factors (a float
# or a tensor broadcastable to (N, 1, 1, 1)). Each matches the torchvision.transforms.v2 functional op of the same
# name (tests compare them); batching the crops of one image and using cheaper formulas (a direct HSV hue rotation,
# a separable blur as two small matrix products) skips v2's per-op, per-crop overhead on tiny crops.
_GRAY = torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1)  # torchvision's rgb_to_grayscale weights
_SEXTANT = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def _gray(x):
    return (x * _GRAY.to(x.dtype)).sum(dim=-3, keepdim=True)


def adjust_brightness(x, f):
    return (x * f).clamp_(0, 1)


def adjust_contrast(x, f):
    m = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (x * f + (1 - f) * m).clamp_(0, 1)


def adjust_saturation(x, f):
    return (x * f + (1 - f) * _gray(x)).clamp_(0, 1)


def adjust_hue(x, h):
    """Rotate the HSV hue by ``h`` turns (|h| <= 0.5), keeping S and V: same result as torchvision's adjust_hue."""
    maxc, _ = x.max(dim=-3, keepdim=True)
    minc, _ = x.min(dim=-3, keepdim=True)
    c = maxc - minc
    safe = torch.where(c > 0, c, torch.ones_like(c))
    d = (maxc - x) / safe
    rc, gc, bc = d[..., 0:1, :, :], d[..., 1:2, :, :], d[..., 2:3, :, :]
    r, g = x[..., 0:1, :, :], x[..., 1:2, :, :]
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))  # sextants
    k = torch.remainder(_SEXTANT.to(x.dtype) + hue + 6.0 * h, 6.0)
    return maxc - c * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def rgb_to_grayscale3(x):
    return _gray(x).expand_as(x).clone()


def solarize(x, threshold=128 / 255):
    """PIL ImageOps.solarize on [0, 1] floats: pixels >= threshold are inverted (128 on the uint8 scale)."""
    return torch.where(x >= threshold, 1.0 - x, x)


_REFLECT_INDEX = {}


def _blur_matrices(n, k, sigmas, dtype=torch.float32):
    """(len(sigmas), n, n) matrices B with B @ v = 1-D Gaussian blur of v (reflect padding, torchvision's kernel).
    A sigma <= 0 gives the identity."""
    idx = _REFLECT_INDEX.get((n, k))
    if idx is None:
        src = torch.arange(n).view(n, 1) + torch.arange(k).view(1, k) - k // 2
        src = torch.where(src < 0, -src, src)
        src = torch.where(src >= n, 2 * (n - 1) - src, src)
        idx = _REFLECT_INDEX[(n, k)] = src
    sig = torch.as_tensor(sigmas, dtype=torch.float64).view(-1, 1)
    t = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, k, dtype=torch.float64).view(1, k)
    w = torch.exp(-0.5 * (t / sig.clamp(min=1e-6)) ** 2)
    w = w / w.sum(dim=1, keepdim=True)
    w = torch.where(sig > 0, w, (t == 0).to(w.dtype))  # identity kernel for sigma <= 0 (k is odd)
    m = torch.zeros(sig.shape[0], n, n, dtype=torch.float64)
    m.scatter_add_(2, idx.expand(sig.shape[0], n, k), w.view(-1, 1, k).expand(-1, n, k))
    return m.to(dtype)


def gaussian_blur(x, k, sigma):
    """Separable Gaussian blur with reflect padding: same result as torchvision's gaussian_blur(x, [k, k], sigma).

    ``x`` (3, H, W) with one sigma, or (N, 3, H, W) with one sigma per crop (<= 0: no blur). Done as two small
    matrix products B_h @ x @ B_w^T, much faster than a convolution on tiny crops."""
    if k <= 1:
        return x
    h, w = x.shape[-2:]
    if k // 2 >= min(h, w):
        raise ValueError(f"blur kernel {k} too large for a {h}x{w} image (reflect padding needs k // 2 < side)")
    sig = [float(sigma)] if x.dim() == 3 else torch.as_tensor(sigma).reshape(-1).tolist()
    bh = _blur_matrices(h, k, sig, x.dtype)
    bw = bh if w == h else _blur_matrices(w, k, sig, x.dtype)
    if x.dim() == 3:
        return bh[0] @ x @ bw[0].T
    return bh.unsqueeze(1) @ x @ bw.transpose(1, 2).unsqueeze(1)


def random_resized_crop_params(height, width, scale, log_ratio=(math.log(3 / 4), math.log(4 / 3)), u=None):
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop) -> (top, left, h, w).

    ``u``: optional (10, 4) uniforms in [0, 1) (one row per try), drawn at once by the caller for speed."""
    area = height * width
    if u is None:
        u = torch.rand(10, 4)
    u = u.tolist()
    for a, b, c, d in u:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * b)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return min(int(c * (height - h + 1)), height - h), min(int(d * (width - w + 1)), width - w), h, w
    ratio = (math.exp(log_ratio[0]), math.exp(log_ratio[1]))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _FastCrops:
    """Crops of one size in one batch: RandomResizedCrop (bicubic, antialiased) -> flip p=0.5 ->
    ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 (random op order per crop, as torchvision) -> grayscale p=0.2 ->
    blur p=blur_p[i] -> solarize p=solarize_p[i] -> normalize. Every crop draws its own decisions and factors;
    ``blur_p`` / ``solarize_p`` are per-crop probabilities (so DINO's two global crops share one batch)."""

    _IDENT = torch.tensor([1.0, 1.0, 1.0, 0.0])  # identity brightness, contrast, saturation, hue

    def __init__(self, size, scale, blur_p, blur_sigma, solarize_p, mean, std):
        self.size, self.scale = size, scale
        self.blur_p = torch.tensor(blur_p, dtype=torch.float32)
        self.solarize_p = torch.tensor(solarize_p, dtype=torch.float32)
        self.n = len(blur_p)
        self.blur_sigma = blur_sigma
        self.kernel = blur_kernel_size(size, blur_sigma[1])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x_u8):
        """x_u8: (3, H, W) uint8 -> (n, 3, size, size) float32 normalised."""
        n = self.n
        if n == 0:
            return torch.empty(0, 3, self.size, self.size)
        _, H, W = x_u8.shape
        xf = x_u8.unsqueeze(0).float()
        tries = torch.rand(n, 10, 4)
        crops = []
        for k in range(n):
            top, left, h, w = random_resized_crop_params(H, W, self.scale, u=tries[k])
            # bicubic + antialias, then rounded and clamped to uint8 levels like PIL's resize in DINO
            crops.append(torch.nn.functional.interpolate(xf[:, :, top:top + h, left:left + w], size=(self.size,
                         self.size), mode="bicubic", align_corners=False, antialias=True))
        x = torch.cat(crops).round_().clamp_(0, 255).div_(255.0)
        u = torch.rand(n, 10)
        # Per-crop random decisions and factors.
        flip, jit, gray = (u[:, 0] < 0.5), (u[:, 1] < 0.8), (u[:, 6] < 0.2)
        sig = torch.where(u[:, 7] < self.blur_p, self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0])
                          * u[:, 8], 0.0)
        sol = u[:, 9] < self.solarize_p
        shape = (n, 1, 1, 1)
        if bool(flip.any()):
            x = torch.where(flip.view(shape), x.flip(-1), x) if not bool(flip.all()) else x.flip(-1)
        if bool(jit.any()):
            vals = torch.stack([0.6 + 0.8 * u[:, 2], 0.6 + 0.8 * u[:, 3], 0.8 + 0.4 * u[:, 4],
                                -0.1 + 0.2 * u[:, 5]], dim=1)                   # (n, 4 ops)
            order = torch.argsort(torch.rand(n, 4), dim=1)                       # (n, 4 slots): op at each slot
            onehot = (order.unsqueeze(-1) == torch.arange(4)) & jit.view(n, 1, 1)  # (n, slot, op)
            fac = torch.where(onehot, vals.unsqueeze(1), self._IDENT)             # (n, slot, op)
            need = onehot.any(0).tolist()                                        # [slot][op]
            for slot in range(4):
                for op in range(4):
                    if not need[slot][op]:
                        continue
                    f = fac[:, slot, op].view(shape)
                    if op == 0:
                        x = adjust_brightness(x, f)
                    elif op == 1:
                        x = adjust_contrast(x, f)
                    elif op == 2:
                        x = adjust_saturation(x, f)
                    else:
                        m = onehot[:, slot, 3]
                        x = adjust_hue(x, f) if bool(m.all()) else torch.where(m.view(shape), adjust_hue(x, f), x)
        if bool(gray.any()):
            x = torch.where(gray.view(shape), rgb_to_grayscale3(x), x)
        if bool((sig > 0).any()):
            x = gaussian_blur(x, self.kernel, sig)
        if bool(sol.any()):
            x = torch.where(sol.view(shape), solarize(x), x)
        return (x - self.mean) / self.std


class MultiCropAugmentation:
    """``__call__(img) -> list[Tensor]``: 2 global crops (3, global_size, global_size) then ``local_crops_number``
    local crops (3, local_size, local_size), float32, normalised. ``img`` is a PIL image or a (3, H, W) tensor
    (uint8, or float in [0, 1]).

    ``backend="fast"`` (default) runs the recipe with this module's fused kernels (same ops and probabilities,
    several times faster on small crops); ``backend="v2"`` composes the stock torchvision.transforms.v2 transforms.
    Randomness comes from torch's global generator (DataLoader workers seed it), as in torchvision."""

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96, mean=IMAGENET_MEAN, std=IMAGENET_STD, blur_sigma=(0.1, 2.0),
                 backend="fast"):
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        if isinstance(local_crops_number, bool) or not isinstance(local_crops_number, numbers.Integral) \
                or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be an integer >= 0, got {local_crops_number!r}")
        self.local_crops_number = int(local_crops_number)
        self.global_size = _check_size("global_size", global_size)
        self.local_size = _check_size("local_size", local_size)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must be 3 numbers each (std > 0), got mean={mean!r} std={std!r}")
        try:
            s_lo, s_hi = (float(s) for s in blur_sigma)
        except (TypeError, ValueError):
            raise ValueError(f"blur_sigma must be two numbers (min, max), got {blur_sigma!r}") from None
        if not 0 < s_lo <= s_hi:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {blur_sigma!r}")
        self.blur_sigma = (s_lo, s_hi)
        if backend not in ("fast", "v2"):
            raise ValueError(f"backend must be 'fast' or 'v2', got {backend!r}")
        self.backend = backend
        mean, std = tuple(float(m) for m in mean), tuple(float(v) for v in std)
        gs, ls = self.global_crops_scale, self.local_crops_scale
        # global crop 1: blur p=1.0; global crop 2: blur p=0.1, solarize p=0.2; local crops: blur p=0.5
        self._fast_global = _FastCrops(self.global_size, gs, [1.0, 0.1], self.blur_sigma, [0.0, 0.2], mean, std)
        n_loc = self.local_crops_number
        self._fast_local = _FastCrops(self.local_size, ls, [0.5] * n_loc, self.blur_sigma, [0.0] * n_loc, mean, std)

        def flip_and_color_jitter():
            return [
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
            ]

        def blur(p, size):
            k = blur_kernel_size(size, s_hi)
            return v2.RandomApply([v2.GaussianBlur(kernel_size=k, sigma=self.blur_sigma)], p=p)

        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std)),
                     v2.ToPureTensor()]
        bicubic = v2.InterpolationMode.BICUBIC
        gsize, lsize = self.global_size, self.local_size
        self.global_transfo1 = v2.Compose([
            v2.RandomResizedCrop(gsize, scale=self.global_crops_scale, interpolation=bicubic, antialias=True),
            *flip_and_color_jitter(), blur(1.0, gsize), *normalize])
        self.global_transfo2 = v2.Compose([
            v2.RandomResizedCrop(gsize, scale=self.global_crops_scale, interpolation=bicubic, antialias=True),
            *flip_and_color_jitter(), blur(0.1, gsize), _Solarize(0.2), *normalize])
        self.local_transfo = v2.Compose([
            v2.RandomResizedCrop(lsize, scale=self.local_crops_scale, interpolation=bicubic, antialias=True),
            *flip_and_color_jitter(), blur(0.5, lsize), *normalize])
        self._to_image = v2.Compose([v2.ToImage(), v2.RGB()])

    @property
    def ncrops(self):
        return 2 + self.local_crops_number

    def __call__(self, img):
        if isinstance(img, Image.Image):
            x = torch.from_numpy(np.array(img.convert("RGB") if img.mode != "RGB" else img)).permute(2, 0, 1)
        else:
            x = self._to_image(img)
        if x.dtype != torch.uint8:
            x = v2.functional.to_dtype(x, torch.uint8, scale=True)
        x = x.as_subclass(torch.Tensor)
        if self.backend == "fast":
            return [*self._fast_global(x).unbind(0), *self._fast_local(x).unbind(0)]
        g1, g2, loc = self.global_transfo1, self.global_transfo2, self.local_transfo
        crops = [g1(x), g2(x)]
        crops.extend(loc(x) for _ in range(self.local_crops_number))
        return crops

    def __repr__(self):
        return (f"MultiCropAugmentation(global_crops_scale={self.global_crops_scale}, "
                f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
                f"global_size={self.global_size}, local_size={self.local_size}, blur_sigma={self.blur_sigma}, "
                f"backend={self.backend!r})")


def eval_transform(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """DINO's evaluation transform: Resize(resize, bicubic) -> CenterCrop(crop) -> tensor -> Normalize."""
    resize = _check_size("resize", resize)
    crop = _check_size("crop", crop)
    if crop > resize:
        raise ValueError(f"eval crop ({crop}) must not exceed the resize ({resize})")
    return v2.Compose([
        v2.ToImage(), v2.RGB(),
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ])
