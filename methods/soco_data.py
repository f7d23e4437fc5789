"""SoCo's data side: object proposals (filtered, cached on disk) and the three views.

Public pieces (re-exported by :mod:`methods.soco`): :func:`filter_proposals`,
:func:`selective_search`, :func:`random_proposals`, :class:`ProposalStore`,
:class:`ViewBuilder`, :class:`SoCoViews`, :func:`stack_views`.

Geometry convention: boxes are continuous ``x1, y1, x2, y2`` pixel
coordinates with ``x2`` exclusive (a box covering the whole ``W x H`` image is
``[0, 0, W, H]``); a crop is ``(top, left, height, width)`` in integer pixels;
a point ``x`` of the image lies at ``(x - left) * S / width`` in a crop
resized to ``S``, and at ``S - x`` after a horizontal flip.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from harness.core import atomic_write

log = logging.getLogger(__name__)

try:  # opencv-contrib: cv2.ximgproc is absent from the plain opencv-python build
    import cv2
    _SEGMENTATION = cv2.ximgproc.segmentation
except (ImportError, AttributeError):  # pragma: no cover - depends on the install
    cv2, _SEGMENTATION = None, None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Augmentation probabilities of the released code (BYOL's asymmetric recipe): V1 is
# always blurred and never solarized; V2 and V3 are rarely blurred, sometimes solarized.
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)   # brightness, contrast, saturation, hue
P_COLOR_JITTER, P_GRAYSCALE = 0.8, 0.2
P_BLUR = {"v1": 1.0, "v2": 0.1, "v3": 0.1}
P_SOLARIZE = {"v1": 0.0, "v2": 0.2, "v3": 0.2}
BLUR_SIGMA = (0.1, 2.0)               # at 224 px; scaled with the view size
CROP_RATIO = (3 / 4, 4 / 3)           # RandomResizedCrop's aspect range


def has_selective_search() -> bool:
    """Whether OpenCV's selective search (opencv-contrib ``cv2.ximgproc``) is importable."""
    return _SEGMENTATION is not None


# --------------------------------------------------------------------------- proposals
def filter_proposals(boxes, image_w: float, image_h: float, *, min_side: float = 32.0,
                     max_aspect: float = 3.0, area_ratio: tuple[float, float] = (0.3, 0.8)) -> np.ndarray:
    """The proposal filter cascade (docs/methods.md) on ``[n, 4]`` xyxy boxes; returns ``[m, 4]`` float32, m >= 1.

    Keep boxes with ``w, h >= min_side``, aspect ``w / h`` in ``[1/max_aspect, max_aspect]``
    and ``sqrt(w h) / sqrt(W H)`` in ``area_ratio`` (bounds inclusive). Where none
    passes: the boxes passing the aspect filter alone; then all (non-degenerate) boxes
    unfiltered; then the whole image ``[0, 0, W, H]``.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    valid = (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(valid, w / np.where(h > 0, h, 1), 0)
        rel = np.sqrt(np.clip(w * h, 0, None)) / math.sqrt(image_w * image_h)
    eps = 1e-6  # hand-written bounds such as 1/3 must pass exactly
    aspect_ok = valid & (aspect >= 1 / max_aspect - eps) & (aspect <= max_aspect + eps)
    full = (aspect_ok & (w >= min_side) & (h >= min_side)
            & (rel >= area_ratio[0] - eps) & (rel <= area_ratio[1] + eps))
    for keep in (full, aspect_ok, valid):
        if keep.any():
            return b[keep]
    return np.array([[0, 0, image_w, image_h]], dtype=np.float32)


def selective_search(image_rgb: np.ndarray, *, scale: float = 300, sigma: float = 0.9,
                     min_size: int = 100) -> np.ndarray:
    """OpenCV selective search, "single strategy" (HSV, colour+fill+size+texture similarity)
    with graph segmentation ``k = scale``, ``sigma``, ``min_size``; ``[n, 4]`` xyxy float32.

    ``switchToSingleStrategy`` only exposes k and sigma, so its graph segmentation is
    replaced by one created with all three parameters. ``image_rgb``: uint8 ``[H, W, 3]``.
    """
    if _SEGMENTATION is None:
        raise RuntimeError("OpenCV selective search (cv2.ximgproc, opencv-contrib) is not installed")
    ss = _SEGMENTATION.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image_rgb[:, :, ::-1]))  # OpenCV wants BGR
    ss.switchToSingleStrategy(int(scale), float(sigma))
    ss.clearGraphSegmentations()
    ss.addGraphSegmentation(_SEGMENTATION.createGraphSegmentation(float(sigma), float(scale), int(min_size)))
    rects = np.asarray(ss.process(), dtype=np.float32).reshape(-1, 4)  # x, y, w, h
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def random_proposals(image_w: int, image_h: int, rng: np.random.Generator, n: int = 64, *,
                     min_side: float = 32.0, max_aspect: float = 3.0,
                     area_ratio: tuple[float, float] = (0.3, 0.8)) -> np.ndarray:
    """The fallback generator: random boxes drawn to meet the specified filter (then filtered with it).

    Side ``sqrt(w h)`` uniform in ``area_ratio * sqrt(W H)``, aspect log-uniform in
    ``[1/max_aspect, max_aspect]``, position uniform inside the image.
    """
    rel = rng.uniform(area_ratio[0], area_ratio[1], n) * math.sqrt(image_w * image_h)
    aspect = np.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect), n))
    w = np.minimum(rel * np.sqrt(aspect), image_w)
    h = np.minimum(rel / np.sqrt(aspect), image_h)
    x = rng.uniform(0, 1, n) * (image_w - w)
    y = rng.uniform(0, 1, n) * (image_h - h)
    boxes = np.stack([x, y, x + w, y + h], axis=1)
    return filter_proposals(boxes, image_w, image_h, min_side=min_side, max_aspect=max_aspect,
                            area_ratio=area_ratio)


@dataclass(frozen=True)
class ProposalParams:
    """Everything that determines an image's proposals (part of the cache key)."""
    scale: float = 300
    sigma: float = 0.9
    min_size: int = 100
    min_side: float = 32.0
    max_aspect: float = 3.0
    area_ratio: tuple[float, float] = (0.3, 0.8)

    def filter_kw(self) -> dict:
        return dict(min_side=self.min_side, max_aspect=self.max_aspect, area_ratio=tuple(self.area_ratio))


def default_cache_dir() -> Path:
    """``<this node's cache>/soco_proposals`` (:func:`harness.core.node_cache_dir`)."""
    from harness.core import node_cache_dir
    return node_cache_dir() / "soco_proposals"


def _to_uint8_hwc(image: Tensor) -> np.ndarray:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class ProposalStore:
    """Filtered proposals per image: computed once, kept in memory and in ``cache_dir``.

    The generator is selective search where OpenCV's is installed, else (or with
    ``generator="random"``) :func:`random_proposals` seeded by the cache key, with a
    logged warning. A disk entry is ``<sha256 of (image identity, W x H, params,
    generator)>.npy``; the identity of a file is its resolved path, byte size and
    mtime (a rewritten file is recomputed), of an in-memory image its pixels' hash.
    Writes are atomic (:func:`harness.core.fileio.atomic_write`), so concurrent workers are safe.
    ``cache_dir=None``: memory only.
    """

    _warned = False

    def __init__(self, params: ProposalParams = ProposalParams(), cache_dir: str | Path | None = None,
                 generator: str | None = None):
        if generator is None:
            generator = "selective_search" if has_selective_search() else "random"
            if generator == "random" and not ProposalStore._warned:
                ProposalStore._warned = True
                log.warning("OpenCV selective search (cv2.ximgproc from opencv-contrib) is not installed: "
                            "SoCo uses random boxes meeting the proposal filter instead")
        if generator not in ("selective_search", "random"):
            raise ValueError(f"generator must be 'selective_search' or 'random', got {generator!r}")
        self.params, self.generator = params, generator
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._memory: dict[str, np.ndarray] = {}

    def key(self, identity: str, width: int, height: int) -> str:
        blob = json.dumps({"image": identity, "size": [int(width), int(height)],
                           "params": asdict(self.params), "generator": self.generator}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @staticmethod
    def identity(image: Tensor, path: str | Path | None) -> str:
        if path is not None:
            p = Path(path).resolve()
            st = p.stat()
            return f"{p}|{st.st_size}|{st.st_mtime_ns}"
        return "sha1:" + hashlib.sha1(_to_uint8_hwc(image).tobytes()).hexdigest()

    def get(self, image: Tensor, path: str | Path | None = None) -> np.ndarray:
        """Proposals ``[n, 4]`` (xyxy, image pixels) of ``image`` ``[3, H, W]`` in [0, 1]."""
        h, w = image.shape[-2:]
        key = self.key(self.identity(image, path), w, h)
        if key in self._memory:
            return self._memory[key]
        boxes = self._load(key)
        if boxes is None:
            boxes = self.compute(image, key)
            self._save(key, boxes)
        self._memory[key] = boxes
        return boxes

    def compute(self, image: Tensor, key: str = "") -> np.ndarray:
        h, w = image.shape[-2:]
        p = self.params
        if self.generator == "selective_search":
            raw = selective_search(_to_uint8_hwc(image), scale=p.scale, sigma=p.sigma, min_size=p.min_size)
            return filter_proposals(raw, w, h, **p.filter_kw())
        rng = np.random.default_rng(int(key[:15] or "0", 16))
        return random_proposals(w, h, rng, **p.filter_kw())

    def _path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key}.npy" if self.cache_dir is not None else None

    def _load(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            boxes = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:  # truncated or foreign file: recompute and replace it
            log.warning("ignoring unreadable SoCo proposal cache file %s: %s", path, exc)
            return None
        return boxes.astype(np.float32).reshape(-1, 4) if boxes.size else None

    def _save(self, key: str, boxes: np.ndarray) -> None:
        path = self._path(key)
        if path is None:
            return
        buf = io.BytesIO()
        np.save(buf, np.asarray(boxes, dtype=np.float32), allow_pickle=False)
        atomic_write(path, buf.getvalue(), fsync=False)  # a cache entry: recomputed if lost


# --------------------------------------------------------------------------- views
def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def sample_crop(height: int, width: int, g: torch.Generator, scale=(0.5, 1.0), ratio=CROP_RATIO
                ) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with an explicit generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Tensor, crop: tuple[int, int, int, int], size: int) -> Tensor:
    """``image[:, top:top+h, left:left+w]`` resized (bilinear, antialiased) to ``size x size``."""
    top, left, h, w = crop
    patch = image[:, top:top + h, left:left + w].unsqueeze(0)
    return F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0).clamp(0, 1)


def boxes_to_view(boxes: Tensor, crop: tuple[int, int, int, int], size: int) -> Tensor:
    """Image-pixel boxes clipped to ``crop`` and mapped into its ``size x size`` resized view."""
    top, left, h, w = crop
    b = boxes.clone().float()
    b[:, 0::2] = (b[:, 0::2].clamp(left, left + w) - left) * (size / w)
    b[:, 1::2] = (b[:, 1::2].clamp(top, top + h) - top) * (size / h)
    return b


def hflip_boxes(boxes: Tensor, size: int) -> Tensor:
    return torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)


def overlapping(boxes: Tensor, crop: tuple[int, int, int, int]) -> Tensor:
    """Indices of the boxes whose intersection with ``crop`` has positive area."""
    top, left, h, w = crop
    iw = boxes[:, 2].clamp(max=left + w) - boxes[:, 0].clamp(min=left)
    ih = boxes[:, 3].clamp(max=top + h) - boxes[:, 1].clamp(min=top)
    return torch.nonzero((iw > 0) & (ih > 0)).flatten()


def jitter_boxes(boxes: Tensor, g: torch.Generator, prob: float, ratio: float, width: int, height: int) -> Tensor:
    """The box jitter (docs/methods.md), each box with probability ``prob``: x, y += U(-r, r) * w (h),
    w, h *= 1 + U(-r, r); clipped to the image (stays non-empty for r < 0.5)."""
    out = boxes.clone().float()
    for i in range(len(out)):
        if _uniform(g) >= prob:
            continue
        u = [_uniform(g, -ratio, ratio) for _ in range(4)]
        x1, y1, x2, y2 = out[i].tolist()
        w, h = x2 - x1, y2 - y1
        nx, ny = x1 + u[0] * w, y1 + u[1] * h
        out[i] = torch.tensor([nx, ny, nx + w * (1 + u[2]), ny + h * (1 + u[3])])
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def augment_view(img: Tensor, g: torch.Generator, view: str) -> Tensor:
    """Colour jitter (p 0.8, random order), grayscale (p 0.2), Gaussian blur, solarize (threshold 0.5)."""
    if _uniform(g) < P_COLOR_JITTER:
        b, c, s, hue = COLOR_JITTER
        ops = [(TF.adjust_brightness, _uniform(g, 1 - b, 1 + b)), (TF.adjust_contrast, _uniform(g, 1 - c, 1 + c)),
               (TF.adjust_saturation, _uniform(g, 1 - s, 1 + s)), (TF.adjust_hue, _uniform(g, -hue, hue))]
        for k in torch.randperm(4, generator=g).tolist():
            fn, factor = ops[k]
            img = fn(img, factor)
    if _uniform(g) < P_GRAYSCALE:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if _uniform(g) < P_BLUR[view]:
        sigma = _uniform(g, *BLUR_SIGMA) * img.shape[-1] / 224
        k = max(3, 2 * math.ceil(3 * sigma) + 1)
        k = min(k, 2 * ((img.shape[-1] - 1) // 2) + 1)  # reflect padding needs k/2 < size
        img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
    if _uniform(g) < P_SOLARIZE[view]:
        img = TF.solarize(img, 0.5)
    return img.clamp(0, 1)


@dataclass(frozen=True)
class ViewBuilder:
    """The views (docs/methods.md) of one image and K corresponding proposals per view pair.

    V1 = the whole image resized to ``view_size``; V2 = a random resized crop
    (scale ``crop_scale``, aspect 3/4..4/3) to ``view_size``; V3 = an independent one to
    ``small_view_size``. For each pair (V1, V2) and (V1, V3) (following the released
    code: each pair draws its own proposals) ``K`` proposals overlapping the crop are
    drawn without replacement, duplicates pad to K; the crop is resampled up to 10
    times when none overlaps, then the crop itself is the proposal. V2/V3 boxes are the
    proposals clipped to the crop; V1 boxes are jittered (docs/methods.md) and clipped to the image.
    Each view is flipped independently (p 0.5; V1's two box sets with it), then augmented
    (:func:`augment_view`). Output: ``v1, v2 [3,S,S]; v3 [3,s,s]; b1_12, b2, b1_13, b3 [K,4]``
    in view pixels.
    """
    view_size: int = 224
    small_view_size: int = 112
    num_proposals: int = 4
    crop_scale: tuple[float, float] = (0.5, 1.0)
    jitter_prob: float = 0.5
    jitter_ratio: float = 0.1
    augment: bool = True

    def _select(self, props: Tensor, crop, g: torch.Generator) -> Tensor | None:
        idx = overlapping(props, crop)
        if len(idx) == 0:
            return None
        idx = idx[torch.randperm(len(idx), generator=g)][:self.num_proposals]
        if len(idx) < self.num_proposals:  # duplicate to pad
            idx = torch.cat([idx, idx[torch.randint(len(idx), (self.num_proposals - len(idx),), generator=g)]])
        return props[idx]

    def __call__(self, image: Tensor, proposals, g: torch.Generator, *, return_meta: bool = False):
        height, width = image.shape[-2:]
        props = torch.as_tensor(np.asarray(proposals, dtype=np.float32)).reshape(-1, 4)
        if len(props) == 0:
            props = torch.tensor([[0.0, 0.0, float(width), float(height)]])
        S, s = self.view_size, self.small_view_size
        whole = (0, 0, height, width)
        pairs = {}
        for name in ("v2", "v3"):
            for _ in range(10):
                crop = sample_crop(height, width, g, self.crop_scale)
                sel = self._select(props, crop, g)
                if sel is not None:
                    break
            else:
                t, left, h, w = crop
                sel = torch.tensor([[left, t, left + w, t + h]], dtype=torch.float32).repeat(self.num_proposals, 1)
            pairs[name] = (crop, sel)
        (c2, p12), (c3, p13) = pairs["v2"], pairs["v3"]
        views = {"v1": resized_crop(image, whole, S), "v2": resized_crop(image, c2, S),
                 "v3": resized_crop(image, c3, s)}
        j12 = jitter_boxes(p12, g, self.jitter_prob, self.jitter_ratio, width, height)
        j13 = jitter_boxes(p13, g, self.jitter_prob, self.jitter_ratio, width, height)
        boxes = {"b1_12": boxes_to_view(j12, whole, S), "b1_13": boxes_to_view(j13, whole, S),
                 "b2": boxes_to_view(p12, c2, S), "b3": boxes_to_view(p13, c3, s)}
        flips = {}
        for v, keys, size in (("v1", ("b1_12", "b1_13"), S), ("v2", ("b2",), S), ("v3", ("b3",), s)):
            flips[v] = _uniform(g) < 0.5
            if flips[v]:
                views[v] = views[v].flip(-1)
                for k in keys:
                    boxes[k] = hflip_boxes(boxes[k], size)
        if self.augment:
            views = {v: augment_view(img, g, v) for v, img in views.items()}
        out = {**views, **boxes}
        if return_meta:
            meta = {"crop2": c2, "crop3": c3, "props12": p12, "props13": p13, "jittered12": j12,
                    "jittered13": j13, "flips": flips}
            return out, meta
        return out


def stack_views(samples: list[dict]) -> dict[str, Tensor]:
    """Per-image view dicts (as the loader collates them) into one batch dict."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# --------------------------------------------------------------------------- datasets
class ImageFolder(Dataset):
    """Unlabeled images of a folder (recursive, sorted): ``(image [3,H,W] in [0,1], {})``."""

    def __init__(self, root: str | Path):
        from harness.core import ConfigError
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"pretrain_images {self.root} is not a directory", field="pretrain_images")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}",
                              field="pretrain_images")

    def __len__(self) -> int:
        return len(self.files)

    def image_path(self, i: int) -> Path:
        return self.files[i]

    def __getitem__(self, i: int):
        from harness.data import load_rgb
        return load_rgb(self.files[i]), {}


class SoCoViews(Dataset):
    """``(views dict, {"index": i})`` of every image of ``source``; its labels are never read.

    ``source`` yields ``(image, anything)`` (uint8 or float images); where it knows its files
    (``image_path(i)``, or ``index.image_path(i)`` as :class:`harness.data.coco.CocoDetection`)
    proposals are cached by path. Each sample's randomness comes from ``(seed, epoch, i)``
    alone, so an epoch is the same whichever DataLoader worker builds which sample (and
    however many there are); the epoch is shared with persistent workers.
    """

    def __init__(self, source: Dataset, builder: ViewBuilder, store: ProposalStore, *, seed: int = 0):
        from harness.data import SharedEpoch
        self.source, self.builder, self.store, self.seed = source, builder, store, int(seed)
        self.epoch = SharedEpoch()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def path(self, i: int) -> Path | None:
        for obj in (self.source, getattr(self.source, "index", None)):
            if obj is not None and hasattr(obj, "image_path"):
                return obj.image_path(i)
        return None

    def __getitem__(self, i: int):
        from harness.data import image_to_float
        image = image_to_float(self.source[i][0])
        proposals = self.store.get(image, self.path(i))
        draw = np.random.default_rng([self.seed & (2 ** 63 - 1), self.epoch.get(), int(i), 0x50C0])
        g = torch.Generator().manual_seed(int(draw.integers(2 ** 62)))
        return self.builder(image, proposals, g), {"index": i}
