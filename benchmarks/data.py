"""Multi-crop CPU cost per image on real-size JPEG photos: DINO's PIL recipe, the backends, and each pipeline's stages.

    python benchmarks/data.py [--photos 48] [--repeats 3] [--jpeg_dir DIR] [--write benchmarks/results/data.md]

One process, ``torch.set_num_threads(1)`` (one loader worker's worth of CPU), CPU time of this process
(``time.process_time``: what one core spends, whatever else runs on a shared machine). Every case runs over the same
photos in each of ``--repeats`` interleaved rounds; a ratio is the median over rounds of (case / reference) measured
in the same round. The reference is DINO's recipe, written here from torchvision.transforms on PIL images exactly as
DINO's ``DataAugmentationDINO`` (+ its ``pil_loader``): 2 x 224 + 8 x 96 crops.

Photos: ``--jpeg_dir`` (any folder of JPEGs), or 500 x 375 JPEGs at quality 90 generated once into a temporary folder
from the embedded SyntheticShapes scenes with a photo-like 1/f texture, so that they cost what a real photo costs to
decode (file size and decode time are printed; real 500 x 375 q90 photos are 60-110 KB, ~1.1-1.3 ms here).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import default_collate
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_simpool.augment import ColorStage, CropStage, ImageLoader, Recipe  # noqa: E402
from dino_simpool.augment.decode import DeviceCrops, EncodedCropStage, EncodedLoader  # noqa: E402
from dino_simpool.data import SyntheticShapes  # noqa: E402
from dino_simpool.dino.augment import MultiCropAugmentation  # noqa: E402

STEP_IMG_S = 800  # a ViT-S/16 DINO step in bf16 on one modern GPU, images/s (the figure)


# ------------------------------------------------------------------------- DINO's recipe (the reference)
class _GaussianBlur:
    """DINO's utils.GaussianBlur: PIL's blur with radius ~ U(0.1, 2.0) with probability p."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _Solarization:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def dino_transform(r: Recipe):
    """DataAugmentationDINO(global_crops_scale, local_crops_scale, local_crops_number) at the recipe's crop sizes
    (DINO's: 224 and 96): PIL image -> list of crops."""
    bicubic = transforms.InterpolationMode.BICUBIC
    fcj = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2)])
    norm = transforms.Compose([transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    g, loc_size, gs, ls = r.global_size, r.local_size, r.global_crops_scale, r.local_crops_scale
    g1 = transforms.Compose([transforms.RandomResizedCrop(g, gs, interpolation=bicubic), fcj, _GaussianBlur(1.0),
                             norm])
    g2 = transforms.Compose([transforms.RandomResizedCrop(g, gs, interpolation=bicubic), fcj, _GaussianBlur(0.1),
                             _Solarization(0.2), norm])
    loc = transforms.Compose([transforms.RandomResizedCrop(loc_size, ls, interpolation=bicubic), fcj,
                              _GaussianBlur(0.5), norm])
    return lambda img: [g1(img), g2(img)] + [loc(img) for _ in range(r.local_crops_number)]


def dino_reference():
    """DINO's recipe (224 / 96 px, 8 local crops) on the output of DINO's pil_loader: path -> crops."""
    t = dino_transform(Recipe())

    def run(path):
        with open(path, "rb") as f:
            return t(Image.open(f).convert("RGB"))
    return run


# ------------------------------------------------------------------------- photos
def _pink(rng, h, w):
    f = np.fft.rfft2(rng.standard_normal((h, w)))
    r = np.sqrt(np.fft.rfftfreq(w)[None, :] ** 2 + np.fft.fftfreq(h)[:, None] ** 2)
    r[0, 0] = 1.0
    x = np.fft.irfft2(f / r, s=(h, w))
    return (x - x.mean()) / x.std()


def make_photos(folder: Path, n: int, w: int = 500, h: int = 375, quality: int = 90) -> list[Path]:
    """SyntheticShapes scenes at w px, cut to h rows, with a 1/f luminance + chroma texture, saved as JPEG."""
    ds = SyntheticShapes("train", image_size=w, images_per_class=max(1, -(-n // 10)))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        a = np.asarray(ds.image(i * len(ds) // n).crop((0, (w - h) // 2, w, (w - h) // 2 + h)), np.float32)
        tex = _pink(rng, h, w)[..., None] * 0.15 + _pink(rng, h, w)[..., None] * np.array([0.05, -0.03, 0.02])
        p = folder / f"{i:03d}.jpg"
        Image.fromarray(np.clip(a * (1 + tex), 0, 255).astype(np.uint8)).save(p, quality=quality)
        paths.append(p)
    return paths


def draft_factor(recipe: Recipe, width: int, height: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4, 8) that keeps every crop of the recipe a downscale: RandomResizedCrop's
    smallest crop has the area ``scale_min * W * H`` at aspect 3/4, short side ``sqrt(scale_min * W * H * 3/4)``."""
    ratio = min(math.sqrt(s * width * height * 0.75) / size for s, size in
                ((recipe.global_crops_scale[0], recipe.global_size), (recipe.local_crops_scale[0], recipe.local_size)))
    f = 1
    while f < 8 and ratio >= 2 * f:
        f *= 2
    return f


def draft_load(path, factor: int) -> torch.Tensor:
    with Image.open(path) as im:
        im.draft("RGB", (im.size[0] // factor, im.size[1] // factor))
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_ms(fn, items) -> float:
    """CPU milliseconds of this process per item."""
    c0 = time.process_time()
    for it in items:
        fn(it)
    return (time.process_time() - c0) * 1000 / len(items)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="batch size of the batched stage 2")
    ap.add_argument("--jpeg_dir", type=str, default=None, help="measure on these JPEGs instead of generated ones")
    ap.add_argument("--write", type=str, default=None, help="also write the markdown to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    tmp = tempfile.TemporaryDirectory()
    if a.jpeg_dir:
        paths = sorted(p for p in Path(a.jpeg_dir).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:a.photos]
        source = f"{len(paths)} JPEGs from {a.jpeg_dir}"
    else:
        paths = make_photos(Path(tmp.name), a.photos)
        source = f"{len(paths)} generated 500x375 JPEG photos, quality 90"
    sizes = [p.stat().st_size / 1024 for p in paths]
    dims = Image.open(paths[0]).size

    r = Recipe()  # DINO's defaults: 2 x 224 + 8 x 96
    loader, enc_loader = ImageLoader(), EncodedLoader()
    s1, s1_enc, s2, dev_crops = CropStage(r), EncodedCropStage(r), ColorStage(r), DeviceCrops(r)
    fast, v2 = MultiCropAugmentation(backend="fast"), MultiCropAugmentation(backend="v2")
    ref = dino_reference()
    pil_rgb = lambda p: Image.open(p).convert("RGB")  # noqa: E731

    # stage-1 outputs for the batched stage-2 cases (made once; stage 2 is a pure function of them)
    torch.manual_seed(1)
    b = a.batch
    s1_out = [s1(loader(p)) for p in paths]
    batches = [default_collate((s1_out * (b // len(s1_out) + 1))[i:i + b]) for i in range(0, len(paths), b)]
    enc_out = [s1_enc(enc_loader(p)) for p in paths]
    enc_batches = [default_collate((enc_out * (b // len(enc_out) + 1))[i:i + b]) for i in range(0, len(paths), b)]
    per_batch = lambda fn: (lambda batch: fn(batch))  # noqa: E731
    cpu = torch.device("cpu")

    cases = {
        "DINO recipe (torchvision.transforms on PIL) = reference": (lambda p: ref(p), paths, 1),
        "decode only: PIL open + convert (DINO's loader)": (pil_rgb, paths, 1),
        "decode only: ImageLoader (decode_jpeg, channels-last)": (loader, paths, 1),
        "backend fast, per image (MultiCropAugmentation)": (lambda p: fast(pil_rgb(p)), paths, 1),
        "backend v2, per image (MultiCropAugmentation)": (lambda p: v2(pil_rgb(p)), paths, 1),
        "stage 1, CPU decode (ImageLoader + CropStage)": (lambda p: s1(loader(p)), paths, 1),
        "stage 1, device decode (EncodedLoader + EncodedCropStage)": (lambda p: s1_enc(enc_loader(p)), paths, 1),
        f"stage 2 on CPU, batch {b} (ColorStage)": (per_batch(lambda bt: s2(bt["crops"], bt["params"])), batches,
                                                   b),
        f"device-decode device part on CPU, batch {b} (decode + crops)": (
            per_batch(lambda bt: dev_crops(bt, cpu)), enc_batches, b),
    }
    rounds: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.repeats):
        for k, (fn, items, per) in cases.items():
            fn(items[0])  # warm-up (primitive caches, allocator)
            rounds[k].append(cpu_ms(fn, items) / per)
    names = list(cases)
    REF, S1, S1D, S2 = names[0], names[5], names[6], names[7]
    med = {k: statistics.median(v) for k, v in rounds.items()}
    ratio = {k: statistics.median([x / y for x, y in zip(rounds[k], rounds[REF])]) for k in rounds}
    # the whole CPU cost per image of each pipeline (sums of the per-round figures)
    rounds["pipeline cpu: stage 1 + stage 2 in the workers"] = [x + y for x, y in zip(rounds[S1], rounds[S2])]
    for k in list(rounds)[-1:]:
        med[k] = statistics.median(rounds[k])
        ratio[k] = statistics.median([x / y for x, y in zip(rounds[k], rounds[REF])])

    # Image.draft on a big JPEG: decode time and how the crops change
    big = Path(tmp.name) / "big.jpg"
    Image.open(paths[0]).resize((2000, 1500), Image.BICUBIC).save(big, quality=90)
    f = draft_factor(r, 2000, 1500)
    d_pil = statistics.median(cpu_ms(pil_rgb, [big] * 5) for _ in range(a.repeats))
    d_full = statistics.median(cpu_ms(loader, [big] * 5) for _ in range(a.repeats))
    d_draft = statistics.median(cpu_ms(lambda p: draft_load(p, f), [big] * 5) for _ in range(a.repeats))
    full, small = loader(big), draft_load(big, f)
    torch.manual_seed(2)
    boxes = [(t, left, h, w) for t, left, h, w in
             (transforms.RandomResizedCrop.get_params(small, [0.05, 0.4], [3 / 4, 4 / 3]) for _ in range(20))]
    rs = lambda x, t, left, h, w: torch.nn.functional.interpolate(  # noqa: E731
        x[None, :, t:t + h, left:left + w].float(), size=(96, 96), mode="bicubic", antialias=True)[0]
    dd = torch.stack([(rs(full, f * t, f * left, f * h, f * w) - rs(small, t, left, h, w)).abs().mean()
                      for t, left, h, w in boxes])

    # the demo's setting: 64 px embedded images, 2 x 32 + 2 x 16 px crops (EMBEDDED_DEFAULTS' scales)
    rt = Recipe((0.5, 1.0), (0.2, 0.5), 2, 32, 16)
    tiny = SyntheticShapes("train", image_size=64, images_per_class=max(1, a.photos * 4 // 10))
    timgs = [tiny.image(i) for i in range(len(tiny))]
    t_ref, t_fast, t_s1, t_s2 = dino_transform(rt), MultiCropAugmentation(
        *[getattr(rt, k) for k in ("global_crops_scale", "local_crops_scale", "local_crops_number", "global_size",
                                   "local_size")]), CropStage(rt), ColorStage(rt)
    t_s1_out = [t_s1(im) for im in timgs]
    t_batches = [default_collate(t_s1_out[i:i + b]) for i in range(0, len(timgs) - b + 1, b)]
    tiny_cases = {
        "DINO recipe on PIL (reference)": (t_ref, timgs, 1),
        "generate 64 px image (SyntheticShapes.image)": (lambda i: tiny.image(i), range(len(timgs)), 1),
        "backend fast, per image": (t_fast, timgs, 1),
        "stage 1 (CropStage)": (t_s1, timgs, 1),
        f"stage 2, batch {b} (the `cpu` pipeline's collate)": (
            per_batch(lambda bt: t_s2(bt["crops"], bt["params"])), t_batches, b),
    }
    t_rounds: dict[str, list[float]] = {k: [] for k in tiny_cases}
    for _ in range(a.repeats):
        for k, (fn, items, per) in tiny_cases.items():
            fn(items[0])
            t_rounds[k].append(cpu_ms(fn, items) / per)
    tn = list(tiny_cases)
    t_rounds["`cpu` pipeline: stage 1 + stage 2"] = [x + y for x, y in zip(t_rounds[tn[3]], t_rounds[tn[4]])]
    t_med = {k: statistics.median(v) for k, v in t_rounds.items()}
    t_ratio = {k: statistics.median([x / y for x, y in zip(v, t_rounds[tn[0]])]) for k, v in t_rounds.items()}

    load = os.getloadavg()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ref_ms = med[REF]
    lines = [
        "## Multi-crop CPU cost on real-size JPEG photos (`benchmarks/data.py`)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, 1 torch thread, "
        f"{now}, load average {load[0]:.1f} at the end (shared machine: read the ratios, measured interleaved in one "
        f"process; absolute ms are CPU time of this process). Photos: {source}, {dims[0]}x{dims[1]}, "
        f"{statistics.mean(sizes):.0f} KB on average. DINO's recipe: 2 x 224 + 8 x 96 crops. "
        f"Median of {a.repeats} interleaved rounds over all photos. Command: `python benchmarks/data.py"
        f"{' --write ' + a.write if a.write else ''}`.",
        "",
        "| case | CPU ms / image | x reference time | rounds (ms) |",
        "|---|---|---|---|",
        *[f"| {k} | {med[k]:.2f} | {ratio[k]:.3f} | {', '.join(f'{x:.2f}' for x in rounds[k])} |" for k in rounds],
        "",
        f"Images/s per CPU core and cores per GPU for a {STEP_IMG_S} img/s ViT-S/16 bf16 step (CPU work only; "
        "stage 2 of the device pipelines runs on the GPU):",
        "",
        "| pipeline | CPU ms / image | images/s per core | cores per GPU |",
        "|---|---|---|---|",
    ]
    for name, ms in (("DINO recipe (reference)", ref_ms), ("`--aug_pipeline cpu` (stage 1 + 2)",
                                                          med["pipeline cpu: stage 1 + stage 2 in the workers"]),
                     ("`--aug_pipeline device` (stage 1)", med[S1]),
                     ("`--aug_pipeline device_decode` (stage 1)", med[S1D]),
                     ("backend v2 per image", med[names[4]])):
        lines.append(f"| {name} | {ms:.2f} | {1000 / ms:.0f} | {STEP_IMG_S * ms / 1000:.1f} |")
    goal = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines += [
        "",
        f"Goals: stage 1 with CPU decode = {ratio[S1]:.3f} x the reference (<= 1/4: {goal(ratio[S1] <= 0.25)}); "
        f"with device decode = {ratio[S1D]:.3f} x (<= 1/20: {goal(ratio[S1D] <= 0.05)}); the whole `cpu` "
        f"pipeline = {ratio['pipeline cpu: stage 1 + stage 2 in the workers']:.3f} x (< 1, faster than DINO's: "
        f"{goal(ratio['pipeline cpu: stage 1 + stage 2 in the workers'] < 1)}).",
        "",
        f"`Image.draft` (not kept): at {dims[0]}x{dims[1]} no crop of the recipe allows a reduced decode (factor "
        f"{draft_factor(r, *dims)}). On a 2000x1500 JPEG (q90) the smallest local crop allows 1/{f}: decode "
        f"{d_pil:.1f} ms with PIL, {d_full:.1f} ms with `ImageLoader` (decode_jpeg), {d_draft:.1f} ms with PIL's "
        f"1/{f} draft ({d_full / d_draft:.2f}x `ImageLoader`'s speed); 96 px crops from the draft differ from "
        f"full-size ones by {float(dd.mean()):.2f} levels on average.",
    ]
    lines += [
        "",
        f"The demo's setting ({len(timgs)} embedded 64 px images, 2 x 32 + 2 x 16 px crops, scales (0.5, 1) and "
        "(0.2, 0.5)):",
        "",
        "| case | CPU ms / image | x reference time |",
        "|---|---|---|",
        *[f"| {k} | {t_med[k]:.3f} | {t_ratio[k]:.3f} |" for k in t_rounds],
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        Path(a.write).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write).write_text(text + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
