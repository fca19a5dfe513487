"""Toy world: a built-in, offline set of generated image tasks for demos and tests.

Model Ratatouille needs a pretraining task, several auxiliary tasks and a target task with a
domain shift. These generators draw all of them from scratch with PIL and numpy, so the default
world runs with no downloads and no data outside the package:

- ``shapes`` (target, like PACS): six shapes drawn in four styles (photo, sketch, cartoon, painting);
- ``glyphs`` (pretraining): the digits 0-9 in PIL's built-in font on noisy backgrounds, and (the demo's)
  the six shapes as photographs;
- ``stripes``, ``dots``, ``polygons`` (auxiliary): stripe orientation, dot count, polygon vertices.

Every generator is deterministic in its ``seed`` and never touches global random state. Images are
RGB ``uint8`` PIL images of ``size`` x ``size`` pixels, drawn at 4x and downsampled to anti-alias.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Callable

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
DOMAINS = ("photo", "sketch", "cartoon", "painting")
DIGITS = tuple(str(d) for d in range(10))
STRIPE_ORIENTATIONS = ("horizontal", "diagonal_rising", "vertical", "diagonal_falling")
DOT_COUNTS = ("one", "two", "three", "four", "five")
POLYGONS = ("triangle", "quadrilateral", "pentagon", "hexagon", "heptagon", "octagon")

_SS = 4  # supersampling factor: shapes are rasterised at 4x and box-filtered down

Contour = tuple[np.ndarray, bool]  # (N, 2) points, True when the contour is a hole


def describe() -> dict[str, str]:
    """One line per task, for demo output and model cards."""
    return {
        "shapes": "target: 6 shapes (circle, square, triangle, cross, star, ring) in 4 styles "
        "(photo, sketch, cartoon, painting), a PACS-like domain shift",
        "glyphs": "pretraining: digits 0-9 in PIL's built-in font, random scale, tilt and colours",
        "stripes": "auxiliary: orientation of a stripe pattern (4 classes)",
        "dots": "auxiliary: number of dots, 1 to 5",
        "polygons": "auxiliary: number of polygon vertices, 3 to 8, filled or outlined",
    }


# ---------------------------------------------------------------- geometry


def _regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return radii[:, None] * _regular(2 * points)


def _cross(half_width: float = 0.34) -> np.ndarray:
    t = half_width
    return np.array(
        [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1), (-t, -1), (-t, -t), (-1, -t), (-1, t), (-t, t), (-t, 1)],
        dtype=float,
    )


# Unit-radius outlines, centred on the origin; a ring is a disk with a hole.
_SHAPE_CONTOURS: dict[str, list[Contour]] = {
    "circle": [(_regular(48, 0.9), False)],
    "square": [(_regular(4, 1.0, np.pi / 4), False)],
    "triangle": [(_regular(3, 1.05), False)],
    "cross": [(_cross(), False)],
    "star": [(_star(), False)],
    "ring": [(_regular(48, 1.0), False), (_regular(48, 0.55), True)],
}


def _place(
    contours: list[Contour], rng: np.random.Generator, size: int, radius: tuple[float, float]
) -> tuple[list[Contour], float]:
    """Random scale, squash, rotation and position that keep the shape inside the image."""
    r = rng.uniform(*radius) * size
    squash = rng.uniform(0.88, 1.12, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    margin = min(1.12 * r + 1, size / 2)
    centre = rng.uniform(margin, size - margin, size=2)
    placed = [((pts * squash) @ rot.T * r + centre, hole) for pts, hole in contours]
    return placed, r


def _wobble(points: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """A hand-drawn version of a closed contour: densified, with smooth random displacement."""
    nxt = np.roll(points, -1, axis=0)
    dense = np.concatenate(
        [np.linspace(a, b, max(2, int(np.linalg.norm(b - a))), endpoint=False) for a, b in zip(points, nxt)]
    )
    noise = rng.normal(0, amount, size=dense.shape)
    for _ in range(3):  # circular smoothing turns jitter into a wobble
        noise = (np.roll(noise, 1, axis=0) + noise + np.roll(noise, -1, axis=0)) / 3
    return dense + noise * np.sqrt(3)


def _masks(contours: list[Contour], size: int, line_width: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased fill and outline coverage in [0, 1] (line width in output pixels)."""
    big = (size * _SS, size * _SS)
    fill, line = Image.new("L", big), Image.new("L", big)
    draw_fill, draw_line = ImageDraw.Draw(fill), ImageDraw.Draw(line)
    width = max(1, round(line_width * _SS))
    for pts, hole in contours:
        scaled = pts * _SS
        draw_fill.polygon(scaled.ravel().tolist(), fill=0 if hole else 255)
        if line_width > 0:  # repeat two points so the closing corner is joined too
            closed = np.concatenate([scaled, scaled[:2]])
            draw_line.line(closed.ravel().tolist(), fill=255, width=width, joint="curve")
    return _downsample(fill, size), _downsample(line, size)


def _downsample(mask: Image.Image, size: int) -> np.ndarray:
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255


def _blur(alpha: np.ndarray, radius: float) -> np.ndarray:
    blurred = Image.fromarray((alpha * 255 + 0.5).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(blurred, dtype=np.float32) / 255


# ---------------------------------------------------------------- colour and texture


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _contrasting_value(rng: np.random.Generator, v: float, low: float = 0.25, high: float = 0.45) -> float:
    """A brightness far enough from ``v`` that a shape stays visible on any background."""
    step = rng.uniform(low, high)
    return v - step if v - step >= 0.15 or v + step > 1 else v + step


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bicubically upsampled."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.clip(np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC)), 0, 1)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def _waves(rng: np.random.Generator, size: int, angle: float, period: float, wobble: float) -> np.ndarray:
    """Parallel strokes in [0, 1] at ``angle``, bent by smooth noise so they look hand-made."""
    xs, ys = _grid(size)
    across = xs * np.sin(angle) + ys * np.cos(angle)
    bend = wobble * _smooth_noise(rng, size, 3)
    return 0.5 + 0.5 * np.sin(2 * np.pi * across / period + 2 * np.pi * bend + rng.uniform(0, 2 * np.pi))


def _composite(bg: np.ndarray, fg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return bg * (1 - alpha[..., None]) + fg * alpha[..., None]


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8))


def _two_tone_background(rng: np.random.Generator, size: int, hue: float, sat: float, val: float) -> np.ndarray:
    """A background blended between two nearby colours, so no two backgrounds are flat copies."""
    other = _hsv(hue + rng.uniform(-0.08, 0.08), sat * rng.uniform(0.7, 1.1), val * rng.uniform(0.75, 1.1))
    mix = _smooth_noise(rng, size, int(rng.integers(2, 5)))[..., None]
    return np.clip(_hsv(hue, sat, val) * (1 - mix) + other * mix, 0, 1)


# ---------------------------------------------------------------- the four target styles


_NATURAL_HUES = ((0.2, 0.4), (0.05, 0.12), (0.52, 0.62))  # foliage, earth, sky


def _photo(rng: np.random.Generator, contours: list[Contour], r: float, size: int) -> np.ndarray:
    """Shaded colour object with a soft shadow on a mottled natural background, sensor noise."""
    bg_hue = rng.uniform(*_NATURAL_HUES[rng.integers(len(_NATURAL_HUES))])
    bg_val = rng.uniform(0.3, 0.8)
    bg = _two_tone_background(rng, size, bg_hue, rng.uniform(0.25, 0.6), bg_val)
    bg *= 1 + 0.12 * (_smooth_noise(rng, size, size // 4) - 0.5)[..., None]  # foliage-like grain
    fill, _ = _masks(contours, size)
    shadow = np.roll(_blur(fill, 1.2), rng.integers(1, 3, size=2), axis=(0, 1))
    bg *= 1 - 0.45 * shadow[..., None]
    colour = _hsv(bg_hue + rng.uniform(0.25, 0.75), rng.uniform(0.45, 0.95), _contrasting_value(rng, bg_val))
    xs, ys = _grid(size)
    light = rng.uniform(0, 2 * np.pi)
    centre = np.mean(contours[0][0], axis=0)
    towards_light = ((xs - centre[0]) * np.cos(light) + (ys - centre[1]) * np.sin(light)) / r
    fg = colour * (1 + 0.35 * np.clip(towards_light, -1, 1))[..., None]
    image = _composite(bg, fg, fill)
    return image + rng.normal(0, 0.035, size=image.shape)


def _sketch(rng: np.random.Generator, contours: list[Contour], r: float, size: int) -> np.ndarray:
    """Thin, doubled, wobbly pencil outline on off-white paper; no fill, no colour."""
    paper = rng.uniform(0.9, 1.0) * np.array([1.0, rng.uniform(0.97, 1.0), rng.uniform(0.92, 1.0)])
    paper = paper * (1 - 0.04 * _smooth_noise(rng, size, size // 2))[..., None]
    strokes = [(_wobble(pts, rng, 0.35), hole) for pts, hole in contours for _ in range(2)]
    _, line = _masks(strokes, size, line_width=rng.uniform(0.7, 1.1))
    ink = np.full(3, rng.uniform(0.05, 0.3), dtype=np.float32)
    image = _composite(paper, ink, 0.9 * line)
    return image + rng.normal(0, 0.015, size=image.shape)


def _cartoon(rng: np.random.Generator, contours: list[Contour], r: float, size: int) -> np.ndarray:
    """Flat saturated fill with a thick black outline on a flat pastel background."""
    bg_hue = rng.uniform(0, 1)
    bg = _hsv(bg_hue, rng.uniform(0.2, 0.5), rng.uniform(0.85, 1.0))
    colour = _hsv(bg_hue + rng.uniform(0.25, 0.75), rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0))
    fill, line = _masks(contours, size, line_width=rng.uniform(1.8, 2.6))
    image = _composite(np.broadcast_to(bg, (size, size, 3)), colour, fill)
    return _composite(image, np.zeros(3, dtype=np.float32), line)


def _painting(rng: np.random.Generator, contours: list[Contour], r: float, size: int) -> np.ndarray:
    """Muted colours laid on in visible brush strokes over a woven canvas; soft edges."""
    bg_hue, bg_val = rng.uniform(0, 1), rng.uniform(0.45, 0.8)
    bg = _two_tone_background(rng, size, bg_hue, rng.uniform(0.15, 0.4), bg_val)
    xs, ys = _grid(size)
    weave = np.sin(np.pi * xs) * np.sin(np.pi * ys)
    canvas_strokes = _waves(rng, size, rng.uniform(0, np.pi), rng.uniform(3, 6), 1.0)
    bg *= (0.85 + 0.2 * canvas_strokes + 0.04 * weave)[..., None]
    colour = _hsv(bg_hue + rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.5), _contrasting_value(rng, bg_val))
    fill, _ = _masks(contours, size)
    fill = _blur(fill, 0.6)
    brush = _waves(rng, size, rng.uniform(0, np.pi), rng.uniform(2.5, 4.5), 1.5)
    fg = colour * (0.75 + 0.4 * brush)[..., None]
    return _composite(bg, fg, fill)


# Every style takes (rng, placed contours, shape radius in pixels, image size).
_STYLES: dict[str, Callable[[np.random.Generator, list[Contour], float, int], np.ndarray]] = {
    "photo": _photo,
    "sketch": _sketch,
    "cartoon": _cartoon,
    "painting": _painting,
}


# ---------------------------------------------------------------- the plain style of the other tasks


def _plain(rng: np.random.Generator, contours: list[Contour], size: int) -> np.ndarray:
    """Filled, outlined or both, on a noisy two-tone background: not one of the target's styles."""
    bg_hue, bg_val = rng.uniform(0, 1), rng.uniform(0.2, 0.9)
    bg = _two_tone_background(rng, size, bg_hue, rng.uniform(0, 0.7), bg_val)
    colour = _hsv(bg_hue + rng.uniform(0.2, 0.8), rng.uniform(0, 0.9), _contrasting_value(rng, bg_val))
    fill, line = _masks(contours, size, line_width=rng.uniform(1.0, 2.0))
    mode = rng.integers(3)  # 0: filled, 1: outlined, 2: filled with a contrasting outline
    image = _composite(bg, colour, line if mode == 1 else fill)
    if mode == 2:
        image = _composite(image, _hsv(0, 0, _contrasting_value(rng, float(colour.max()))), line)
    return image + rng.normal(0, rng.uniform(0, 0.05), size=image.shape)


# ---------------------------------------------------------------- datasets


def _rng(seed: int, task: str) -> np.random.Generator:
    """One independent stream per (seed, task), so the tasks of one seed are not correlated."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def _dataset(columns: dict[str, list], class_names: tuple[str, ...], **extra_features: Value) -> Dataset:
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(class_names)), **extra_features})
    return Dataset.from_dict(columns, features=features)


def target_dataset(
    per_class_per_domain: int = 40, size: int = 32, seed: int = 0, domains: tuple[str, ...] = DOMAINS
) -> Dataset:
    """The target task: ``SHAPES`` drawn in each of the ``domains`` styles, classes interleaved. A domain's
    images depend on the seed and its name only, so leaving a domain out changes none of the others."""
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; the target's domains are {list(DOMAINS)}")
    images, labels, domain_of_rows = [], [], []
    for domain in domains:
        rng = _rng(seed, f"shapes/{domain}")
        for _ in range(per_class_per_domain):
            for label, shape in enumerate(SHAPES):
                contours, r = _place(_SHAPE_CONTOURS[shape], rng, size, radius=(0.26, 0.4))
                images.append(_to_image(_STYLES[domain](rng, contours, r, size)))
                labels.append(label)
                domain_of_rows.append(domain)
    columns = {"image": images, "label": labels, "domain": domain_of_rows}
    return _dataset(columns, SHAPES, domain=Value("string"))


def pretrain_dataset(n: int = 2000, size: int = 32, seed: int = 0, photo_shapes: bool = False) -> Dataset:
    """A broad task for the base model: which digit is drawn (``n`` images, classes cycled). With
    ``photo_shapes`` the target's six shapes join it as photographs only, never in another style, as
    ImageNet holds photographs of PACS's objects; the shapes come from their own random stream, so no image
    is one of the target's."""
    classes = DIGITS + (SHAPES if photo_shapes else ())
    rng = _rng(seed, "glyphs")
    shapes_rng = _rng(seed, "glyphs/photo-shapes")
    big = size * _SS
    images, labels = [], []
    for i in range(n):
        label = i % len(classes)
        labels.append(label)
        if label >= len(DIGITS):
            contours, r = _place(_SHAPE_CONTOURS[classes[label]], shapes_rng, size, radius=(0.26, 0.4))
            images.append(_to_image(_photo(shapes_rng, contours, r, size)))
            continue
        mask = Image.new("L", (big, big))
        font = ImageFont.load_default(size=round(big * rng.uniform(0.55, 0.85)))
        centre = big / 2 + rng.uniform(-0.15, 0.15, size=2) * big
        ImageDraw.Draw(mask).text(tuple(centre), DIGITS[label], fill=255, font=font, anchor="mm")
        mask = mask.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR, center=tuple(centre))
        bg_hue, bg_val = rng.uniform(0, 1), rng.uniform(0.15, 0.9)
        bg = _two_tone_background(rng, size, bg_hue, rng.uniform(0, 0.8), bg_val)
        colour = _hsv(bg_hue + rng.uniform(0.2, 0.8), rng.uniform(0, 0.9), _contrasting_value(rng, bg_val))
        image = _composite(bg, colour, _downsample(mask, size))
        images.append(_to_image(image + rng.normal(0, rng.uniform(0, 0.05), size=image.shape)))
    return _dataset({"image": images, "label": labels}, classes)


def _stripes(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    angle = np.deg2rad(45 * label + rng.uniform(-6, 6))
    waves = _waves(rng, size, angle, rng.uniform(3.5, 8), rng.uniform(0, 0.15))
    if rng.random() < 0.5:  # hard-edged bars as well as soft sine stripes
        waves = (waves > rng.uniform(0.3, 0.7)).astype(np.float32)
    hue, val = rng.uniform(0, 1), rng.uniform(0.2, 0.9)
    dark = _hsv(hue, rng.uniform(0, 0.9), val)
    light = _hsv(hue + rng.uniform(-0.4, 0.4), rng.uniform(0, 0.9), _contrasting_value(rng, val))
    image = _composite(np.broadcast_to(dark, (size, size, 3)), light, waves)
    return image + rng.normal(0, rng.uniform(0, 0.06), size=image.shape)


def _dots(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """``label + 1`` disks that never touch, so the count is always readable."""
    disks: list[tuple[np.ndarray, float]] = []
    while len(disks) < label + 1:
        radius = rng.uniform(0.06, 0.11) * size
        centre = rng.uniform(radius + 1, size - radius - 1, size=2)
        if all(np.linalg.norm(centre - c) > radius + rc + 1.5 for c, rc in disks):
            disks.append((centre, radius))
    contours = [(c + rc * _regular(24), False) for c, rc in disks]
    return _plain(rng, contours, size)


def _polygon(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A convex polygon with ``label + 3`` vertices at slightly irregular angles."""
    n = label + 3
    angles = 2 * np.pi * (np.arange(n) + rng.uniform(-0.15, 0.15, size=n)) / n
    outline = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    contours, _ = _place([(outline, False)], rng, size, radius=(0.28, 0.4))
    return _plain(rng, contours, size)


_AUX_TASKS: dict[str, tuple[tuple[str, ...], Callable[[np.random.Generator, int, int], np.ndarray]]] = {
    "stripes": (STRIPE_ORIENTATIONS, _stripes),
    "dots": (DOT_COUNTS, _dots),
    "polygons": (POLYGONS, _polygon),
}


def aux_datasets(per_class: int = 60, size: int = 32, seed: int = 0) -> dict[str, Dataset]:
    """The auxiliary tasks, balanced, classes interleaved: generic features, no target images."""
    tasks = {}
    for name, (classes, draw) in _AUX_TASKS.items():
        rng = _rng(seed, name)
        labels = [label for _ in range(per_class) for label in range(len(classes))]
        images = [_to_image(draw(rng, label, size)) for label in labels]
        tasks[name] = _dataset({"image": images, "label": labels}, classes)
    return tasks
