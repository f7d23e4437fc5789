"""Image corruptions (COCO-C and ours), condition lists, a render cache, FCTL twins.

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
import io
import json
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version as _pkg_version
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.fileio import TMP_SUFFIX, atomic_write, sha256_file
from harness.errors import ConfigError, DataError

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


# --------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Condition:
    """One evaluation condition: ``Condition("clean", 0)`` or a corruption at 1-5."""
    name: str
    severity: int

    @property
    def label(self) -> str:
        return "clean" if self.name == "clean" else f"{self.name}@{self.severity}"

    @property
    def is_clean(self) -> bool:
        return self.name == "clean"

    @classmethod
    def parse(cls, label: str) -> "Condition":
        """Inverse of :attr:`label`: ``"clean"`` or ``"fog@3"``."""
        items = expand_conditions([label])
        if len(items) != 1:
            raise ConfigError(f"{label!r} is not a single condition (use NAME@SEVERITY)")
        return items[0]


CLEAN = Condition("clean", 0)


def _unknown(kind: str, value, choices, field: str) -> ConfigError:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {value!r}{hint} (known: {', '.join(choices)})",
                       field=field)


def _severities(value, field: str) -> list[int]:
    vals = value if isinstance(value, (list, tuple)) else [value]
    if not vals:
        raise ConfigError("empty severity list", field=field)
    for k, s in enumerate(vals):
        f = f"{field}[{k}]" if isinstance(value, (list, tuple)) else field
        if not isinstance(s, int) or isinstance(s, bool) or s not in SEVERITIES:
            raise ConfigError(f"severity must be an integer 1-5, got {s!r}", field=f)
    return list(vals)


def expand_conditions(items, *, field: str = "conditions") -> list[Condition]:
    """Expand a suite's ``conditions:`` list into de-duplicated :class:`Condition` s.

    Accepted items (first occurrence order is kept):

    * ``"clean"``
    * a group name (``"coco-c"``, ``"coco-c-extra"``, ``"weather"``, ``"noise"``,
      ``"blur"``, ``"digital"``, ``"all"``): every member at severities 1-5
    * a corruption name (``"fog"``): severities 1-5; or a label ``"fog@3"``
    * ``{corruption: NAME, severity: S | [S, ...]}`` (severity defaults to 1-5)
    * ``{group: NAME, severity: S | [S, ...]}``

    Unknown names raise :class:`ConfigError` suggesting the closest known one;
    a severity outside 1-5 names the field, e.g. ``conditions[2].severity``.
    """
    if isinstance(items, (str, dict)):
        items = [items]
    out: dict[Condition, None] = {}
    names = list(CORRUPTIONS) + list(GROUPS) + ["clean"]
    for k, item in enumerate(items):
        f = f"{field}[{k}]"
        sev = list(SEVERITIES)
        if isinstance(item, str):
            key = item.strip()
            if "@" in key:
                key, _, s = key.partition("@")
                try:
                    sev = _severities(int(s), f)
                except ValueError:
                    raise ConfigError(f"bad severity in {item!r} (use NAME@1..5)", field=f) from None
            kind = "group" if key in GROUPS else "corruption"
        elif isinstance(item, dict):
            extra = set(item) - {"corruption", "group", "severity"}
            if extra or ("corruption" in item) == ("group" in item):
                raise ConfigError("a condition mapping needs exactly one of 'corruption' or "
                                  "'group' and optionally 'severity'"
                                  + (f" (unexpected keys: {sorted(extra)})" if extra else ""),
                                  field=f)
            kind = "group" if "group" in item else "corruption"
            key = item[kind]
            if not isinstance(key, str):
                raise ConfigError(f"must be a string, got {key!r}", field=f"{f}.{kind}")
            if "severity" in item:
                sev = _severities(item["severity"], f"{f}.severity")
        else:
            raise ConfigError(f"a condition is a name or a mapping, got {item!r}", field=f)
        if key == "clean":
            if (isinstance(item, dict) and "severity" in item) or "@" in str(item):
                raise ConfigError("'clean' takes no severity", field=f)
            out[CLEAN] = None
            continue
        if kind == "group":
            if key not in GROUPS:
                raise _unknown("group", key, list(GROUPS), f"{f}.group")
            members = GROUPS[key]
        else:
            if key not in CORRUPTIONS:
                raise _unknown("corruption or group", key, names,
                               f"{f}.corruption" if isinstance(item, dict) else f)
            members = (key,)
        for name in members:
            for s in sev:
                out[Condition(name, s)] = None
    return list(out)


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


# --------------------------------------------------------------------------
# Render cache
# --------------------------------------------------------------------------
MANIFEST = "manifest.json"
JOURNAL = ".journal.jsonl"
_TMP_SUFFIX = TMP_SUFFIX
_STALE_TMP_S = 600.0
PNG_COMPRESS_LEVEL = 3
_KEY_MEMO: dict[tuple, str] = {}


def dataset_key(ann_file) -> str:
    """``<annotation stem>-<sha256 of its content, 12 hex>``: the cache folder of a split.

    Content-based, so moving/copying the dataset keeps its renders and any
    edit to the annotations gets a fresh folder.  Source *images* are checked
    per file (size + mtime, then sha256) by :func:`render_condition`.
    Memoised per process by (path, size, mtime).
    """
    p = Path(ann_file).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _KEY_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in p.stem)[:40]
        _KEY_MEMO[memo] = f"{stem}-{h.hexdigest()[:12]}"
    return _KEY_MEMO[memo]


def _cond_dirname(condition: Condition, suite_seed: int) -> str:
    return condition.label if int(suite_seed) == 0 else f"{condition.label}~s{int(suite_seed)}"


def condition_root(index, condition: Condition, cache_dir, *, suite_seed: int = 0) -> Path:
    """Where :func:`render_condition` puts (or has put) a condition's images."""
    if condition.is_clean:
        return Path(index.image_root)
    return Path(cache_dir) / dataset_key(index.ann_file) / _cond_dirname(condition, suite_seed)


def _render_params(condition: Condition, suite_seed: int) -> dict:
    return {"version": DEGRADE_VERSION, "name": condition.name, "severity": condition.severity,
            "suite_seed": int(suite_seed), "corruption": corruption_params(condition.name,
                                                                           condition.severity)}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_journal(path: Path, params: dict) -> dict:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    try:
        header = json.loads(lines[0]) if lines else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("params") != params:
        return {}
    recs = {}
    for line in lines[1:]:
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(obj, dict) and "file" in obj:
            recs[obj["file"]] = obj
    return recs


def _load_uint8(data: bytes) -> np.ndarray:
    from harness.data.coco import load_rgb
    x = load_rgb(io.BytesIO(data))  # same conversions (alpha, 16-bit, ...) as training
    return _to_uint8(x.permute(1, 2, 0).numpy())


def _render_one(src: str, dst: str, name: str, severity: int, seed: int,
                size: tuple[int, int]) -> dict:
    """Render one image; returns its journal record (without ``file``)."""
    src_p, dst_p = Path(src), Path(dst)
    st = src_p.stat()
    data = src_p.read_bytes()
    img = _load_uint8(data)
    if (img.shape[1], img.shape[0]) != tuple(size):
        raise ValueError(f"image {src_p} is {img.shape[1]}x{img.shape[0]} but the annotation "
                         f"says {size[0]}x{size[1]}")
    out = corrupt(img, name, severity, seed)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    png = buf.getvalue()
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst_p, png, fsync=False)
    return {"sha256": hashlib.sha256(png).hexdigest(), "size": len(png),
            "src_sha256": hashlib.sha256(data).hexdigest(), "src_size": st.st_size,
            "src_mtime_ns": st.st_mtime_ns}


def _render_job(job):  # top level: picklable for worker processes
    file_name, src, dst, name, severity, seed, size = job
    try:
        return file_name, _render_one(src, dst, name, severity, seed, size), None
    except (OSError, ValueError) as e:
        return file_name, None, str(e)


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _record_ok(rec: dict | None, dst: Path, src: Path, verify: bool) -> bool:
    if not rec:
        return False
    try:
        if dst.stat().st_size != rec.get("size"):
            return False
        if verify and sha256_file(dst) != rec.get("sha256"):
            return False
        st = src.stat()
    except OSError:
        return False
    if (st.st_size, st.st_mtime_ns) == (rec.get("src_size"), rec.get("src_mtime_ns")):
        return True
    # Touched or copied source: compare content; keep the render if unchanged.
    if st.st_size == rec.get("src_size") and sha256_file(src) == rec.get("src_sha256"):
        rec["src_mtime_ns"] = st.st_mtime_ns
        return True
    return False


def render_condition(index, condition: Condition, cache_dir, *, suite_seed: int = 0,
                     progress: bool = False, workers: int = 1, verify: bool = True) -> Path:
    """Render every image of ``index`` under ``condition`` once; return the image root.

    ``load_coco(index.ann_file, returned_root)`` then reads the degraded split
    (same relative ``file_name`` s; the bytes are always PNG, whatever the
    extension -- PIL reads by content).  ``clean`` returns ``index.image_root``.

    Layout: ``cache_dir/<dataset_key>/<name>@<severity>/`` (``...~s<k>`` when
    ``suite_seed`` != 0) holding the images and ``manifest.json`` (format
    version, parameters, per file sha256/size and the source's
    sha256/size/mtime), written last.  Reuse: when the manifest's parameters
    match, every file is there with its size and (``verify``) sha256, and its
    source is unchanged (size + mtime, else sha256).  Anything else is
    re-rendered, only that.  Each image is written to a temp file and
    ``os.replace`` d, then appended to a journal, so a killed render resumes
    where it stopped and never leaves a half file.  Renders of the same
    condition in several processes are serialised by a lock file; ``workers``
    > 1 renders in a process pool.  Image seeds: :func:`image_seed` of the
    image id, so a render is byte-identical wherever it runs.
    """
    if condition.is_clean:
        return Path(index.image_root)
    _check_name_severity(condition.name, condition.severity)
    root = condition_root(index, condition, cache_dir, suite_seed=suite_seed)
    params = _render_params(condition, suite_seed)
    with _file_lock(root.parent / f".{root.name}.lock"):
        return _render_locked(index, condition, root, params, suite_seed=suite_seed,
                              progress=progress, workers=workers, verify=verify)


def _render_locked(index, condition, root: Path, params: dict, *, suite_seed, progress,
                   workers, verify) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    root_res = root.resolve()
    manifest = _read_json(root / MANIFEST)
    manifest_ok = isinstance(manifest, dict) and manifest.get("params") == params \
        and manifest.get("complete") is True
    if manifest_ok:
        records = {f: dict(r) for f, r in manifest.get("files", {}).items()}
    else:  # a killed render of the same parameters, else nothing (all re-rendered)
        records = _read_journal(root / JOURNAL, params)

    # One job per distinct file_name (duplicates share the first image's seed).
    todo, seen, files = [], set(), {}
    for i, info in enumerate(index.images):
        fn = info["file_name"]
        if fn in seen:
            continue
        seen.add(fn)
        dst = root / fn
        if not dst.resolve().is_relative_to(root_res):
            raise DataError(f"file_name {fn!r} points outside the image root",
                            file=index.ann_file, record=f"image id={info['id']}",
                            field="file_name")
        src = index.image_path(i)
        rec = records.get(fn)
        if _record_ok(rec, dst, src, verify):
            files[fn] = {k: rec[k] for k in ("sha256", "size", "src_sha256", "src_size",
                                              "src_mtime_ns")}
        else:
            todo.append((fn, str(src), str(dst), condition.name, condition.severity,
                         image_seed(info["id"], condition.name, condition.severity, suite_seed),
                         (info["width"], info["height"]), info["id"]))
    _remove_stale_tmp(root)
    if manifest_ok and not todo and set(files) == set(manifest["files"]) \
            and all(files[f] == manifest["files"][f] for f in files):
        return root

    (root / MANIFEST).unlink(missing_ok=True)  # incomplete from here until rewritten
    journal = root / JOURNAL
    if not records or manifest_ok or not journal.exists():
        # fresh journal holding what is already known to be good
        lines = [json.dumps({"params": params})] + [json.dumps({"file": f, **r})
                                                   for f, r in files.items()]
        atomic_write(journal, ("\n".join(lines) + "\n").encode())

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=f"render {condition.label}", unit="img")
    try:
        with open(journal, "a", encoding="utf-8") as jf:
            for fn, rec, err, image_id in _run_jobs(todo, workers):
                if err is not None:
                    raise DataError(f"cannot render: {err}", file=index.ann_file,
                                    record=f"image id={image_id}", field="file_name")
                files[fn] = rec
                jf.write(json.dumps({"file": fn, **rec}) + "\n")
                jf.flush()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    doc = {"params": params, "condition": condition.label, "complete": True,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "source": {"annotations": str(index.ann_file), "image_root": str(index.image_root)},
           "software": {d: _version(d) for d in ("imagecorruptions-imaug", "numpy",
                                                  "scikit-image", "scipy", "pillow",
                                                  "opencv-contrib-python-headless")},
           "files": {f: files[f] for f in sorted(files)}}
    atomic_write(root / MANIFEST, json.dumps(doc, indent=1).encode())
    journal.unlink(missing_ok=True)
    return root


def _run_jobs(todo, workers: int):
    """Yield ``(file_name, record, error, image_id)``, serially or in a process pool."""
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            # module-level lookup of _render_one: tests count renders via monkeypatch
            fn, *args, image_id = job
            try:
                yield fn, _render_one(*args), None, image_id
            except (OSError, ValueError) as e:
                yield fn, None, str(e), image_id
        return
    from concurrent.futures import ProcessPoolExecutor
    ids = {job[0]: job[-1] for job in todo}
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for fn, rec, err in ex.map(_render_job, [job[:-1] for job in todo], chunksize=4):
            yield fn, rec, err, ids[fn]


def _remove_stale_tmp(root: Path) -> None:
    """Delete temp files left by killed renders (older than 10 min: not a live writer's)."""
    now = time.time()
    for p in root.rglob(f".*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_S:
                p.unlink()


# --------------------------------------------------------------------------
# FCTL twins
# --------------------------------------------------------------------------
def twin_conditions(conditions, *, field: str = "conditions") -> list[Condition]:
    """Expanded, de-duplicated conditions usable for clean/degraded twins (same geometry).

    Corruptions that move pixels raise :class:`ConfigError` naming ``field``.
    """
    conds = conditions if all(isinstance(c, Condition) for c in conditions) \
        else expand_conditions(conditions, field=field)
    conds = list(dict.fromkeys(conds))
    if not conds:
        raise ConfigError("needs at least one condition", field=field)
    for c in conds:
        if not c.is_clean:
            _check_name_severity(c.name, c.severity)
            if CORRUPTIONS[c.name].moves_pixels:
                ok = [n for n, ci in CORRUPTIONS.items() if not ci.moves_pixels]
                raise ConfigError(f"corruption {c.name!r} moves pixels, so a clean twin would not share "
                                  f"its geometry; usable: {', '.join(ok)}", field=field)
    return conds


class DegradedTwins(torch.utils.data.Dataset):
    """``(clean image, degraded image, target)`` with identical geometry, for FCTL.

    Wraps a :class:`~harness.data.coco.CocoDetection`-like dataset (items
    ``(image float [3,H,W] in [0,1], target)``).  Item ``i`` in epoch ``e``
    gets one condition drawn from ``conditions`` (uniformly, ``clean``
    allowed) and a corruption seed, both from ``(seed, e, i)`` only -- call
    :meth:`set_epoch` each epoch (DataLoader workers must be re-created, i.e.
    ``persistent_workers=False``, to see it, as with ``DistributedSampler``).

    * ``cache_dir=None``: corrupted on the fly, after the wrapped dataset's
      own transform (so random flips/crops are shared by both twins).  The
      clean twin is returned as the dataset gave it; the degraded one is
      computed from its 8-bit rounding.
    * ``cache_dir`` given: every condition is rendered once with
      :func:`render_condition` (``suite_seed``), and the degraded twin is read
      from there; the corruption's own randomness is then fixed per image and
      only the condition varies per epoch.  The wrapped dataset must expose
      ``.index`` (a CocoIndex) and have no transform.

    Corruptions that move pixels (see :data:`CORRUPTIONS`) raise ConfigError.
    """

    def __init__(self, dataset, conditions, *, seed: int = 0, cache_dir=None,
                 suite_seed: int = 0, progress: bool = False, field: str = "conditions"):
        conds = twin_conditions(conditions, field=field)
        self.dataset, self.conditions, self.seed = dataset, conds, int(seed)
        self.epoch = 0
        self.suite_seed = int(suite_seed)
        self.roots: dict[Condition, Path] | None = None
        if cache_dir is not None:
            index = getattr(dataset, "index", None)
            if index is None or not hasattr(index, "ann_file"):
                raise ConfigError("rendering twins from the cache needs a dataset with a "
                                  "CocoIndex '.index'", field="cache_dir")
            if getattr(dataset, "transform", None) is not None:
                raise ConfigError("rendered twins cannot share a dataset transform's random "
                                  "geometry; use cache_dir=None (on the fly) instead",
                                  field="cache_dir")
            self.roots = {c: render_condition(index, c, cache_dir, suite_seed=suite_seed,
                                              progress=progress) for c in conds}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def draw(self, i: int) -> tuple[Condition, int]:
        """The condition and corruption seed of item ``i`` in the current epoch."""
        rng = np.random.default_rng([self.seed & (2 ** 63 - 1), self.epoch, int(i), 0x7717])
        cond = self.conditions[int(rng.integers(len(self.conditions)))]
        return cond, int(rng.integers(2 ** 63))

    def __getitem__(self, i: int):
        clean, target = self.dataset[i]
        cond, seed = self.draw(i)
        if cond.is_clean:
            return clean, clean.clone(), target
        if self.roots is None:
            u8 = _to_uint8(clean.permute(1, 2, 0).numpy())
            out = corrupt(u8, cond.name, cond.severity, seed)
            degraded = torch.from_numpy(out.astype(np.float32) / 255.0).permute(2, 0, 1)
            return clean, degraded.contiguous(), target
        from harness.data.coco import load_rgb
        path = self.roots[cond] / self.dataset.index.images[i]["file_name"]
        degraded = load_rgb(path)
        if degraded.shape != clean.shape:
            raise DataError(f"rendered image {path} is {tuple(degraded.shape)}, clean is "
                            f"{tuple(clean.shape)}", file=path)
        return clean, degraded, target
