"""The four phantom anatomies, built from `render`'s shapes in an upright canonical frame.

Each builder takes a random generator (the subject's shape variation) and returns the parts and
the landmarks, every landmark a geometric feature of the drawn parts: a bone tip, a joint gap, a
concave corner where two parts meet, the extremal point of an epiphysis, a chin or a lung.
`subject()` then applies a random pose to both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medsapiens.shards.phantoms.render import (
    Capsule,
    Cut,
    Ellipse,
    Part,
    Pose,
    Ring,
    first_inside,
    line_ellipse_crossings,
    pt,
    unit,
)


@dataclass(frozen=True)
class Anatomy:
    size: tuple[int, int]  # (W, H) of the image
    max_angle_deg: float
    build: object  # rng -> (parts, landmarks)


class Jitter:
    """Per-subject shape variation: points moved and lengths stretched by small random amounts."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def p(self, x: float, y: float, sd: float = 4.0):
        return np.array([x, y]) + self.rng.normal(0.0, sd, 2)

    def f(self, spread: float = 0.08) -> float:
        return float(1.0 + self.rng.uniform(-spread, spread))

    def angle(self, degrees: float) -> float:
        return math.radians(self.rng.normal(0.0, degrees))


def bone(shape, level: float = 1.0) -> Part:
    return Part(shape, "bone", level)


def tissue(shape, level: float = 1.0) -> Part:
    return Part(shape, "tissue", level)


def chain(start, direction, lengths, radii, gap):
    """Bones laid end to end along `direction`, `gap` pixels of joint space between rounded ends."""
    bones, cursor = [], np.asarray(start, dtype=np.float64)
    for length, r in zip(lengths, radii, strict=True):
        a = cursor + r * direction
        b = a + length * direction
        bones.append(Capsule(a, b, r))
        cursor = b + (r + gap) * direction
    return bones


def joint(first: Capsule, second: Capsule):
    """The middle of the joint space between two bones of a chain."""
    return (first.tip("b") + second.tip("a")) / 2


# ---------------------------------------------------------------- head (ISBI 2015, 19 landmarks)
def head(rng):
    j = Jitter(rng)
    vault = Ellipse(j.p(220, 232, 5), (180 * j.f(0.05), 165 * j.f(0.05)), j.angle(3))
    mand = j.f(0.08)  # mandible size
    nasion = vault.point(math.radians(12) + j.angle(2), offset=7)
    nasal = Capsule(nasion + pt(4, 4), nasion + pt(30, 52) * j.f(), 5)
    sella_cup = Ellipse(j.p(192, 282, 4), (9 * j.f(), 8 * j.f()), 0.0)
    cranial_base = Capsule(j.p(140, 306, 4), nasion + pt(-6, 12), 12)
    clivus = Capsule(cranial_base.a, j.p(150, 390, 5), 11)
    orbit = Ring(Ellipse(j.p(345, 300, 4), (30 * j.f(), 26 * j.f()), j.angle(5)), 5)
    ear = Ellipse(j.p(118, 335, 4), (11 * j.f(), 9 * j.f()), j.angle(10))
    palate = Capsule(j.p(240, 374, 4), j.p(410, 362, 3), 7)
    alveolus_up = Capsule(j.p(386, 382, 3), j.p(398, 428, 3), 11)
    incisor_up = Capsule(j.p(394, 405, 2), j.p(416, 456, 3), 6)
    condyle = j.p(185, 345, 4)
    angle_pt = condyle + pt(18, 125) * mand
    chin = Ellipse(angle_pt + pt(176, 50) * mand, (26 * j.f(), 34 * j.f()), math.radians(-15) + j.angle(4))
    ramus, body = Capsule(condyle, angle_pt, 15), Capsule(angle_pt, chin.c + pt(-10, -2), 15)
    alveolus_low = Capsule(chin.c + pt(6, -52) * mand, chin.c + pt(-2, -20), 10)
    incisor_low = Capsule(alveolus_low.a + pt(4, 30), alveolus_low.a + pt(18, -12) * j.f(), 5.5)
    nose = Capsule(nasal.b + pt(-10, -30), nasal.b + pt(30, 36) * j.f(), 15)
    lip_up = Ellipse(j.p(438, 410, 3), (17 * j.f(), 28 * j.f()), 0.0)
    lip_low = Ellipse(lip_up.c + pt(-4, 60) * j.f(), (16 * j.f(), 25 * j.f()), 0.0)
    soft_chin = Ellipse(chin.c + pt(28, 18), (44 * j.f(), 48 * j.f()), 0.0)
    vertebrae = [Capsule(j.p(80 + 6 * i, 420 + 46 * i, 3), j.p(140 + 6 * i, 428 + 46 * i, 3), 15) for i in range(4)]
    molars = [Ellipse(palate.a + pt(30 + 32 * i, 22), (12, 10), 0.0) for i in range(4)]
    parts = [
        tissue(Ellipse(vault.c + pt(10, 40), (215, 245))), tissue(Capsule(pt(130, 560), pt(240, 610), 95)),
        tissue(nose), tissue(lip_up), tissue(lip_low), tissue(soft_chin),
        tissue(Capsule(pt(300, 380), pt(400, 500), 70)),
        bone(Ring(vault, 14)), bone(nasal), bone(cranial_base), bone(clivus), bone(Cut(Ring(sella_cup, 4), sella_cup.c + pt(0, -3), pt(0, -1)), 1.1),  # a cup open at the top
        Part(sella_cup, "hole"), bone(orbit, 0.8), bone(Ring(ear, 4)), Part(ear, "hole"), Part(ear, "air"),
        bone(palate), bone(alveolus_up), bone(incisor_up, 1.3), bone(ramus), bone(body), bone(chin),
        bone(alveolus_low), bone(incisor_low, 1.3), *map(bone, vertebrae), *(bone(m, 1.2) for m in molars),
    ]
    up = pt(0, -1)
    landmarks = [
        sella_cup.c,                                                   # sella: centre of the cup
        nasion,                                                        # nasion: vault meets nasal bone
        orbit.ellipse.extremal(pt(0, 1)),                              # orbitale: lowest point of the orbit rim
        Ellipse(ear.c, (ear.axes[0] + 2, ear.axes[1] + 2), ear.angle).extremal(up),  # porion: top of the ear canal rim
        first_inside(alveolus_up.edge(0.6, -1), alveolus_up.edge(0.6, -1) + pt(0, -60), palate),  # A point
        first_inside(alveolus_low.edge(0.2, 1), alveolus_low.edge(0.2, 1) + pt(0, 60), chin),     # B point
        chin.extremal(pt(1, 0)),                                       # pogonion
        chin.extremal(pt(0, 1)),                                       # menton
        chin.extremal(unit(pt(1, 1))),                                 # gnathion
        angle_pt - 15 * unit(ramus.axis * -1 + body.axis),              # gonion: outer point of the jaw angle
        incisor_low.tip("b"),                                          # lower incisor tip
        incisor_up.tip("b"),                                           # upper incisor tip
        lip_up.extremal(pt(1, 0)),                                     # upper lip
        lip_low.extremal(pt(1, 0)),                                    # lower lip
        first_inside(lip_up.extremal(up), lip_up.extremal(up) + pt(0, -80), nose),  # subnasale
        soft_chin.extremal(pt(1, 0)),                                  # soft tissue pogonion
        palate.tip("a"),                                               # posterior nasal spine
        palate.tip("b"),                                               # anterior nasal spine
        ramus.tip("a"),                                                # articulare (condyle top)
    ]
    return parts, landmarks


# ---------------------------------------------------------------- hand (Payer's 37 landmarks)
def hand(rng):
    j = Jitter(rng)
    radius_end = Ellipse(j.p(232, 432, 3), (33 * j.f(), 12 * j.f()), j.angle(4))
    ulna_end = Ellipse(j.p(163, 436, 3), (21 * j.f(), 11 * j.f()), j.angle(4))
    radius = Capsule(radius_end.c + pt(0, 130), radius_end.c + pt(0, 6), 20)
    ulna = Capsule(ulna_end.c + pt(-2, 130), ulna_end.c + pt(0, 6), 13)
    carpal_centres = [j.p(x, 404, 2) for x in (170, 198, 226, 254)] + [j.p(x, 376, 2) for x in (176, 204, 232, 258)]
    carpals = [Ellipse(c, (8 * j.f(), 11 * j.f()), j.angle(8)) for c in carpal_centres]
    pisiform = Ellipse(j.p(146, 398, 2), (6, 8), j.angle(8))
    carpals = carpals + [pisiform]
    fingers, finger_parts = [], []
    spread = j.f(0.3)
    for base_x, angle_deg, lengths in (
        (244, 7, (92, 58, 36, 25)), (214, 0, (98, 64, 41, 27)), (186, -7, (92, 60, 39, 26)), (160, -15, (84, 50, 30, 23)),
    ):
        direction = np.array([math.sin(math.radians(angle_deg * spread)), -math.cos(math.radians(angle_deg * spread))])
        direction = unit(direction + rng.normal(0, 0.03, 2))
        lengths = [length * j.f(0.06) for length in lengths]
        fingers.append(chain(j.p(base_x, 358, 2), direction, lengths, (9, 8, 7, 6), 4.5 * j.f(0.2)))
    thumb_dir = unit(np.array([math.sin(math.radians(42)), -math.cos(math.radians(42))]) + rng.normal(0, 0.06, 2))
    thumb = chain(j.p(268, 372, 2), thumb_dir, [length * j.f(0.06) for length in (58, 44, 31)], (10, 8, 7), 4.5)
    for digit in fingers + [thumb]:
        finger_parts.append(tissue(Capsule(digit[0].a, digit[-1].b, digit[0].r + 9)))
        finger_parts += [bone(b) for b in digit]
    parts = [
        tissue(Capsule(pt(200, 600), pt(200, 420), 78)), tissue(Ellipse(pt(210, 360), (82, 70))),
        *finger_parts, bone(radius), bone(ulna), bone(radius_end), bone(ulna_end), *(bone(c, 0.9) for c in carpals),
    ]
    wrist = [
        radius_end.extremal(pt(-1, 0)),  # 0 radius, ulnar-side tip
        radius_end.extremal(pt(1, 0)),   # 1 radial wrist extremal point
        ulna_end.extremal(pt(1, 0)),     # 2 ulna, radial-side tip
        carpals[0].extremal(pt(0, -1)),  # 3, 4 carpal tips
        carpals[1].extremal(pt(0, -1)),
        ulna_end.extremal(pt(-1, 0)),    # 5 ulnar wrist extremal point
    ]
    carpal_tips = [c.extremal(pt(0, -1)) for c in carpals[2:]]
    thumb_points = [thumb[0].tip("a"), joint(thumb[0], thumb[1]), joint(thumb[1], thumb[2]), thumb[2].tip("b")]
    finger_points = [p for f in fingers for p in (f[0].tip("a"), joint(f[0], f[1]), joint(f[1], f[2]), joint(f[2], f[3]), f[3].tip("b"))]
    return parts, wrist + carpal_tips + thumb_points + finger_points


# ---------------------------------------------------------------- chest (GU2Net's 6 landmarks)
def lung(j: Jitter, centre_x: float, side: float):
    """One lung: an ellipse whose base is cut by a sloping diaphragm line; returns (shape, apex, lateral, medial)."""
    ellipse = Ellipse(j.p(centre_x, 250, 4), (76 * j.f(0.06), 150 * j.f(0.06)), side * math.radians(6) + j.angle(2))
    base = ellipse.c + pt(0, 95 * j.f(0.06))
    slope = unit(pt(1, side * 0.18 + j.rng.normal(0, 0.05)))
    crossings = line_ellipse_crossings(ellipse, base, slope)
    lateral, medial = sorted(crossings, key=lambda p: -side * (p[0] - 256))
    return Cut(ellipse, base, pt(-slope[1], slope[0])), ellipse.extremal(pt(0, -1)), lateral, medial


def chest(rng):
    j = Jitter(rng)
    right, right_apex, right_lat, right_med = lung(j, 172, -1)
    left, left_apex, left_lat, left_med = lung(j, 340, 1)
    ribs = []
    for side in (-1, 1):
        for i in range(9):
            y = 118 + 33 * i + rng.normal(0, 2)
            span = 140 + 6 * min(i, 4)
            arc = [pt(256 + side * (22 + span * t), y - 30 * t + 58 * t * t + 4 * i * t) for t in (0.0, 0.35, 0.7, 1.0)]
            ribs += [Capsule(p, q, 4) for p, q in zip(arc, arc[1:], strict=False)]
    clavicles = [Capsule(j.p(256 + s * 22, 104, 3), j.p(256 + s * 150, 86, 4), 8) for s in (-1, 1)]
    spine = [Ellipse(pt(256 + rng.normal(0, 1.5), 70 + 27 * i), (17, 10), j.angle(2)) for i in range(17)]
    parts = [
        tissue(Ellipse(j.p(256, 300, 4), (232 * j.f(0.04), 245))), tissue(Capsule(pt(200, 60), pt(312, 60), 70)),
        tissue(Ellipse(j.p(268, 345, 4), (70, 88)), 1.3), Part(right, "air"), Part(left, "air"),
        *(bone(r, 0.5) for r in ribs), *(bone(c) for c in clavicles), *(bone(v, 0.9) for v in spine),
    ]
    return parts, [right_apex, left_apex, right_lat, left_lat, right_med, left_med]


# ---------------------------------------------------------------- leg (BMPLE, 13 landmarks per leg)
def one_leg(j: Jitter, side: float, femur_len: float, tibia_len: float):
    """A leg on one side of the midline x = 130 (side +1: image right, the patient's left)."""
    x = lambda dx: 130 + side * dx  # noqa: E731 - mirrors every x of the leg
    head = Ellipse(j.p(x(52), 74, 2), (16 * j.f(0.05),) * 2, 0.0)
    neck = Capsule(head.c, j.p(x(72), 98, 2), 9)
    trochanter = Ellipse(j.p(x(86), 96, 2), (10, 15 * j.f()), side * math.radians(10))
    knee = pt(x(58), 98 + femur_len) + j.rng.normal(0, 2, 2)
    shaft = Capsule(neck.b, knee, 11)
    lesser = Capsule(neck.b + pt(-side * 4, 26), neck.b + pt(-side * 20, 36), 4)
    medial_condyle = Ellipse(knee + pt(-side * 12, 8), (13 * j.f(0.06), 11), 0.0)
    lateral_condyle = Ellipse(knee + pt(side * 12, 8), (12 * j.f(0.06), 11), 0.0)
    plateau = Capsule(knee + pt(-side * 20, 30), knee + pt(side * 20, 30), 6)
    ankle = pt(x(56), knee[1] + 30 + tibia_len) + j.rng.normal(0, 2, 2)
    tibia = Capsule(knee + pt(0, 34), ankle, 10)
    fibula_head = Ellipse(knee + pt(side * 27, 42), (7, 9 * j.f()), 0.0)
    fibula = Capsule(fibula_head.c, ankle + pt(side * 22, 10), 4.5)
    medial_malleolus = Capsule(ankle + pt(-side * 6, -4), ankle + pt(-side * 10, 14), 5)
    talus = Ellipse(ankle + pt(side * 4, 24), (19 * j.f(0.06), 9), 0.0)
    parts = [
        tissue(Capsule(pt(x(60), 90), knee, 44)), tissue(Capsule(knee, ankle + pt(0, 20), 32)),
        bone(head), bone(neck), bone(trochanter), bone(shaft), bone(lesser), bone(medial_condyle),
        bone(lateral_condyle), bone(plateau), bone(tibia), bone(fibula_head), bone(fibula), bone(medial_malleolus),
        bone(talus),
    ]
    up, down, outward = pt(0, -1), pt(0, 1), pt(side, 0)
    landmarks = [
        head.extremal(up), head.extremal(-outward), trochanter.extremal(up), lesser.tip("b"),
        medial_condyle.extremal(down), lateral_condyle.extremal(down), plateau.tip("a"), plateau.tip("b"),
        fibula_head.extremal(up), medial_malleolus.tip("b"), fibula.tip("b"), talus.extremal(-outward),
        talus.extremal(outward),
    ]
    return parts, landmarks


def leg(rng):
    j = Jitter(rng)
    femur, tibia = 275 * j.f(0.06), 290 * j.f(0.06)
    pelvis = [tissue(Ellipse(pt(130, 50), (128, 70))), bone(Ring(Ellipse(pt(130, 30), (95, 50)), 14), 0.8)]
    left_parts, left = one_leg(j, +1, femur * j.f(0.02), tibia * j.f(0.02))
    right_parts, right = one_leg(j, -1, femur * j.f(0.02), tibia * j.f(0.02))
    return pelvis + left_parts + right_parts, left + right


ANATOMIES = {
    "head": Anatomy((480, 600), 15.0, head),
    "hand": Anatomy((400, 480), 15.0, hand),
    "chest": Anatomy((512, 512), 10.0, chest),
    "leg": Anatomy((260, 780), 3.0, leg),
}
EDGE_MARGIN = 6.0


def subject(name: str, rng: np.random.Generator):
    """(parts, landmarks as a (K, 2) array) of one random subject in a random pose inside the image."""
    anatomy = ANATOMIES[name]
    parts, landmarks = anatomy.build(rng)
    w, h = anatomy.size
    while True:
        pose = Pose(
            angle=math.radians(rng.uniform(-anatomy.max_angle_deg, anatomy.max_angle_deg)),
            scale=rng.uniform(0.87, 1.13) if name != "leg" else rng.uniform(0.93, 1.02),
            shift=tuple(rng.normal(0, 0.04, 2) * (w, h)),
            center=(w / 2, h / 2),
        )
        points = np.array([pose(p) for p in landmarks])
        if (points >= EDGE_MARGIN).all() and (points[:, 0] <= w - 1 - EDGE_MARGIN).all() \
                and (points[:, 1] <= h - 1 - EDGE_MARGIN).all():
            return [p.moved(pose) for p in parts], points
