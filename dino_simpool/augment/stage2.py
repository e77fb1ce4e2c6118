"""Stage 2 of the multi-crop pipeline (the training device, batched): a pure function of crops and parameters.

``ColorStage(recipe)(crops, params) -> list of normalised float32 crops``: flip -> colour jitter (per-sample factors,
per-sample op order) -> grayscale -> Gaussian blur (per-sample sigma) -> solarize -> normalise, each with the
per-crop decisions that stage 1 drew (``recipe.P_*`` columns). It draws no random number, so its output depends on
its inputs only, on whichever device it runs.

Every op equals torchvision.transforms.v2.functional's op on the same float image with the same parameter to ~1e-6,
and the whole stage to < 1e-4 on the [0, 1] scale (the requirement is 1/255; tests/test_augment_pipeline.py).
Where each op comes from:

* Gaussian blur: ``kornia.filters.gaussian_blur2d`` (per-sample sigma, reflect padding, separable): exact, and on one
  core the fastest of kornia (1.6 ms per 224 px crop), torchvision (4.1) and the earlier matrix-product kernel (2.6),
  called on CPU in chunks of ~2M values (cache-sized).
* brightness / contrast / saturation: torchvision's ``_blend`` (``f * x + (1 - f) * m``, ``m`` being 0, the mean
  grey or the grey image) with one factor per image, a line each; with the per-sample random order, each jitter slot
  runs each op on the rows that hold it there (kornia's ops would do the same with more checks per call).
* hue: ``adjust_hue`` below, the HSV hue rotation written directly on RGB (keeps V = max and C = max - min).
  kornia's ``adjust_hue`` (RGB -> HSV -> RGB) gives the same result but costs 4x more on CPU (4.1 vs 1.0 ms per
  224 px crop, one core); hue is the most expensive op of the recipe.
* grayscale, solarize, normalise: torchvision's functional ops (batched already).

kornia.augmentation itself is not used: its ``ColorJitter`` draws one op order per batch (torchvision draws one per
image) and its random parameters are drawn on the device, while this pipeline draws all of them in stage 1.
"""
from __future__ import annotations

import torch
from kornia.filters import gaussian_blur2d
from torchvision.transforms.v2 import functional as F

from .recipe import P_BRIGHTNESS, P_FLIP, P_GRAY, P_JITTER, P_ORDER, P_SIGMA, P_SOLARIZE, Recipe

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize: levels >= 128 are inverted


def gray(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(-3)
    return (r * _GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(-3)


def adjust_hue(x: torch.Tensor, h) -> torch.Tensor:
    """Rotate the HSV hue of RGB ``x`` (..., 3, H, W) in [0, 1] by ``h`` turns (a float, or a tensor broadcastable
    to (N, 1, 1, 1) / one per image): torchvision's ``adjust_hue`` without the HSV round trip.

    With V = max, C = max - min and the hue position H6 in [0, 6), channel n (5 for R, 3 for G, 1 for B) is
    ``V - C * clamp(2 - |((n + H6 + 6h) mod 6) - 2|, 0, 1)``, the standard HSV -> RGB formula."""
    shape = x.shape
    x = x.reshape(-1, 3, *shape[-2:])
    h = torch.as_tensor(h, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)
    torch.minimum(minc, b, out=minc)
    c = maxc - minc
    inv = c.reciprocal().nan_to_num_(0.0, 0.0, 0.0)  # grey pixels (C = 0) keep V whatever the hue
    h6 = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(c, alpha=2.0), (r - g).add_(c, alpha=4.0)))
    h6.mul_(inv).add_(h * 6.0 + 6.0)  # hue position + rotation, kept positive for the modulo
    out = torch.empty_like(x)
    for ch, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        t = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
        torch.sub(maxc, t.mul_(c), out=out[:, ch])
    return out.reshape(shape)


def _factor(f, x: torch.Tensor):
    """A float, or one factor per image broadcast to (N, 1, 1, 1)."""
    if isinstance(f, torch.Tensor) and f.dim() < 4:
        return f.to(x.dtype).reshape(-1, 1, 1, 1)
    return f


def adjust_brightness(x: torch.Tensor, f) -> torch.Tensor:
    """torchvision's adjust_brightness (blend with black) with one factor or one per image."""
    return (x * _factor(f, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f) -> torch.Tensor:
    """torchvision's adjust_contrast (blend with the image's mean grey) with one factor or one per image."""
    f = _factor(f, x)
    return (x * f).add_(gray(x).mean((-3, -2, -1), keepdim=True) * (1 - f)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, f) -> torch.Tensor:
    """torchvision's adjust_saturation (blend with the grey image) with one factor or one per image."""
    f = _factor(f, x)
    return (x * f).add_(gray(x) * (1 - f)).clamp_(0.0, 1.0)


def rgb_to_grayscale3(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale(num_output_channels=3)."""
    return gray(x).expand_as(x).contiguous()


def _blur(xs: torch.Tensor, k: int, sig: torch.Tensor) -> torch.Tensor:
    """kornia's blur of (n, 3, H, W) with one sigma per image; on CPU in chunks of ~2M values, which keep the
    depthwise convolutions in cache (~2x faster than one call on a batch of 64 crops of 224 px, one core)."""
    sig2 = sig.view(-1, 1).expand(-1, 2).contiguous()
    if xs.device.type != "cpu":
        # the number of blurred rows changes every batch: cudnn's autotuner (the trainer turns it on) would re-tune
        # the convolutions for each new shape
        tune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        try:
            return gaussian_blur2d(xs, (k, k), sig2, border_type="reflect")
        finally:
            torch.backends.cudnn.benchmark = tune
    step = max(1, (1 << 21) // xs[0].numel())
    return torch.cat([gaussian_blur2d(xs[i:i + step], (k, k), sig2[i:i + step], border_type="reflect")
                      for i in range(0, xs.shape[0], step)])


def gaussian_blur(x: torch.Tensor, k: int, sigma, inplace: bool = False) -> torch.Tensor:
    """torchvision's gaussian_blur(x, [k, k], [sigma, sigma]) (reflect padding): ``x`` (3, H, W) with one sigma, or
    (N, 3, H, W) with one sigma per image (<= 0: that image is left as it is; sigmas on the CPU: no device sync)."""
    if k <= 1:
        return x
    h, w = x.shape[-2:]
    if k // 2 >= min(h, w):
        raise ValueError(f"blur kernel {k} too large for a {h}x{w} image (reflect padding needs k // 2 < side)")
    if x.dim() == 3:
        return gaussian_blur(x[None], k, torch.tensor([float(sigma)]))[0]
    sig = torch.as_tensor(sigma, dtype=torch.float32).cpu().reshape(-1).expand(x.shape[0])
    sig_dev = sig.to(x.device, x.dtype, non_blocking=True)
    return _on_rows(x if inplace else x.clone(), sig > 0, lambda xs, i: _blur(xs, k, sig_dev[i]))


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """PIL's ImageOps.solarize on [0, 1] floats: values >= 128/255 are inverted."""
    return F.solarize(x, threshold)


def _on_rows(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """``x`` with ``fn(x[i], i)`` written into the rows ``i`` where ``mask`` holds. ``mask`` lives on the CPU (the
    parameters come from the loader), so choosing the rows never waits for the device; all rows: no gather."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, slice(None))
    idx = idx.to(x.device, non_blocking=True)
    return x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))


def color_jitter(x: torch.Tensor, p: torch.Tensor, p_dev: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ColorJitter with per-sample factors and op order (``p``: (N, NPARAMS) on the CPU, ``p_dev`` the
    same on ``x``'s device); in place on ``x``.

    Slot by slot, each op runs on the rows that hold it at that slot (a quarter of them): every sample gets its
    four ops in its own order, and no op runs on a row that does not need it."""
    p_dev = p if p_dev is None else p_dev
    order = p[:, P_ORDER:P_ORDER + 4].long()
    jit = p[:, P_JITTER] > 0
    for slot in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            x = _on_rows(x, jit & (order[:, slot] == op), lambda xs, i: fn(xs, p_dev[i, P_BRIGHTNESS + op]))
    return x


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's fn_idx order


class ColorStage:
    """Stage 2 of the multi-crop pipeline: uint8 crops + parameters (any device) -> normalised float32 crops.

    ``crops``: ``ncrops`` tensors, crop ``k`` of every sample, (B, 3, S_k, S_k) uint8 on any device; ``params``:
    (B, ncrops, NPARAMS), best left on the CPU where the loader made them (decisions are read there, so the device
    never waits for a host read). Crops of one size are processed as one batch."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.mean = list(recipe.mean)
        self.std = list(recipe.std)

    @torch.no_grad()
    def __call__(self, crops: list[torch.Tensor], params: torch.Tensor) -> list[torch.Tensor]:
        r = self.recipe
        if len(crops) != r.ncrops or params.dim() != 3 or params.shape[1] != r.ncrops:
            raise ValueError(f"stage 2 expects {r.ncrops} crops and (B, {r.ncrops}, P) parameters, got "
                             f"{len(crops)} crops and parameters of shape {tuple(params.shape)}")
        out: list[torch.Tensor] = []
        for ks in ([0, 1], list(range(2, r.ncrops))):
            if not ks:
                continue
            b = crops[ks[0]].shape[0]
            x = torch.cat([crops[k] for k in ks])  # a fresh tensor: the ops below work in place
            p = params[:, ks].transpose(0, 1).reshape(len(ks) * b, -1).float().cpu()
            out.extend(self.apply(x, p, r.crop_size(ks[0])).split(b))
        return out

    def apply(self, x: torch.Tensor, p: torch.Tensor, size: int) -> torch.Tensor:
        """(N, 3, S, S) uint8 (or float in [0, 255]), owned by the caller and overwritten, + (N, NPARAMS) on the CPU
        -> (N, 3, S, S) float32 normalised. The decisions are read on the CPU: no device sync."""
        p_dev = p.to(x.device, non_blocking=True)
        x = _on_rows(x, p[:, P_FLIP] > 0, lambda xs, i: xs.flip(-1))  # on uint8: 4x less memory than on floats
        x = x.float().div_(255.0)
        x = color_jitter(x, p, p_dev)
        x = _on_rows(x, p[:, P_GRAY] > 0, lambda xs, i: rgb_to_grayscale3(xs))
        x = gaussian_blur(x, self.recipe.kernel_size(size), p[:, P_SIGMA], inplace=True)
        x = _on_rows(x, p[:, P_SOLARIZE] > 0, lambda xs, i: solarize(xs))
        return F.normalize(x, self.mean, self.std, inplace=True)

    def __repr__(self):
        return f"ColorStage({self.recipe})"
