"""Image corruptions: the COCO-C table, our ``rain`` and ``dark``, and :func:`corrupt`.

Everything that decides the pixels of a degraded image lives in this module
and nowhere else, so :data:`DEGRADE_VERSION` sits next to the code it
versions and the other parts build on it without touching pixels: condition
lists (:mod:`harness.data.conditions`), the render cache
(:mod:`harness.data.render_cache`) and FCTL twins (:mod:`harness.data.twins`).

Corruptions
-----------
The 19 corruptions of ``imagecorruptions`` (Michaelis et al. 2019; the 15
COCO-C benchmark ones plus the 4 "validation" extras) and two of ours on the
same 1-5 severity scale: ``rain`` (streaks + haze) and ``dark`` (low light with
sensor noise); see :func:`_rain` and :func:`_dark` for their parameter tables.
All parameters are in absolute pixels, like COCO-C, which was tuned on
COCO-sized images (~640x480): on small images the same severity is relatively
stronger for blurs and streaks.

Each entry of :data:`CORRUPTIONS` records ``moves_pixels``: whether image
content ends up somewhere else (so a clean and a degraded twin no longer share
geometry).  Decisions:

* ``glass_blur`` -- yes: pixels are swapped with neighbours up to 4 px away.
* ``elastic_transform`` -- yes: a smooth random displacement field.
* ``zoom_blur`` -- yes: the average of copies zoomed about the centre up to
  1.31x; content far from the centre is smeared outwards by up to ~15% of the
  image size (boxes grow and drift).
* ``motion_blur`` -- yes: its kernel is one-sided (a half Gaussian from 0 to
  2r px along a random direction), so content shifts by ~0.8 sigma = 2-11 px,
  not just spreads.
* everything else -- no: point-wise colour changes, additive noise, symmetric
  blurs (``defocus_blur``, ``gaussian_blur``), overlays (snow, frost, fog,
  spatter, rain), block averaging (``pixelate``) and JPEG keep every object
  where it was.

Determinism
-----------
:func:`corrupt` is a pure function of ``(image, name, severity, seed)``.
imagecorruptions draws from numpy's *global* RNG (noise, motion angle, fog,
frost, snow, spatter, elastic), from a numba RNG (``glass_blur``) and from
skimage (``impulse_noise``): the global RNG is seeded inside a process-wide
lock and its previous state restored afterwards (callers' own ``np.random``
streams are not disturbed), the other two get explicit seeds.  Another thread
drawing from ``np.random`` *while* a corruption runs could still interleave
with it; DataLoader workers are processes, so this does not arise there.

Small images: imagecorruptions requires both sides >= 32 px; smaller images
are reflect-padded to 32 px, corrupted and cropped back (only then).  All 21
corruptions were checked on 32..640 px, square and non-square images.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import threading
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version

import numpy as np
from PIL import Image

from harness.core import ConfigError

DEGRADE_VERSION = 1  # bump when any corruption's output or the cache layout changes
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # imagecorruptions' minimum image side


@dataclass(frozen=True)
class CorruptionInfo:
    name: str
    family: str          # noise | blur | weather | digital | low_light
    benchmark: bool      # one of the 15 COCO-C corruptions (counted in mPC)
    moves_pixels: bool   # content changes place: not usable for FCTL twins
    source: str          # "imagecorruptions" or "detbench"
    stochastic: bool     # output depends on the seed (else a fixed function of the image)


_DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate",
                  "jpeg_compression", "gaussian_blur", "saturate"}


def _info(name, family, benchmark=False, moves=False, source="imagecorruptions"):
    return name, CorruptionInfo(name, family, benchmark, moves, source,
                                name not in _DETERMINISTIC)


CORRUPTIONS: dict[str, CorruptionInfo] = dict([
    _info("gaussian_noise", "noise", True),
    _info("shot_noise", "noise", True),
    _info("impulse_noise", "noise", True),
    _info("defocus_blur", "blur", True),
    _info("glass_blur", "blur", True, moves=True),
    _info("motion_blur", "blur", True, moves=True),
    _info("zoom_blur", "blur", True, moves=True),
    _info("snow", "weather", True),
    _info("frost", "weather", True),
    _info("fog", "weather", True),
    _info("brightness", "weather", True),
    _info("contrast", "digital", True),
    _info("elastic_transform", "digital", True, moves=True),
    _info("pixelate", "digital", True),
    _info("jpeg_compression", "digital", True),
    # imagecorruptions' 4 extra ("validation") corruptions, one per family
    _info("speckle_noise", "noise"),
    _info("gaussian_blur", "blur"),
    _info("spatter", "weather"),
    _info("saturate", "digital"),
    # ours
    _info("rain", "weather", source="detbench"),
    _info("dark", "low_light", source="detbench"),
])
FAMILY: dict[str, str] = {n: c.family for n, c in CORRUPTIONS.items()}
FAMILIES = ("noise", "blur", "weather", "digital", "low_light")
BENCHMARK = tuple(n for n, c in CORRUPTIONS.items() if c.benchmark)
GROUPS: dict[str, tuple[str, ...]] = {
    "coco-c": BENCHMARK,
    "coco-c-extra": ("speckle_noise", "gaussian_blur", "spatter", "saturate"),
    "weather": ("snow", "frost", "fog", "brightness", "rain"),
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    "all": tuple(CORRUPTIONS),
}


# Shared by corrupt()'s argument check and condition parsing (harness.data.conditions).
def _unknown(kind: str, value, choices, field: str) -> ConfigError:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {value!r}{hint} (known: {', '.join(choices)})",
                       field=field)


# --------------------------------------------------------------------------
# Our corruptions
# --------------------------------------------------------------------------
RAIN_PARAMS = {
    #   density: streaks per pixel; length: mean px (x U(0.6, 1.4) per streak);
    #   angle: max |tilt| from vertical of the per-image wind direction, deg
    #   (each streak +- N(0, 2 deg)); width: px; alpha: streak opacity (x U(0.5, 1)
    #   per streak); haze: blend toward grey; darken: multiplicative
    1: dict(density=0.0005, length=10, angle=10, width=1, alpha=0.45, haze=0.03, darken=0.97),
    2: dict(density=0.0010, length=15, angle=15, width=1, alpha=0.55, haze=0.06, darken=0.93),
    3: dict(density=0.0018, length=20, angle=20, width=1, alpha=0.65, haze=0.09, darken=0.89),
    4: dict(density=0.0028, length=25, angle=25, width=2, alpha=0.70, haze=0.12, darken=0.85),
    5: dict(density=0.0040, length=30, angle=30, width=2, alpha=0.75, haze=0.15, darken=0.80),
}
RAIN_COLOUR = np.array([0.82, 0.84, 0.88], np.float32)
HAZE_COLOUR = np.array([0.70, 0.72, 0.75], np.float32)

DARK_PARAMS = {
    #   gamma: y = scale * x**gamma (x in [0,1]); peak: photo-electrons at y = 1
    #   (Poisson shot noise); read: std of Gaussian read noise (fraction of range)
    1: dict(gamma=1.2, scale=0.70, peak=400.0, read=0.004),
    2: dict(gamma=1.4, scale=0.50, peak=200.0, read=0.008),
    3: dict(gamma=1.6, scale=0.35, peak=100.0, read=0.012),
    4: dict(gamma=1.8, scale=0.22, peak=50.0, read=0.018),
    5: dict(gamma=2.0, scale=0.12, peak=25.0, read=0.025),
}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _rain(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks over a slightly hazy, darker image.

    ========  =======  ======  =====  =====  =====  =====  ======
    severity  density  length  angle  width  alpha  haze   darken
    ========  =======  ======  =====  =====  =====  =====  ======
    1         0.0005   10      10     1      0.45   0.03   0.97
    2         0.0010   15      15     1      0.55   0.06   0.93
    3         0.0018   20      20     1      0.65   0.09   0.89
    4         0.0028   25      25     2      0.70   0.12   0.85
    5         0.0040   30      30     2      0.75   0.15   0.80
    ========  =======  ======  =====  =====  =====  =====  ======

    ``round(density * H * W)`` streaks (anti-aliased lines, start points
    uniform over the image extended by one length up/left/right so streaks
    enter from the borders), mean ``length`` px (x U(0.6, 1.4) each), tilted
    from vertical by one per-image angle U(-angle, angle) deg plus N(0, 2) deg
    per streak, ``width`` px thick, opacity ``alpha`` x U(0.5, 1), colour
    (0.82, 0.84, 0.88), softened by a 0.5 px Gaussian.  Background:
    ``x * darken * (1 - haze) + haze * (0.70, 0.72, 0.75)``.
    """
    import cv2
    p = RAIN_PARAMS[severity]
    h, w = img.shape[:2]
    x = img.astype(np.float32) / 255.0
    n = int(round(p["density"] * h * w))
    L = p["length"]
    base = np.deg2rad(rng.uniform(-p["angle"], p["angle"]))
    xs = rng.uniform(-L, w + L, n)
    ys = rng.uniform(-L, h, n)
    lens = L * rng.uniform(0.6, 1.4, n)
    angs = base + np.deg2rad(rng.normal(0.0, 2.0, n))
    vals = rng.uniform(0.5, 1.0, n)
    mask = np.zeros((h, w), np.uint8)
    shift = 4  # sub-pixel precision for cv2.line
    x0, y0 = xs * 16, ys * 16
    x1, y1 = (xs + lens * np.sin(angs)) * 16, (ys + lens * np.cos(angs)) * 16
    for a, b, c, d, v in zip(x0.astype(np.int64), y0.astype(np.int64), x1.astype(np.int64),
                             y1.astype(np.int64), (vals * 255).astype(np.int64)):
        cv2.line(mask, (int(a), int(b)), (int(c), int(d)), int(v), p["width"], cv2.LINE_AA, shift)
    m = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 0.5)[..., None] * p["alpha"]
    bg = x * (p["darken"] * (1.0 - p["haze"])) + p["haze"] * HAZE_COLOUR
    return _to_uint8(bg * (1.0 - m) + m * RAIN_COLOUR)


def _dark(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Low light: gamma curve + darkening + Poisson-Gaussian sensor noise.

    ========  =====  =====  =====  =====
    severity  gamma  scale  peak   read
    ========  =====  =====  =====  =====
    1         1.2    0.70   400    0.004
    2         1.4    0.50   200    0.008
    3         1.6    0.35   100    0.012
    4         1.8    0.22   50     0.018
    5         2.0    0.12   25     0.025
    ========  =====  =====  =====  =====

    ``y = scale * x**gamma`` (x in [0, 1]); then per pixel and channel
    ``Poisson(y * peak) / peak + N(0, read)``, clipped to [0, 1].  No gain is
    applied afterwards: the result stays dark and noisy, like an
    under-exposed frame.
    """
    p = DARK_PARAMS[severity]
    x = img.astype(np.float64) / 255.0
    y = p["scale"] * np.power(x, p["gamma"])
    y = rng.poisson(y * p["peak"]) / p["peak"] + rng.normal(0.0, p["read"], y.shape)
    return _to_uint8(y)


# --------------------------------------------------------------------------
# corrupt()
# --------------------------------------------------------------------------
_GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def _seeded_global_rng(seed: int):
    """Seed ``np.random``'s global state; restore the caller's state afterwards."""
    with _GLOBAL_RNG_LOCK:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def _version(dist: str) -> str:
    try:
        return _pkg_version(dist)
    except PackageNotFoundError:
        return "unknown"


_IC = None


def _imagecorruptions() -> dict:
    """imagecorruptions' functions; glass_blur's numba kernel is cached on disk
    (numba's own cache: ~5 s of JIT compilation once instead of in every process)."""
    global _IC
    if _IC is None:
        import imagecorruptions.corruptions as ic
        from imagecorruptions import corruption_dict
        with contextlib.suppress(Exception):  # read-only installs just compile each time
            ic._shuffle_pixels_njit_glass_blur.enable_caching()
        _IC = corruption_dict
    return _IC


def _check_name_severity(name: str, severity) -> None:
    if name not in CORRUPTIONS:
        raise _unknown("corruption", name, list(CORRUPTIONS), "corruption")
    if not isinstance(severity, (int, np.integer)) or isinstance(severity, bool) \
            or int(severity) not in SEVERITIES:
        raise ConfigError(f"severity must be an integer 1-5, got {severity!r}", field="severity")


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one ``uint8`` image (``H x W x 3``; ``H x W`` is taken as grey).

    Returns a new ``uint8 H x W x 3`` array.  Byte-identical for the same
    ``(image, name, severity, seed)`` in any process; numpy's global RNG state
    is left as the caller had it.  ``seed`` is any Python int.
    """
    _check_name_severity(name, severity)
    severity = int(severity)
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3) or min(img.shape[:2]) < 1:
        raise ValueError(f"expected an H x W x 3 image, got shape {tuple(image.shape)}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = np.ascontiguousarray(img)
    ss = np.random.SeedSequence(int(seed) & (2 ** 128 - 1))
    if CORRUPTIONS[name].source == "detbench":
        fn = _rain if name == "rain" else _dark
        return fn(img, severity, np.random.default_rng(ss))

    h, w = img.shape[:2]
    ph, pw = max(0, MIN_SIDE - h), max(0, MIN_SIDE - w)
    if ph or pw:  # reflect-pad tiny images to imagecorruptions' minimum, crop back below
        import cv2
        img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_REFLECT_101
                                 if min(h, w) > 1 else cv2.BORDER_REPLICATE)
    fn = _imagecorruptions()[name]
    g, nb, sk = (int(v) for v in ss.generate_state(3, np.uint32))
    kwargs = {}
    if name == "glass_blur":
        kwargs["seed"] = nb  # numba's own RNG, seeded inside the jitted loop
    elif name == "impulse_noise":
        kwargs["seed"] = np.random.default_rng(sk)  # skimage's rng argument
    with _seeded_global_rng(g):
        out = fn(Image.fromarray(img), severity, **kwargs)
    out = np.uint8(out)  # as imagecorruptions.corrupt (truncation, like COCO-C)
    return np.ascontiguousarray(out[:h, :w])


def image_seed(image_id: int, name: str, severity: int, suite_seed: int = 0) -> int:
    """Seed of one image under one condition: sha256-based, same in every process.

    Returned as an int in ``[0, 2**63)``.
    """
    key = f"detbench-degrade|{int(suite_seed)}|{name}|{int(severity)}|{int(image_id)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def corruption_params(name: str, severity: int) -> dict:
    """What determines a corruption's output (recorded in cache manifests)."""
    _check_name_severity(name, severity)
    if CORRUPTIONS[name].source == "detbench":
        table = RAIN_PARAMS if name == "rain" else DARK_PARAMS
        return {"impl": f"detbench:{name}", **table[int(severity)]}
    return {"impl": f"imagecorruptions-imaug=={_version('imagecorruptions-imaug')}",
            "min_side": MIN_SIDE}
