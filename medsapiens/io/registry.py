"""The landmark-set registry: what every stage needs to know about a dataset's landmarks.

A `LandmarkSet` carries the landmark names (hence K), the left/right swap pairs used by flip
augmentation and flip test, the evaluation protocol (unit, spacing or normalisation rule, SDR
radii). Shards copy the entries they use into their manifest, bundles into their config, so later
stages read them from data, never from this file.
"""
from __future__ import annotations

import reprlib
import sys
from dataclasses import asdict, dataclass, field, fields

from medsapiens.io.record import is_finite_number, is_whole

ISBI_NAMES = (
    "sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton",
    "gnathion", "gonion", "lower_incisal_incision", "upper_incisal_incision", "upper_lip",
    "lower_lip", "subnasale", "soft_tissue_pogonion", "posterior_nasal_spine",
    "anterior_nasal_spine", "articulare",
)
AARIZ_NAMES = (
    "a_point", "anterior_nasal_spine", "b_point", "menton", "nasion", "orbitale", "pogonion",
    "posterior_nasal_spine", "pronasale", "ramus", "sella", "articulare", "condylion", "gnathion",
    "gonion", "porion", "lower_2nd_pm_cusp_tip", "lower_incisor_tip", "lower_molar_cusp_tip",
    "upper_2nd_pm_cusp_tip", "upper_incisor_apex", "upper_incisor_tip", "upper_molar_cusp_tip",
    "lower_incisor_apex", "labrale_inferius", "labrale_superius", "soft_tissue_nasion",
    "soft_tissue_pogonion", "subnasale",
)


REQUIRED_KEYS = ("id", "names", "unit", "sdr_radii")  # of a landmark set's JSON


@dataclass(frozen=True)
class LandmarkSet:
    """One dataset's landmarks and evaluation protocol.

    flip_pairs: None when the left/right correspondence is unknown (flip augmentation and flip
    test are then off); an empty tuple when a mirrored image keeps every label (lateral
    cephalograms, a single hand); otherwise the (i, j) index pairs to swap.
    normalization: None (errors from `spacing_mm`, or pixels when there is none), or a rule:
    {"rule": "wrist_width", "mm": 50.0, "landmarks": [1, 5]} or {"rule": "frame", "size": [512, 512]}.
    """

    id: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...] | None
    unit: str
    sdr_radii: tuple[float, ...]
    native_spacing_mm: float | None = None
    normalization: dict | None = field(default=None, hash=False)
    description: str = ""

    @property
    def num_landmarks(self) -> int:
        return len(self.names)

    @property
    def can_flip(self) -> bool:
        return self.flip_pairs is not None

    @property
    def needs_spacing(self) -> bool:
        """Its errors are each image's own pixel spacing times pixels: an image without one cannot be scored."""
        return self.normalization is None and self.unit != "px" and not self.native_spacing_mm

    def spacing_or_native(self, spacing):
        """`spacing` (x, y) mm/px when known, else the set's fixed native spacing, else None."""
        if spacing is not None:
            return spacing
        return (self.native_spacing_mm,) * 2 if self.native_spacing_mm else None

    def flip_permutation(self) -> list[int]:
        """Channel order of the mirrored image: index i of the result is the landmark that lands on i."""
        if self.flip_pairs is None:
            raise ValueError(f"landmark set {self.id!r} has unknown left/right pairs: flipping is off")
        perm = list(range(self.num_landmarks))
        for i, j in self.flip_pairs:
            perm[i], perm[j] = j, i
        return perm

    def to_dict(self) -> dict:
        d = asdict(self)
        d["names"] = list(self.names)
        d["sdr_radii"] = list(self.sdr_radii)
        d["flip_pairs"] = None if self.flip_pairs is None else [list(p) for p in self.flip_pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LandmarkSet":
        """From a manifest's or a bundle's JSON: a field of the wrong type is a ValueError naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"a landmark set must be an object, got {reprlib.repr(d)}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"landmark set {d.get('id')!r}: unknown key(s) {unknown}")
        missing = [key for key in REQUIRED_KEYS if key not in d]
        if missing:
            raise ValueError(f"landmark set {d.get('id')!r}: missing key(s) {missing}")
        pairs = d.get("flip_pairs")
        if not (pairs is None or isinstance(pairs, list) and all(_is_pair(p) for p in pairs)):
            raise ValueError(f"landmark set {d.get('id')!r}: flip_pairs must be null or a list of [i, j] index pairs")
        for key in ("names", "sdr_radii"):
            if not isinstance(d[key], list):
                raise ValueError(f"landmark set {d.get('id')!r}: {key} must be a list, got {d[key]!r}")
        return cls(
            id=d["id"],
            names=tuple(d["names"]),
            flip_pairs=None if pairs is None else tuple((i, j) for i, j in pairs),
            unit=d["unit"],
            sdr_radii=tuple(d["sdr_radii"]),
            native_spacing_mm=d.get("native_spacing_mm"),
            normalization=d.get("normalization"),
            description=d.get("description", ""),
        )

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id or "." in self.id or "_" in self.id:
            raise ValueError(f"landmark set id {self.id!r} must be non-empty, without '.' or '_'")
        where = f"landmark set {self.id!r}"
        if not self.names or not all(isinstance(n, str) and n for n in self.names):
            raise ValueError(f"{where}: names must be one non-empty string per landmark")
        if self.unit not in ("mm", "px"):
            raise ValueError(f"{where}: unit must be 'mm' or 'px', got {self.unit!r}")
        if not self.sdr_radii or not all(_is_positive(r) for r in self.sdr_radii):
            raise ValueError(f"{where}: sdr_radii must be positive numbers, got {list(self.sdr_radii)}")
        if not (self.native_spacing_mm is None or _is_positive(self.native_spacing_mm)):
            raise ValueError(f"{where}: native_spacing_mm must be null or a positive number, got {self.native_spacing_mm!r}")
        if self.normalization is not None and not _is_normalization(self.normalization, len(self.names)):
            raise ValueError(f"{where}: normalization must be null, {{\"rule\": \"wrist_width\", \"mm\": positive, "
                             f"\"landmarks\": [i, j] in 0..{len(self.names) - 1}}} or {{\"rule\": \"frame\", \"size\": [w, h] "
                             f"positive}}, got {reprlib.repr(self.normalization)}")
        if not isinstance(self.description, str):
            raise ValueError(f"{where}: description must be a string")
        for pair in self.flip_pairs or ():
            if not all(0 <= i < len(self.names) for i in pair):
                raise ValueError(f"{where}: flip pair {pair} outside 0..{len(self.names) - 1}")
        twice = landmark_in_two_flip_pairs(self.flip_pairs or ())
        if twice is not None:
            raise ValueError(f"{where}: flip pairs {[list(p) for p in self.flip_pairs]} put landmark {twice} in two "
                             "pairs: the mirror would not be a permutation of the landmarks")


def landmark_in_two_flip_pairs(pairs) -> int | None:
    """A landmark two different pairs name, or None ([i, j] and [j, i] are one pair; [i, i], a midline landmark)."""
    paired = [i for pair in {frozenset(p) for p in pairs} for i in pair]
    return next((i for i in paired if paired.count(i) > 1), None)


def _is_normalization(rule, k: int) -> bool:
    """One of the two rules the metrics know, with its fields (medsapiens.evaluation.metrics.Protocol)."""
    if not isinstance(rule, dict):
        return False
    if rule.get("rule") == "wrist_width" and set(rule) == {"rule", "mm", "landmarks"}:
        pair = rule["landmarks"]
        return _is_positive(rule["mm"]) and _is_pair(pair) and all(0 <= i < k for i in pair) and pair[0] != pair[1]
    if rule.get("rule") == "frame" and set(rule) == {"rule", "size"}:
        size = rule["size"]
        return isinstance(size, list) and len(size) == 2 and all(_is_positive(v) for v in size)
    return False


def _is_positive(value) -> bool:
    return is_finite_number(value) and value > 0


def _is_pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(is_whole, value))


def check_calibration(record, landmark_set: LandmarkSet) -> None:
    """A stored calibration (medsapiens.evaluation.conformal) fit to serve `landmark_set`: one finite,
    non-negative radius per landmark in the set's unit, a coverage in (0, 1). ValueError naming what is wrong."""
    where = f"calibration of {landmark_set.id!r}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be an object")
    radii = record.get("radii")
    if not (isinstance(radii, list) and len(radii) == landmark_set.num_landmarks
            and all(is_finite_number(r) and r >= 0 for r in radii)):
        raise ValueError(f"{where}: radii must be {landmark_set.num_landmarks} finite non-negative numbers")
    if record.get("unit") != landmark_set.unit:
        raise ValueError(f"{where}: unit {record.get('unit')!r}, but the landmark set's errors are in {landmark_set.unit!r}")
    if not (is_finite_number(record.get("coverage")) and 0 < record["coverage"] < 1):
        raise ValueError(f"{where}: coverage must lie strictly between 0 and 1, got {record.get('coverage')!r}")
    if not isinstance(record.get("split"), str):
        raise ValueError(f"{where}: split must name the split it was calibrated on")
    if not (isinstance(record.get("images"), int) and record["images"] > 0):
        raise ValueError(f"{where}: images must be a positive count, got {record.get('images')!r}")


def check_calibrations(calibration, sets: dict[str, LandmarkSet]) -> dict:
    """A stored {head: calibration record} (a bundle's, an ONNX model's), each fit to serve its head's
    landmark set; returned as a dict. ValueError naming what is wrong."""
    if not isinstance(calibration, dict):
        raise ValueError("calibration must be an object")
    for dataset, record in calibration.items():
        if dataset not in sets:
            raise ValueError(f"calibration of {dataset!r}, which is not one of its heads")
        check_calibration(record, sets[dataset])
    return calibration


def record_for(calibration: dict, dataset: str, flip_test: bool) -> dict | None:
    """A head's calibration record (from a bundle or an ONNX model's metadata) where its radii hold: for
    predictions made as it was calibrated, with or without flip test (a record that does not say is kept).
    Else None, and a note says why."""
    record = calibration.get(dataset)
    calibrated_with = record.get("flip_test") if record else None
    if not isinstance(calibrated_with, bool) or calibrated_with == flip_test:
        return record
    print(f"note: the {dataset!r} radii were calibrated {'with' if calibrated_with else 'without'} flip test and "
          f"do not hold {'with' if flip_test else 'without'} it: left out", file=sys.stderr)
    return None


def _indexed(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))


BUILTIN: dict[str, LandmarkSet] = {
    s.id: s
    for s in (
        LandmarkSet(
            id="head", names=ISBI_NAMES, flip_pairs=(), unit="mm", sdr_radii=(2.0, 2.5, 3.0, 4.0),
            native_spacing_mm=0.1, description="ISBI 2015 cephalometric, 19 landmarks, 0.1 mm/px",
        ),
        LandmarkSet(
            id="hand", names=_indexed("hand_", 37), flip_pairs=(), unit="mm", sdr_radii=(2.0, 4.0, 10.0),
            normalization={"rule": "wrist_width", "mm": 50.0, "landmarks": [1, 5]},
            description="Digital Hand Atlas with Payer's 37 landmarks; errors normalised to a 50 mm wrist",
        ),
        LandmarkSet(
            id="chest", names=_indexed("chest_", 6), flip_pairs=None, unit="px", sdr_radii=(3.0, 6.0, 9.0),
            normalization={"rule": "frame", "size": [512, 512]},
            description="Shenzhen chest (GU2Net labels), 6 landmarks; errors in pixels of a 512x512 frame",
        ),
        LandmarkSet(
            id="leg",
            names=_indexed("left_", 13) + _indexed("right_", 13),
            flip_pairs=tuple((i, i + 13) for i in range(13)),
            unit="mm", sdr_radii=(2.0, 4.0, 10.0),
            description="Lower limb (BMPLE), 26 landmarks, 13 left + 13 right, per-image spacing",
        ),
        LandmarkSet(
            id="aariz", names=AARIZ_NAMES, flip_pairs=(), unit="mm", sdr_radii=(2.0, 2.5, 3.0, 4.0),
            description="Aariz cephalometric, 29 landmarks, mean of junior and senior annotators",
        ),
    )
}

DEFAULT_CUSTOM_RADII = {"mm": (2.0, 4.0, 10.0), "px": (3.0, 6.0, 9.0)}


def misplaced_name(names, reference) -> tuple[int, int] | None:
    """(i, j) for the first name that `names` holds at i and `reference` at another place j: two lists
    that would pair different landmarks by position. None where none is (other names, as MedSapiens'
    K0, K1, ..., are not compared)."""
    places: dict[str, list[int]] = {}
    for j, name in enumerate(reference):
        places.setdefault(name, []).append(j)
    return next(((i, places[name][0]) for i, name in enumerate(names) if i not in places.get(name, [i])), None)


def get(dataset_id: str) -> LandmarkSet:
    try:
        return BUILTIN[dataset_id]
    except KeyError:
        raise KeyError(f"unknown dataset {dataset_id!r}; built-in ones: {', '.join(BUILTIN)}") from None


def custom(dataset_id: str, names, flip_pairs=None, unit: str = "px") -> LandmarkSet:
    """A landmark set defined by the data (e.g. a COCO category), not by this registry."""
    return LandmarkSet(
        id=dataset_id, names=tuple(names), flip_pairs=flip_pairs, unit=unit,
        sdr_radii=DEFAULT_CUSTOM_RADII[unit], description="custom set",
    )
