import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from dino_simpool.data import SyntheticShapes
from dino_simpool.dino import augment as A
from dino_simpool.dino.augment import MultiCropAugmentation, blur_kernel_size, eval_transform




@pytest.fixture(scope="module")
def image():
    return SyntheticShapes("val", image_size=64, images_per_class=1).image(3)


@pytest.mark.parametrize("backend", ["fast", "v2"])
def test_multicrop_count_shapes_dtypes(image, backend):
    aug = MultiCropAugmentation((0.4, 1.0), (0.05, 0.4), 6, global_size=32, local_size=16, backend=backend)
    for inp in (image, torch.from_numpy(np.array(image)).permute(2, 0, 1)):
        crops = aug(inp)
        assert len(crops) == 8 == aug.ncrops
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
        for c in crops:
            assert type(c) is torch.Tensor and c.dtype == torch.float32 and torch.isfinite(c).all()
        # normalised with ImageNet statistics: values lie within [(0 - mean) / std, (1 - mean) / std]
        lo, hi = -0.485 / 0.229 - 1e-4, (1 - 0.406) / 0.225 + 1e-4
        assert min(c.min() for c in crops) >= lo and max(c.max() for c in crops) <= hi
    none = MultiCropAugmentation(local_crops_number=0, global_size=24, local_size=8, backend=backend)(image)
    assert len(none) == 2 and none[0].shape == (3, 24, 24)


def test_multicrop_reproducible_with_torch_seed(image):
    aug = MultiCropAugmentation(local_crops_number=2, global_size=16, local_size=8)
    torch.manual_seed(3)
    a = aug(image)
    torch.manual_seed(3)
    b = aug(image)
    c = aug(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_validation_errors():
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropAugmentation(global_crops_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropAugmentation(global_crops_scale=(0.5, 0.4))
    with pytest.raises(ValueError, match="local_crops_scale"):
        MultiCropAugmentation(local_crops_scale=(0.05, 1.5))
    with pytest.raises(ValueError, match="local_crops_scale"):
        MultiCropAugmentation(local_crops_scale=0.3)
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropAugmentation(local_crops_number=-1)
    with pytest.raises(ValueError, match="global_size"):
        MultiCropAugmentation(global_size=0)
    with pytest.raises(ValueError, match="local_size"):
        MultiCropAugmentation(local_size=9.5)
    with pytest.raises(ValueError, match="blur_sigma"):
        MultiCropAugmentation(blur_sigma=(0.0, 2.0))
    with pytest.raises(ValueError, match="backend"):
        MultiCropAugmentation(backend="pil")
    with pytest.raises(ValueError, match="crop"):
        eval_transform(resize=32, crop=64)


def test_blur_kernel_size():
    assert blur_kernel_size(224, 2.0) == 13 and blur_kernel_size(96, 2.0) == 13
    assert blur_kernel_size(16, 2.0) == 13 and blur_kernel_size(8, 2.0) == 7 and blur_kernel_size(9, 2.0) == 9
    assert blur_kernel_size(32, 0.5) == 5


def test_fast_kernels_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(3, 20, 20)
    x[:, :4, :4] = 0.5  # grey pixels (zero chroma) take the special path of the hue formula
    x[0, 5:8, 5:8] = x[1, 5:8, 5:8]  # ties between max channels
    tol = dict(atol=2e-5, rtol=0)
    for f in (0.6, 1.0, 1.37):
        assert torch.allclose(A.adjust_brightness(x, f), F.adjust_brightness(x, f), **tol)
        assert torch.allclose(A.adjust_contrast(x, f), F.adjust_contrast(x, f), **tol)
        assert torch.allclose(A.adjust_saturation(x, f), F.adjust_saturation(x, f), **tol)
    for h in (-0.1, -0.03, 0.0, 0.07, 0.1, 0.5):
        assert torch.allclose(A.adjust_hue(x, h), F.adjust_hue(x, h), atol=1e-4, rtol=0), h
    assert torch.allclose(A.rgb_to_grayscale3(x), F.rgb_to_grayscale(x, num_output_channels=3), **tol)
    xu = (x * 255).round().to(torch.uint8)
    assert torch.allclose(A.solarize(xu.float() / 255), F.solarize(xu, 128).float() / 255, **tol)
    for k, s in ((13, 2.0), (7, 0.4), (5, 1.1)):
        assert torch.allclose(A.gaussian_blur(x, k, s), F.gaussian_blur(x, [k, k], [s, s]), atol=1e-5), (k, s)
    # batched: one sigma per crop, sigma 0 = untouched
    xb = torch.rand(3, 3, 16, 16)
    yb = A.gaussian_blur(xb, 13, torch.tensor([1.5, 0.0, 0.3]))
    assert torch.allclose(yb[0], F.gaussian_blur(xb[0], [13, 13], [1.5, 1.5]), atol=1e-5)
    assert torch.allclose(yb[1], xb[1], atol=1e-6)
    assert torch.allclose(yb[2], F.gaussian_blur(xb[2], [13, 13], [0.3, 0.3]), atol=1e-5)
    # batched factors
    f = torch.tensor([0.7, 1.3, 1.0]).view(3, 1, 1, 1)
    for ours, ref in ((A.adjust_contrast, F.adjust_contrast), (A.adjust_saturation, F.adjust_saturation)):
        got = ours(xb, f)
        for i in range(3):
            assert torch.allclose(got[i], ref(xb[i], float(f[i])), **tol)
    hb = A.adjust_hue(xb, torch.tensor([0.05, -0.08, 0.0]).view(3, 1, 1, 1))
    assert torch.allclose(hb[1], F.adjust_hue(xb[1], -0.08), atol=1e-4)


def test_random_decisions_have_dino_rates():
    """Grayscale p=0.2 per crop, solarisation only on global crop 2, global crop 1 always blurred."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    aug = MultiCropAugmentation((0.9, 1.0), (0.3, 0.4), 6, global_size=16, local_size=12,
                                mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    gray, n = 0, 0
    g1_std, ref_std = [], []
    for _ in range(40):
        crops = aug(img)
        for c in crops:
            gray += bool((c[0] - c[1]).abs().max() < 1e-6 and (c[1] - c[2]).abs().max() < 1e-6)
            n += 1
        g1_std.append(float(crops[0][:, 1:] .sub(crops[0][:, :-1]).abs().mean()))
        ref_std.append(float(crops[1][:, 1:].sub(crops[1][:, :-1]).abs().mean()))
    assert 0.1 <= gray / n <= 0.3, gray / n
    # global crop 1 (blur p=1) is smoother than global crop 2 (blur p=0.1) on a noise image
    assert np.median(g1_std) < 0.8 * np.median(ref_std)


def test_eval_transform(image):
    t = eval_transform(resize=40, crop=32)
    x = t(image)
    assert type(x) is torch.Tensor and x.shape == (3, 32, 32) and x.dtype == torch.float32
    grey = Image.new("RGB", (50, 70), (124, 116, 104))  # ImageNet mean colour -> ~0 after Normalize
    y = eval_transform(resize=48, crop=40)(grey)
    assert y.shape == (3, 40, 40) and y.abs().max() < 0.02
    # Resize(256) resizes the shorter side
    assert eval_transform(64, 56)(Image.new("RGB", (200, 100))).shape == (3, 56, 56)


# ---------------------------------------------------------------------------------------------------------------
# DINO's random decisions, measured on the outputs (both backends). Images are designed so that each decision is
# visible in a crop whatever the other operations do; mean 0 / std 1 keeps the outputs in [0, 1].
N_CALLS = 300
PLAIN = dict(mean=(0, 0, 0), std=(1, 1, 1))


def _const(level, size=24):
    return Image.new("RGB", (size, size), (level, level, level))


def _rate(flags):
    return float(np.mean(flags))


@pytest.mark.parametrize("backend", ["fast", "v2"])
def test_solarization_only_on_second_global_crop(backend):
    """A bright grey image (230): with brightness in [0.6, 1.4] it stays >= 0.54, so a crop is solarised iff it ends
    up below 0.5. DINO: global crop 2 with p = 0.2, never global crop 1 or the local crops."""
    aug = MultiCropAugmentation((0.5, 1.0), (0.3, 0.5), 2, global_size=12, local_size=8, backend=backend, **PLAIN)
    torch.manual_seed(0)
    sol = np.array([[float(c.mean()) < 0.5 for c in aug(_const(230))] for _ in range(N_CALLS)])
    assert _rate(sol[:, 0]) == 0.0 and _rate(sol[:, 2:]) == 0.0
    assert abs(_rate(sol[:, 1]) - 0.2) < 0.07, _rate(sol[:, 1])


@pytest.mark.parametrize("backend", ["fast", "v2"])
def test_colour_jitter_rate(backend):
    """A flat grey image (102): only the brightness factor of the colour jitter changes it (contrast, saturation,
    hue, grayscale and blur leave a flat grey as it is). DINO: jitter with p = 0.8 on every crop."""
    aug = MultiCropAugmentation((0.5, 1.0), (0.3, 0.5), 2, global_size=12, local_size=8, backend=backend, **PLAIN)
    torch.manual_seed(1)
    changed = np.array([[abs(float(c.mean()) - 102 / 255) > 1e-4 for c in aug(_const(102))] for _ in range(N_CALLS)])
    for k in range(changed.shape[1]):  # each crop, global and local
        assert abs(_rate(changed[:, k]) - 0.8) < 0.075, (k, _rate(changed[:, k]))
    assert abs(_rate(changed) - 0.8) < 0.04


@pytest.mark.parametrize("backend", ["fast", "v2"])
def test_flip_rate(backend):
    """Dark left half, lighter right half (both below the solarisation threshold even at brightness 1.4), nearly
    full crops: a crop is flipped iff its left third is lighter than its right third. DINO: p = 0.5, every crop."""
    a = np.full((32, 32, 3), 20, np.uint8)
    a[:, 16:] = 80
    img = Image.fromarray(a)
    aug = MultiCropAugmentation((0.95, 1.0), (0.95, 1.0), 2, global_size=16, local_size=12, backend=backend, **PLAIN)
    torch.manual_seed(2)
    flipped = []
    for _ in range(N_CALLS):
        for c in aug(img):
            w = c.shape[-1] // 3
            flipped.append(float(c[..., :w].mean()) > float(c[..., -w:].mean()))
    assert abs(_rate(flipped) - 0.5) < 0.05, _rate(flipped)


@pytest.mark.parametrize("backend", ["fast", "v2"])
def test_blur_rates(backend):
    """Grey pixel noise at the crop size with full-image crops (no resampling): a crop is blurred iff neighbouring
    pixels become correlated (sigma >= 1 here; colour jitter and grayscale act per pixel on grey and keep the noise
    uncorrelated). DINO: global crop 1 always, global crop 2 with p = 0.1, each local crop with p = 0.5."""
    rng = np.random.default_rng(0)
    noise = rng.integers(80, 176, (16, 16, 1), dtype=np.uint8).repeat(3, axis=2)
    img = Image.fromarray(noise)
    aug = MultiCropAugmentation((1.0, 1.0), (1.0, 1.0), 4, global_size=16, local_size=16, blur_sigma=(1.0, 2.0),
                                backend=backend, **PLAIN)

    def lag1(c):
        x = c[0] - c[0].mean()
        return float((x[:, 1:] * x[:, :-1]).sum() / (x * x).sum().clamp(min=1e-12))

    torch.manual_seed(3)
    blurred = np.array([[lag1(c) > 0.4 for c in aug(img)] for _ in range(N_CALLS)])
    assert _rate(blurred[:, 0]) == 1.0
    assert abs(_rate(blurred[:, 1]) - 0.1) < 0.05, _rate(blurred[:, 1])
    assert abs(_rate(blurred[:, 2:]) - 0.5) < 0.05, _rate(blurred[:, 2:])


def _recorded_crop_areas(monkeypatch, backend, n_calls, size=64):
    """Area fractions of the crops each transform cut (global crops first), recorded inside the backends."""
    areas = []
    if backend == "fast":
        from dino_simpool.augment import recipe as R  # where the fast backend's stage 1 samples its boxes
        orig = R.random_resized_crop_params

        def rec(height, width, scale, *args, **kw):
            top, left, h, w = orig(height, width, scale, *args, **kw)
            areas.append(h * w / (height * width))
            return top, left, h, w
        monkeypatch.setattr(R, "random_resized_crop_params", rec)
    else:
        from torchvision.transforms import v2
        orig = v2.RandomResizedCrop.make_params

        def rec(self, flat_inputs):
            p = orig(self, flat_inputs)
            areas.append(p["height"] * p["width"] / size ** 2)
            return p
        monkeypatch.setattr(v2.RandomResizedCrop, "make_params", rec)
    aug = MultiCropAugmentation((0.14, 1.0), (0.05, 0.14), 2, global_size=16, local_size=8, backend=backend)
    img = _const(128, size)
    torch.manual_seed(4)
    for _ in range(n_calls):
        aug(img)
    a = np.array(areas).reshape(n_calls, 4)
    return a[:, :2].ravel(), a[:, 2:].ravel()


@pytest.mark.parametrize("backend", ["fast", "v2"])
def test_crop_scale_ranges(backend, monkeypatch):
    """RandomResizedCrop area fractions: global crops within the global scale range, local within the local range
    (up to pixel rounding), spread over the whole range, with torchvision's distribution (same mean)."""
    from torchvision.transforms import v2
    g, loc = _recorded_crop_areas(monkeypatch, backend, 200)
    slack = 0.02  # integer crop sides
    assert g.min() >= 0.14 - slack and g.max() <= 1.0 and loc.min() >= 0.05 - slack and loc.max() <= 0.14 + slack
    assert g.min() < 0.25 and g.max() > 0.85 and loc.min() < 0.06 and loc.max() > 0.13
    monkeypatch.undo()
    torch.manual_seed(5)
    ref = {s: np.mean([h * w / 64 ** 2 for _, _, h, w in
                       (v2.RandomResizedCrop.get_params(torch.zeros(3, 64, 64), list(s), [3 / 4, 4 / 3])
                        for _ in range(2000))]) for s in ((0.14, 1.0), (0.05, 0.14))}
    assert abs(g.mean() - ref[(0.14, 1.0)]) < 0.05 and abs(loc.mean() - ref[(0.05, 0.14)]) < 0.01
