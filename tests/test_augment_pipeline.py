"""The two-stage multi-crop pipeline (dino_simpool.augment) is DINO's recipe.

* Parameters: distributions against torchvision's own samplers (two-sample KS tests) and decision rates within
  binomial bounds, for the CPU/device stage 1 and for the device-decode stage 1.
* Pixels: every stage-2 op and the whole stage 2 against torchvision.transforms.v2.functional with the same
  parameters; crops against torchvision's antialiased resize (bit-exact on CPU), PIL's (DINO) and the device-decode
  path run on CPU.
* Pipelines: the three give the same crops from the same seeds; bad choices fail with one-line errors.
"""
import io
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dino_simpool.augment import Recipe, build_multicrop, sample_params
from dino_simpool.augment import decode as D
from dino_simpool.augment import stage2 as S2
from dino_simpool.augment.recipe import (NPARAMS, P_BRIGHTNESS, P_CONTRAST, P_FLIP, P_GRAY, P_HUE, P_JITTER, P_ORDER,
                                         P_SATURATION, P_SIGMA, P_SOLARIZE)
from dino_simpool.augment.stage1 import CropStage, ImageLoader, resized_crop_u8
from dino_simpool.data import SafeImageFolder
from dino_simpool.data.sampling import SeededDataset

H, W = 375, 500  # an ImageNet-like photo size for the parameter tests (no pixels are made)
N_DRAWS = 3000
P_MIN = 1e-3  # KS tests: reject a match below this p-value


def _photo(h=48, w=64, seed=0):
    """A smooth, photo-like uint8 image (blurred noise + gradient) with some saturated colours."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, (h // 4 + 1, w // 4 + 1, 3))
    a = np.kron(a, np.ones((4, 4, 1)))[:h, :w]
    g = np.linspace(0, 1, w)[None, :, None]
    x = np.clip(128 + 60 * a + 80 * (g - 0.5), 0, 255).astype(np.uint8)
    x[: h // 6, : w // 6] = 128  # flat grey (zero chroma)
    x[-h // 6:, -w // 6:] = (250, 20, 20)
    return x


def _draw(stage1, recipe, n=N_DRAWS, seed=0):
    """(boxes (n, ncrops, 4), params (n, ncrops, P)) from a stage 1 callable taking (recipe, height, width)."""
    torch.manual_seed(seed)
    out = [stage1(recipe, H, W) for _ in range(n)]
    return torch.stack([b for b, _ in out]), torch.stack([p for _, p in out])


def _encoded_stage1(recipe, h, w):
    """The device-decode stage 1 on a header-only JPEG of h x w: its boxes and parameters."""
    s = D.EncodedCropStage(recipe)(D.EncodedJPEG(b"", h, w))
    return s["boxes"], s["params"]


STAGE1 = {"cpu/device": sample_params, "device_decode": _encoded_stage1}


@pytest.fixture(scope="module", params=list(STAGE1))
def draws(request):
    r = Recipe()
    return r, *_draw(STAGE1[request.param], r)


def _tv_boxes(scale, n=N_DRAWS, seed=1):
    torch.manual_seed(seed)
    img = torch.empty(3, H, W)
    return np.array([v2.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


def _scale_logratio(b):
    b = np.asarray(b, dtype=np.float64)
    h, w = b[..., 2], b[..., 3]
    return (h * w / (H * W)).ravel(), np.log(w / h).ravel()


def test_crop_boxes_match_torchvision_random_resized_crop(draws):
    r, boxes, _ = draws
    for crops, scale in ((boxes[:, :2], r.global_crops_scale), (boxes[:, 2:], r.local_crops_scale)):
        ours_s, ours_r = _scale_logratio(crops.numpy())
        ref_s, ref_r = _scale_logratio(_tv_boxes(scale))
        assert ks_2samp(ours_s, ref_s).pvalue > P_MIN and ks_2samp(ours_r, ref_r).pvalue > P_MIN
        top, left, h, w = (crops[..., i].numpy().ravel() for i in range(4))
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
        # the position is uniform over the valid range: the crop centre's relative offset has mean 1/2
        rel = (top / np.maximum(H - h, 1))[h < H]
        assert abs(rel.mean() - 0.5) < 0.03


def test_ks_test_has_the_power_to_see_a_different_recipe():
    """Guards the KS tests against a vacuous pass: another scale range is rejected with these sample sizes."""
    ref_s, _ = _scale_logratio(_tv_boxes((0.4, 1.0)))
    other_s, _ = _scale_logratio(_tv_boxes((0.35, 1.0), seed=2))
    assert ks_2samp(other_s, ref_s).pvalue < P_MIN


def test_colour_jitter_factors_and_order_match_torchvision(draws):
    _, _, p = draws
    p = p.reshape(-1, NPARAMS)
    jit = p[:, P_JITTER] > 0
    torch.manual_seed(3)
    ref = [v2.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)) for _ in range(N_DRAWS)]
    for col, i in ((P_BRIGHTNESS, 1), (P_CONTRAST, 2), (P_SATURATION, 3), (P_HUE, 4)):
        ref_f = np.array([float(t[i]) for t in ref])
        assert ks_2samp(p[jit, col].numpy(), ref_f).pvalue > P_MIN, col
    # identity factors when the jitter is not applied
    assert torch.equal(p[~jit][:, P_BRIGHTNESS:P_HUE + 1], torch.tensor([1.0, 1, 1, 0]).expand(int((~jit).sum()), 4))
    # op order: a permutation; each op at each slot 1/4 of the time (torchvision: fn_idx = randperm(4))
    order = p[:, P_ORDER:P_ORDER + 4].long()
    assert (order.sort(1).values == torch.arange(4)).all()
    n = order.shape[0]
    bound = 4.5 * math.sqrt(n * 0.25 * 0.75)
    for slot in range(4):
        counts = torch.bincount(order[:, slot], minlength=4)
        assert ((counts - n / 4).abs() < bound).all(), (slot, counts)
    # all 24 orders occur, none far from 1/24 (torchvision draws every permutation)
    perms = torch.unique(order, dim=0, return_counts=True)[1]
    assert len(perms) == 24 and ((perms - n / 24).abs() < 4.5 * math.sqrt(n / 24 * 23 / 24)).all()


def _binomial_ok(flags, prob):
    flags = np.asarray(flags, dtype=bool).ravel()
    n = flags.size
    if prob in (0.0, 1.0):
        return bool(flags.all()) if prob == 1.0 else not flags.any()
    return abs(flags.sum() - n * prob) < 4.5 * math.sqrt(n * prob * (1 - prob))


def test_decision_rates_are_dinos(draws):
    """flip 0.5, jitter 0.8, grayscale 0.2 on every crop; blur 1.0 / 0.1 / 0.5 and solarize 0 / 0.2 / 0 on global 1 /
    global 2 / local crops; sigma uniform in (0.1, 2.0) (KS against a uniform sample)."""
    r, _, p = draws
    for k in range(r.ncrops):
        q = p[:, k]
        assert _binomial_ok(q[:, P_FLIP] > 0, 0.5) and _binomial_ok(q[:, P_JITTER] > 0, 0.8)
        assert _binomial_ok(q[:, P_GRAY] > 0, 0.2)
        kind = min(k, 2)
        assert _binomial_ok(q[:, P_SIGMA] > 0, r.blur_p[kind]), k
        assert _binomial_ok(q[:, P_SOLARIZE] > 0, r.solarize_p[kind]), k
    sig = p[..., P_SIGMA][p[..., P_SIGMA] > 0].numpy()
    ref = np.random.default_rng(0).uniform(0.1, 2.0, sig.size)
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and ks_2samp(sig, ref).pvalue > P_MIN


def test_parameters_come_from_torchs_generator_only():
    """Same torch seed -> same parameters (numpy and random untouched): what SeededDataset relies on."""
    r = Recipe(local_crops_number=3)
    torch.manual_seed(5)
    a = sample_params(r, 100, 80)
    np.random.seed(1)
    torch.manual_seed(5)
    b = sample_params(r, 100, 80)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------ pixels
def _reference_stage2(x_u8, p, k, mean, std):
    """One crop through torchvision.transforms.v2.functional with the parameters ``p`` (one row)."""
    x = F.to_dtype(x_u8, torch.float32, scale=True)
    if p[P_FLIP] > 0:
        x = F.horizontal_flip(x)
    if p[P_JITTER] > 0:
        for op in p[P_ORDER:P_ORDER + 4].long().tolist():
            x = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue][op](
                x, float(p[[P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE][op]]))
    if p[P_GRAY] > 0:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p[P_SIGMA] > 0:
        x = F.gaussian_blur(x, [k, k], [float(p[P_SIGMA])] * 2)
    if p[P_SOLARIZE] > 0:
        x = F.solarize(x, 128 / 255)
    return F.normalize(x, list(mean), list(std))


def test_each_stage2_op_matches_torchvision():
    torch.manual_seed(0)
    x = torch.from_numpy(_photo(24, 20)).permute(2, 0, 1).float().div(255)
    x[0, 5:8, 5:8] = x[1, 5:8, 5:8]  # ties between max channels
    xb = torch.stack([x, x.flip(-1), x.roll(3, 1)])
    tol = dict(atol=2e-5, rtol=0)  # measured <= 1.2e-7 (blends), 2e-6 (hue), 1e-6 (blur); the bar is 1/255
    f = torch.tensor([0.6, 1.0, 1.37])
    for ours, ref in ((S2.adjust_brightness, F.adjust_brightness), (S2.adjust_contrast, F.adjust_contrast),
                      (S2.adjust_saturation, F.adjust_saturation)):
        got = ours(xb, f)
        for i in range(3):
            torch.testing.assert_close(got[i], ref(xb[i], float(f[i])), **tol)
    for h in (-0.1, -0.03, 0.0, 0.07, 0.1, 0.5, -0.5):
        torch.testing.assert_close(S2.adjust_hue(x, h), F.adjust_hue(x, h), **tol)
    hb = S2.adjust_hue(xb, torch.tensor([0.05, -0.08, 0.0]))
    for i, h in enumerate((0.05, -0.08, 0.0)):
        torch.testing.assert_close(hb[i], F.adjust_hue(xb[i], h), **tol)
    torch.testing.assert_close(S2.rgb_to_grayscale3(xb), F.rgb_to_grayscale(xb, num_output_channels=3), **tol)
    torch.testing.assert_close(S2.solarize(xb), F.solarize(xb, 128 / 255), atol=0, rtol=0)
    sig = torch.tensor([1.5, 0.0, 0.3])
    yb = S2.gaussian_blur(xb, 13, sig)
    torch.testing.assert_close(yb[0], F.gaussian_blur(xb[0], [13, 13], [1.5, 1.5]), **tol)
    torch.testing.assert_close(yb[1], xb[1], atol=0, rtol=0)  # sigma 0: untouched
    torch.testing.assert_close(yb[2], F.gaussian_blur(xb[2], [13, 13], [0.3, 0.3]), **tol)


@pytest.mark.parametrize("size", [24, 13])
def test_whole_stage2_matches_torchvision_with_the_same_parameters(size):
    """Random parameter rows (every op, every order, many at once) through ColorStage.apply and through v2's
    functional ops one crop at a time: <= 1/255 on the [0, 1] scale (measured: < 1e-5)."""
    r = Recipe(local_crops_number=6)
    torch.manual_seed(1)
    params = torch.cat([sample_params(r, 64, 64)[1] for _ in range(10)])  # 80 rows
    params[::3, P_JITTER] = 1  # more jitter, hue among them
    params[::4, P_SOLARIZE] = 1
    params[::5, P_SIGMA] = 1.7
    crops = torch.stack([torch.from_numpy(_photo(size, size, seed=i)).permute(2, 0, 1) for i in range(len(params))])
    stage = S2.ColorStage(r)
    got = stage.apply(crops.clone(), params, size)
    k = r.kernel_size(size)
    std = torch.tensor(r.std).view(3, 1, 1)
    worst = max(float(((got[i] - _reference_stage2(crops[i], params[i], k, r.mean, r.std)) * std).abs().max())
                for i in range(len(params)))
    assert worst <= 1 / 255, worst
    assert worst < 1e-4, worst  # what is measured; the tolerance above is the requirement


def test_stage2_call_groups_crops_by_size_and_keeps_the_order():
    r = Recipe(local_crops_number=3, global_size=16, local_size=8)
    torch.manual_seed(2)
    b = 4
    ps = torch.stack([sample_params(r, 40, 40)[1] for _ in range(b)])  # (B, ncrops, P)
    crops = [torch.randint(0, 256, (b, 3, r.crop_size(k), r.crop_size(k)), dtype=torch.uint8)
             for k in range(r.ncrops)]
    keep = [c.clone() for c in crops]
    out = S2.ColorStage(r)(crops, ps)
    assert all(torch.equal(c, k) for c, k in zip(crops, keep))  # inputs untouched
    assert [tuple(o.shape) for o in out] == [(b, 3, 16, 16)] * 2 + [(b, 3, 8, 8)] * 3
    for k in range(r.ncrops):
        for i in range(b):
            ref = _reference_stage2(crops[k][i], ps[i, k], r.kernel_size(r.crop_size(k)), r.mean, r.std)
            torch.testing.assert_close(out[k][i], ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="stage 2 expects 5 crops"):
        S2.ColorStage(r)(crops[:4], ps)


def test_stage1_crops_equal_torchvisions_resized_crop_and_are_close_to_pil():
    """uint8 crops: bit-identical to v2.functional.resized_crop (bicubic, antialias) on the uint8 image. Against PIL's
    bicubic resize, as DINO's code runs it: mean 0.007 levels; at most 2 levels except where bicubic overshoots next
    to a saturated edge, which both uint8 resizers clip between their two passes in their own way (max 9 levels, 51
    pixels of one crop of 90 here; the test image has a hard (250, 20, 20) block)."""
    x_np = _photo(90, 120)
    x = torch.from_numpy(x_np).permute(2, 0, 1)
    pil = Image.fromarray(x_np)
    torch.manual_seed(0)
    worst, mean = 0, []
    for _ in range(30):
        top, left, h, w = v2.RandomResizedCrop.get_params(x, [0.05, 1.0], [3 / 4, 4 / 3])
        for size in (32, 17, 100):  # down- and upscales
            ours = resized_crop_u8(x, top, left, h, w, size)
            ref = F.resized_crop(x, top, left, h, w, [size, size], v2.InterpolationMode.BICUBIC, antialias=True)
            assert torch.equal(ours, ref)
            # DINO: torchvision.transforms.functional.resized_crop on PIL = crop, then PIL's bicubic resize
            p = torch.from_numpy(np.array(pil.crop((left, top, left + w, top + h)).resize((size, size),
                                                                                         Image.BICUBIC)))
            p = p.permute(2, 0, 1)
            d = (ours.int() - p.int()).abs()
            worst, mean = max(worst, int(d.max())), mean + [float(d.float().mean())]
    print(f"stage-1 crops vs PIL: max {worst} levels, mean {np.mean(mean):.3f}")
    assert worst <= 12 and np.mean(mean) < 0.05, (worst, np.mean(mean))


def test_stage1_accepts_pil_and_tensors_and_uses_the_boxes_it_returns(monkeypatch):
    r = Recipe(local_crops_number=2, global_size=16, local_size=8)
    x_np = _photo(40, 50)
    stage = CropStage(r)
    torch.manual_seed(4)
    a = stage(Image.fromarray(x_np))
    torch.manual_seed(4)
    b = stage(torch.from_numpy(x_np).permute(2, 0, 1).contiguous())
    torch.manual_seed(4)
    c = stage(torch.from_numpy(x_np).permute(2, 0, 1).float() / 255)
    torch.manual_seed(4)
    boxes, params = sample_params(r, 40, 50)
    for s in (a, b, c):
        assert torch.equal(s["params"], params)
        assert all(torch.equal(u, v) for u, v in zip(s["crops"], a["crops"]))
        assert [tuple(t.shape) for t in s["crops"]] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2
    x = torch.from_numpy(x_np).permute(2, 0, 1)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        assert torch.equal(a["crops"][k], resized_crop_u8(x, top, left, h, w, r.crop_size(k)))
    with pytest.raises(ValueError, match="image tensor"):
        stage(torch.zeros(4, 8, 8, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ device decode
def _jpeg_bytes(x_np, quality=95):
    buf = io.BytesIO()
    Image.fromarray(x_np).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_device_decode_crops_match_stage1_crops_on_cpu(tmp_path):
    """The device path run on CPU: decode_jpeg on the batch, crops cut by the antialiased weight matrices, of images
    of different sizes in one batch, up- and downscales: within 1 level of stage 1's uint8 crops (measured: max 1,
    99.9 % equal), and bit-identical decodes."""
    r = Recipe(local_crops_number=3, global_size=32, local_size=12, global_crops_scale=(0.1, 1.0))
    imgs = [_photo(40 + 9 * i, 64 - 5 * i, seed=i) for i in range(5)]
    for i, a in enumerate(imgs):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg_bytes(a))
    enc, cpu = D.EncodedLoader(), ImageLoader()
    samples, refs = [], []
    for i in range(5):
        e = enc(tmp_path / f"{i}.jpg")
        assert isinstance(e, D.EncodedJPEG) and (e.height, e.width) == imgs[i].shape[:2]
        torch.manual_seed(i)
        samples.append(D.EncodedCropStage(r)(e))
        torch.manual_seed(i)
        refs.append(CropStage(r)(cpu(tmp_path / f"{i}.jpg")))
    batch = torch.utils.data.default_collate(samples)
    decoded = D.decode_batch(batch, torch.device("cpu"))
    for i, x in enumerate(decoded):
        assert torch.equal(x, cpu(tmp_path / f"{i}.jpg"))  # the same decoder output as the loader's CPU decode
    crops = D.DeviceCrops(r, chunk=2)(batch, torch.device("cpu"))
    diffs = torch.cat([(crops[k][i] - refs[i]["crops"][k].float()).abs().flatten()
                       for i in range(5) for k in range(r.ncrops)])
    print(f"device-decode crops vs stage 1: max {float(diffs.max())} levels, {float((diffs == 0).float().mean()):.4f}"
          f" equal")
    assert diffs.max() <= 1 and (diffs == 0).float().mean() > 0.99, (diffs.max(), (diffs == 0).float().mean())
    assert torch.equal(batch["params"], torch.stack([s["params"] for s in refs]))


def test_resize_weights_equal_torchs_antialiased_bicubic():
    """The weight matrices reproduce interpolate(bicubic, antialias=True) on floats (down- and upscaling)."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 70, 90) * 255
    for top, left, h, w, size in ((3, 7, 50, 61, 24), (0, 0, 70, 90, 70), (10, 20, 9, 13, 31)):
        ref = torch.nn.functional.interpolate(x[..., top:top + h, left:left + w], size=(size, size), mode="bicubic",
                                              antialias=True, align_corners=False)[0, 0]
        wy = D.resize_weights(torch.tensor([top]), torch.tensor([h]), size, 70)[0]
        wx = D.resize_weights(torch.tensor([left]), torch.tensor([w]), size, 90)[0]
        torch.testing.assert_close(wy @ x[0, 0] @ wx.T, ref, atol=1e-3, rtol=0)


def test_device_decode_falls_back_for_png_cmyk_truncated_and_corrupt(tmp_path, caplog):
    a = _photo(30, 40)
    Image.fromarray(a).save(tmp_path / "p.png")
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    good = _jpeg_bytes(a)
    (tmp_path / "t.jpg").write_bytes(good[: len(good) // 2])
    enc = D.EncodedLoader()
    assert isinstance(enc(tmp_path / "p.png"), torch.Tensor)  # decoded by the worker, sent raw
    assert isinstance(enc(tmp_path / "c.jpg"), torch.Tensor)
    with pytest.raises(RuntimeError):  # truncated: decoded on the CPU, which raises (the folder skips the file)
        enc(tmp_path / "t.jpg")
    # a JPEG whose header and end marker are fine but whose data is not: a grey stand-in and one warning
    bad = bytearray(good)
    dht = bad.index(b"\xff\xc4")
    bad[dht + 5:dht + 21] = b"\xff" * 16  # impossible Huffman code counts: PIL reads the header, libjpeg fails
    (tmp_path / "bad.jpg").write_bytes(bytes(bad))
    e = enc(tmp_path / "bad.jpg")
    assert isinstance(e, D.EncodedJPEG)
    r = Recipe(local_crops_number=1, global_size=16, local_size=8)
    stage = D.EncodedCropStage(r)
    samples = [stage(e), stage(enc(tmp_path / "p.png")), stage(D.EncodedJPEG(good, 30, 40, "good.jpg"))]
    batch = torch.utils.data.default_collate(samples)
    assert batch["kind"].tolist() == [D.KIND_JPEG, D.KIND_RAW, D.KIND_JPEG] and len(batch["data"]) == 3
    with caplog.at_level(logging.WARNING):
        imgs = D.decode_batch(batch, torch.device("cpu"))
    assert "bad.jpg" in caplog.text and "grey image stands in" in caplog.text
    assert (imgs[0] == 128).all() and imgs[0].shape == (3, 30, 40)
    assert torch.equal(imgs[1], torch.from_numpy(a).permute(2, 0, 1))
    assert torch.equal(imgs[2], ImageLoader()(tmp_path / "c.jpg").new_tensor(
        np.asarray(Image.open(io.BytesIO(good)).convert("RGB"))).permute(2, 0, 1))


# ------------------------------------------------------------------------------------------------ pipelines
def _folder(tmp_path, n=6):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for j in range(n // 2):
            a = _photo(36 + 4 * j, 48, seed=j + (10 if c == "b" else 0))
            if j % 2:
                Image.fromarray(a).save(tmp_path / c / f"{j}.png")
            else:
                (tmp_path / c / f"{j}.jpg").write_bytes(_jpeg_bytes(a))
    return tmp_path


def _run_pipeline(root, pipeline, backend="fast", workers=0):
    aug = build_multicrop((0.3, 1.0), (0.1, 0.4), 2, 24, 12, pipeline=pipeline, backend=backend)
    ds = aug.prepare_dataset(SafeImageFolder(root, transform=aug.transform))
    dl = DataLoader(SeededDataset(ds, 0), batch_size=3, collate_fn=aug.collate_fn, num_workers=workers,
                    sampler=[(i, 1) for i in range(len(ds))])
    return [aug.to_device(images, torch.device("cpu")) for images, _ in dl]


def test_the_three_pipelines_give_the_same_crops(tmp_path):
    """Same seed, same (index, epoch): ``cpu`` and ``device`` are bit-identical; ``device_decode`` differs only by
    the crops' <= 1 level (then amplified by the colour ops: contrast, solarize at the threshold)."""
    root = _folder(tmp_path)
    cpu, dev, dd = (_run_pipeline(root, p) for p in ("cpu", "device", "device_decode"))
    assert len(cpu) == 2 and [tuple(c.shape) for c in cpu[0]] == [(3, 3, 24, 24)] * 2 + [(3, 3, 12, 12)] * 2
    for a, b, c in zip(cpu, dev, dd):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y)
            assert (x - z).abs().flatten().float().quantile(0.99) < 0.05
    assert not torch.equal(cpu[0][0], cpu[0][1])  # two global crops differ
    assert all(torch.equal(x, y) for x, y in zip(cpu[0], _run_pipeline(root, "cpu", workers=2)[0]))


def test_builder_choices_and_errors():
    assert build_multicrop(pipeline=None, device="cpu").pipeline == "cpu"
    assert build_multicrop(pipeline="auto", device="cuda").pipeline == "device"
    assert build_multicrop(pipeline="auto", device="cuda", backend="v2").pipeline == "cpu"
    assert build_multicrop(pipeline="cpu").collate_fn is not None
    assert build_multicrop(pipeline="cpu", backend="v2").collate_fn is None
    with pytest.raises(ValueError, match="--aug_pipeline must be one of cpu, device, device_decode"):
        build_multicrop(pipeline="gpu")
    with pytest.raises(ValueError, match="--aug_backend v2 .* runs only with --aug_pipeline cpu"):
        build_multicrop(pipeline="device", backend="v2")
    with pytest.raises(ValueError, match="--aug_backend must be one of"):
        build_multicrop(backend="pil")
    with pytest.raises(ValueError, match="local_crops_scale"):
        build_multicrop(local_crops_scale=(0.5, 0.1))


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["device", "device_decode"])
def test_training_resume_is_bit_identical_with_each_pipeline(tmp_path, monkeypatch, capsys, pipeline):
    """The trainer with each device pipeline (on CPU): a run stopped at an epoch boundary and mid-epoch, then resumed,
    ends bit-identical to an uninterrupted run, and to the ``cpu`` pipeline's run (same crops, same weights).
    The pipeline is chosen with ``--aug_pipeline``."""
    from dino_simpool.checkpoint import load_checkpoint
    from dino_simpool.train import main

    data = tmp_path / "data" / "train"
    for c in range(4):
        (data / f"c{c}").mkdir(parents=True)
        for j in range(5):
            (data / f"c{c}" / f"{j}.jpg").write_bytes(_jpeg_bytes(_photo(40 + 4 * j, 48, seed=10 * c + j)))
    args = ["--data_path", str(tmp_path / "data"), "--batch_size_per_gpu", "8", "--num_workers", "0",
            "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
            "--out_dim", "64", "--epochs", "2", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1",
            "--optimizer", "adamw", "--lr", "5e-4", "--eval_every", "0", "--log_every", "1",
            "--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2", "--patch_size", "8"]

    def weights(out):
        ck = load_checkpoint(out / "checkpoint.pth")
        return ck["iteration"], {f"{p}.{k}": v for p in ("student", "teacher") for k, v in ck[p].items()}

    def same(a, b):
        return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])

    assert main(args + ["--aug_pipeline", "cpu", "--output_dir", str(tmp_path / "cpu")]) == 0
    args = args + ["--aug_pipeline", pipeline]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(args + ["--output_dir", str(ref)]) == 0
    for stop in ("2", "3"):  # the epoch boundary, then the middle of epoch 1
        assert main(args + ["--output_dir", str(cut), "--max_iters", stop]) == 0
    assert main(args + ["--output_dir", str(cut)]) == 0
    assert "at epoch 1 iteration 3" in capsys.readouterr().out
    a, b = weights(ref), weights(cut)
    assert a[0] == 4 and same(a, b)
    cpu = weights(tmp_path / "cpu")
    if pipeline == "device":
        assert same(a, cpu)  # stage 2 on the batch in the main process = stage 2 in the collate
    else:  # the crops differ by <= 1 level: a different run, and a sign that the data did change
        assert not same(a, cpu)
