"""The phantoms' shared "physics": a small vocabulary of shapes and one X-ray-like image formation.

Shapes are signed distance fields (negative inside) in image pixels: capsules (long bones,
phalanges, teeth), ellipses (epiphyses, carpals, chins), rings (skull vault, orbits) and
half-plane cuts (lung bases). A `Part` puts a shape on one layer:

  tissue  soft, blurred edges, combined by union (max)
  bone    bright fill with a brighter cortical rim; overlapping bones add up, as in a radiograph
  air     removes tissue (lungs, ear canal)           hole  removes bone (sella turcica)

Every set renders through `render`, so they share edges, rims, textures, contrast and noise:
what a network learns about "the tip of a bright rounded bar" on one set holds on another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

Point = np.ndarray


def pt(x: float, y: float) -> Point:
    return np.array([x, y], dtype=np.float64)


def unit(v: Point) -> Point:
    return v / np.linalg.norm(v)


def rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


@dataclass(frozen=True)
class Pose:
    """A similarity transform about `center`: rotate by `angle` (radians), scale, then shift."""

    angle: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    center: tuple[float, float] = (0.0, 0.0)

    def __call__(self, p: Point) -> Point:
        c = np.asarray(self.center)
        return c + np.asarray(self.shift) + self.scale * rotation(self.angle) @ (np.asarray(p, dtype=np.float64) - c)

    def direction(self, v: Point) -> Point:
        return rotation(self.angle) @ np.asarray(v, dtype=np.float64)


@dataclass(frozen=True)
class Capsule:
    """A bar from a to b with rounded ends of radius r."""

    a: Point
    b: Point
    r: float

    @property
    def axis(self) -> Point:
        return unit(self.b - self.a)

    def tip(self, end: str = "b") -> Point:
        """The extremal point of the rounded end `a` or `b` along the bar's axis."""
        return self.b + self.r * self.axis if end == "b" else self.a - self.r * self.axis

    def edge(self, t: float, side: float) -> Point:
        """A point on the straight edge, t in [0, 1] from a to b, side +1 left of the axis, -1 right."""
        normal = np.array([-self.axis[1], self.axis[0]])
        return self.a + t * (self.b - self.a) + side * self.r * normal

    def sdf(self, x, y):
        ab = self.b - self.a
        t = np.clip(((x - self.a[0]) * ab[0] + (y - self.a[1]) * ab[1]) / (ab @ ab), 0.0, 1.0)
        return np.hypot(x - (self.a[0] + t * ab[0]), y - (self.a[1] + t * ab[1])) - self.r

    def bounds(self):
        lo, hi = np.minimum(self.a, self.b) - self.r, np.maximum(self.a, self.b) + self.r
        return lo, hi

    @property
    def thickness(self) -> float:
        return self.r

    def moved(self, pose: Pose) -> "Capsule":
        return Capsule(pose(self.a), pose(self.b), self.r * pose.scale)


@dataclass(frozen=True)
class Ellipse:
    c: Point
    axes: tuple[float, float]
    angle: float = 0.0

    def extremal(self, direction) -> Point:
        """The contour point farthest along `direction` (a tip where the curvature is high)."""
        a, b = self.axes
        local = rotation(self.angle).T @ np.asarray(direction, dtype=np.float64)
        phi = math.atan2(b * local[1], a * local[0])
        return self.point(phi)

    def point(self, phi: float, offset: float = 0.0) -> Point:
        a, b = self.axes
        return self.c + rotation(self.angle) @ np.array([(a + offset) * math.cos(phi), (b + offset) * math.sin(phi)])

    def local(self, x, y):
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.c[0], y - self.c[1]
        return dx * c + dy * s, -dx * s + dy * c

    def sdf(self, x, y):
        a, b = self.axes
        u, v = self.local(x, y)
        k = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
        return np.where(grad > 1e-6, k * (k - 1) / np.maximum(grad, 1e-6), -min(a, b))

    def bounds(self):
        a, b = self.axes
        c, s = math.cos(self.angle), math.sin(self.angle)
        half = np.array([math.hypot(a * c, b * s), math.hypot(a * s, b * c)])
        return self.c - half, self.c + half

    @property
    def thickness(self) -> float:
        return min(self.axes)

    def moved(self, pose: Pose) -> "Ellipse":
        return Ellipse(pose(self.c), (self.axes[0] * pose.scale, self.axes[1] * pose.scale), self.angle + pose.angle)


@dataclass(frozen=True)
class Ring:
    """A band of width `width` centred on an ellipse's contour (skull vault, orbit rim)."""

    ellipse: Ellipse
    width: float

    def sdf(self, x, y):
        return np.abs(self.ellipse.sdf(x, y)) - self.width / 2

    def bounds(self):
        lo, hi = self.ellipse.bounds()
        return lo - self.width, hi + self.width

    @property
    def thickness(self) -> float:
        return self.width / 2

    def moved(self, pose: Pose) -> "Ring":
        return Ring(self.ellipse.moved(pose), self.width * pose.scale)


@dataclass(frozen=True)
class Cut:
    """`shape` with the half-plane on the `normal` side of `origin` removed."""

    shape: object
    origin: Point
    normal: Point

    def sdf(self, x, y):
        n = unit(self.normal)
        return np.maximum(self.shape.sdf(x, y), (x - self.origin[0]) * n[0] + (y - self.origin[1]) * n[1])

    def bounds(self):
        return self.shape.bounds()

    @property
    def thickness(self) -> float:
        return self.shape.thickness

    def moved(self, pose: Pose) -> "Cut":
        return Cut(self.shape.moved(pose), pose(self.origin), pose.direction(self.normal))


def line_ellipse_crossings(ellipse: Ellipse, origin: Point, direction: Point) -> list[Point]:
    """Where the line origin + t * direction crosses the ellipse's contour (0 or 2 points)."""
    a, b = ellipse.axes
    r = rotation(ellipse.angle).T
    p, d = r @ (origin - ellipse.c), r @ direction
    qa = (d[0] / a) ** 2 + (d[1] / b) ** 2
    qb = 2 * (p[0] * d[0] / a**2 + p[1] * d[1] / b**2)
    qc = (p[0] / a) ** 2 + (p[1] / b) ** 2 - 1
    disc = qb * qb - 4 * qa * qc
    if disc < 0:
        return []
    return [origin + t * direction for t in sorted(((-qb - math.sqrt(disc)) / (2 * qa), (-qb + math.sqrt(disc)) / (2 * qa)))]


def first_inside(start: Point, end: Point, shape, steps: int = 400) -> Point:
    """Walking from start to end, the first point inside `shape` (a concave corner where two parts meet)."""
    t = np.linspace(0.0, 1.0, steps)
    xs, ys = start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])
    inside = np.nonzero(shape.sdf(xs, ys) <= 0)[0]
    i = inside[0] if len(inside) else steps - 1
    return pt(xs[i], ys[i])


KINDS = ("tissue", "bone", "air", "hole")


@dataclass(frozen=True)
class Part:
    shape: object
    kind: str = "bone"
    level: float = 1.0

    def moved(self, pose: Pose) -> "Part":
        return replace(self, shape=self.shape.moved(pose))


@dataclass(frozen=True)
class Style:
    """Per-image rendering randomness: exposure, contrast, gamma, blur, noise, texture."""

    mu: float
    background: float
    gamma: float
    blur: float
    noise: float
    texture: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Style":
        return cls(mu=rng.uniform(1.2, 1.9), background=rng.uniform(0.02, 0.09), gamma=rng.uniform(0.75, 1.35),
                   blur=rng.uniform(0.5, 1.3), noise=rng.uniform(0.008, 0.03), texture=rng.uniform(0.6, 1.4))


TISSUE_EDGE = 5.0
MARGIN = {"tissue": 2 * TISSUE_EDGE, "bone": 2.0, "air": 2.0, "hole": 2.0}


def profile(kind: str, d: np.ndarray, thickness: float) -> np.ndarray:
    """Layer value from signed distance: soft tissue ramps, bone fill plus a cortical rim."""
    if kind == "tissue":
        s = np.clip(0.5 - d / (2 * TISSUE_EDGE), 0.0, 1.0)
        return s * s * (3 - 2 * s)
    inside = np.clip(0.5 - d, 0.0, 1.0)
    if kind != "bone":
        return inside
    rim = float(np.clip(0.3 * thickness, 1.2, 3.5))
    return inside * (0.45 + 0.75 * np.exp(-(((d + rim) / rim) ** 2)))


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-ish noise smooth over `cell` pixels (bicubic upsampling of a coarse grid)."""
    w, h = size
    coarse = rng.standard_normal((h // cell + 3, w // cell + 3)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.Resampling.BICUBIC))


def paint_layers(parts, size: tuple[int, int]) -> dict[str, np.ndarray]:
    w, h = size
    layers = {kind: np.zeros((h, w), np.float32) for kind in KINDS}
    for part in parts:
        lo, hi = part.shape.bounds()
        margin = MARGIN[part.kind]
        x0, y0 = (max(0, int(math.floor(v - margin))) for v in lo)
        x1, y1 = min(w, int(math.ceil(hi[0] + margin)) + 1), min(h, int(math.ceil(hi[1] + margin)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1, dtype=np.float32)[None, :]
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        value = part.level * profile(part.kind, part.shape.sdf(xs, ys), part.shape.thickness)
        target = layers[part.kind][y0:y1, x0:x1]
        if part.kind == "bone":
            target += value
        else:
            np.maximum(target, value, out=target)
    return layers


def render(parts, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An 8-bit radiograph of the parts: attenuation 1 - exp(-mu * density), textured, blurred, noisy."""
    style = Style.sample(rng)
    layers = paint_layers(parts, size)
    tissue = layers["tissue"] * (1 - 0.9 * layers["air"]) * (1 + 0.08 * style.texture * smooth_noise(rng, size, 40))
    bone = layers["bone"] * (1 - layers["hole"]) * (1 + 0.12 * style.texture * smooth_noise(rng, size, 6))
    density = np.clip(0.42 * tissue + 0.8 * bone, 0.0, None)
    image = style.background + (1 - style.background) * (1 - np.exp(np.float32(-style.mu) * density))
    image = image ** np.float32(style.gamma)
    grey = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(style.blur))
    noise = rng.standard_normal((size[1], size[0]), dtype=np.float32) * np.float32(255 * style.noise)
    return np.clip(np.rint(np.asarray(grey, dtype=np.float32) + noise), 0, 255).astype(np.uint8)
