"""Procedural scenes for the demo data: coloured shapes on textured backgrounds, with the language about them.

Everything is a pure function of a ``random.Random`` passed in, so a seed fixes images, captions, questions and
statements. Shapes and colours are few and distinct so that tiny models at 32-64 px can learn them.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 50, 175),
    "white": (245, 245, 245),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class SceneObject:
    """One shape: centre ``(x, y)`` and ``size`` (diameter) as fractions of the image side."""

    shape: str
    colour: str
    x: float
    y: float
    size: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A background colour pair, a texture kind and the objects drawn on it (largest first)."""

    objects: tuple[SceneObject, ...]
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    texture: str


def _background(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    base = [rng.randint(60, 190) for _ in range(3)]
    return tuple(base), tuple(min(255, max(0, c + rng.randint(-50, 50))) for c in base)


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 4, main_shape: str | None = None) -> Scene:
    """Random scene with 1-4 non-overlapping objects; ``main_shape`` forces one large object plus small distractors."""
    objects: list[SceneObject] = []
    if main_shape is not None:
        objects.append(SceneObject(main_shape, rng.choice(list(COLOURS)), rng.uniform(0.35, 0.65),
                                   rng.uniform(0.35, 0.65), rng.uniform(0.45, 0.62)))
        wanted = 1 + rng.randint(0, 1)
        shapes = [s for s in SHAPES if s != main_shape]
        size_range = (0.12, 0.17)
    else:
        wanted = rng.randint(min_objects, max_objects)
        shapes = list(SHAPES)
        size_range = (0.2, 0.34)
    for _ in range(200):
        if len(objects) == wanted:
            break
        size = rng.uniform(*size_range)
        obj = SceneObject(rng.choice(shapes), rng.choice(list(COLOURS)), rng.uniform(size / 2 + 0.02, 0.98 - size / 2),
                          rng.uniform(size / 2 + 0.02, 0.98 - size / 2), size)
        if all(math.hypot(obj.x - o.x, obj.y - o.y) > (obj.size + o.size) / 2 + 0.02 for o in objects):
            objects.append(obj)
    return Scene(tuple(objects), _background(rng), rng.choice(("plain", "stripes", "dots", "checks")))


def _shape_points(obj: SceneObject, side: int) -> list[tuple[float, float]]:
    cx, cy, r = obj.x * side, obj.y * side, obj.size * side / 2
    if obj.shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if obj.shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if obj.shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene`` as an RGB image: gradient background, low-contrast texture, shapes, pixel noise."""
    side = image_size * _SUPERSAMPLE
    top, bottom = np.array(scene.background[0], np.float32), np.array(scene.background[1], np.float32)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(top + (bottom - top) * ramp, (side, side, 3)).copy()
    period = rng.randint(6, 14) * _SUPERSAMPLE
    yy, xx = np.mgrid[0:side, 0:side]
    if scene.texture == "stripes":
        canvas += 14.0 * (((xx + yy) // period) % 2)[..., None]
    elif scene.texture == "checks":
        canvas -= 14.0 * (((xx // period) + (yy // period)) % 2)[..., None]
    elif scene.texture == "dots":
        canvas += 18.0 * (((xx % period) < 3) & ((yy % period) < 3))[..., None]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            r = obj.size * side / 2
            draw.ellipse([obj.x * side - r, obj.y * side - r, obj.x * side + r, obj.y * side + r], fill=fill)
        else:
            draw.polygon(_shape_points(obj, side), fill=fill)
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 6.0, (image_size, image_size, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


_TEXTURE_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checks": "checkered"}


def _where(obj: SceneObject) -> str:
    """Coarse position of ``obj`` in a 3 x 3 grid: "top left", "top", ..., "in the middle", ..., "bottom right"."""
    row = "top" if obj.y < 0.36 else ("bottom" if obj.y > 0.64 else "")
    col = "left" if obj.x < 0.36 else ("right" if obj.x > 0.64 else "")
    if not row and not col:
        return "in the middle"
    return "on the " + " ".join(w for w in (row, col) if w)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """``count`` different sentences, each naming every object of ``scene`` (colour and shape, listed left to right),
    with positions, spatial relations, the count or the background in different templates.

    Every caption describes the whole scene, so a caption identifies its image among others (retrieval is learnable)
    and the listing order is a function of the image (captioning is learnable)."""
    objs = sorted(scene.objects, key=lambda o: o.x)
    n = len(objs)
    names = [f"a {o.name}" for o in objs]
    options = [
        _join(names),
        f"{NUMBER_WORDS[n]} {_plural('shape', n)} : {_join(names)}",
        f"{_join([f'{name} {_where(o)}' for name, o in zip(names, objs)])}",
        f"an image of {_join(names)} on a {_TEXTURE_WORDS[scene.texture]} background",
    ]
    if n == 1:
        options.append(f"a picture with only {names[0]} {_where(objs[0])}")
    else:
        rest = f" and {_join(names[2:])}" if n > 2 else ""
        options.append(f"{names[0]} {_relation(objs[0], objs[1])} {names[1]}{rest}")
    rng.shuffle(options)
    return [options[i % len(options)] for i in range(count)]


def _question_candidates(scene: Scene, rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """(question, true answer, plausible wrong answers) for every question type that has a unique answer."""
    objs = scene.objects
    out = [("how many objects are there?", str(len(objs)), [str(k) for k in range(1, 5) if k != len(objs)])]
    for shape in SHAPES:
        same = [o for o in objs if o.shape == shape]
        if len(same) == 1:
            out.append((f"what color is the {shape}?", same[0].colour, [c for c in COLOURS if c != same[0].colour]))
    for colour in COLOURS:
        same = [o for o in objs if o.colour == colour]
        if len(same) == 1:
            out.append((f"what shape is the {colour} object?", same[0].shape, [s for s in SHAPES if s != same[0].shape]))
        if same:
            out.append((f"how many {colour} objects are there?", str(len(same)), [str(k) for k in range(0, 5) if k != len(same)]))
    probe = SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), 0, 0, 0)
    exists = any(o.name == probe.name for o in objs)
    out.append((f"is there a {probe.name}?", "yes" if exists else "no", ["no" if exists else "yes"]))
    if len(objs) >= 2 and len({o.name for o in objs}) == len(objs):
        a, b = rng.sample(list(objs), 2)
        truth = _relation(a, b) == "to the left of"
        out.append((f"is the {a.name} to the left of the {b.name}?", "yes" if truth else "no", ["no" if truth else "yes"]))
    return out


def questions(scene: Scene, rng: random.Random, count: int, annotators: int = 10,
              accuracy: float = 0.85) -> list[tuple[str, list[str]]]:
    """``count`` questions with ``annotators`` simulated answers each; an annotator errs with ``1 - accuracy``."""
    candidates = _question_candidates(scene, rng)
    chosen = rng.sample(candidates, min(count, len(candidates)))
    return [(q, [truth if rng.random() < accuracy else rng.choice(wrong) for _ in range(annotators)])
            for q, truth, wrong in chosen]


def pair_statement(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    """A statement about two scenes and whether it is true; about half of the statements are false."""
    kind = rng.randrange(4)
    want_true = rng.random() < 0.5
    if kind == 0:
        total = len(left.objects) + len(right.objects)
        n = total if want_true else max(0, total + rng.choice((-1, 1)))
        return f"there are {NUMBER_WORDS[n]} shapes in total", n == total
    if kind == 1:
        pool = [o.shape for o in left.objects if any(p.shape == o.shape for p in right.objects)]
        shape = rng.choice(pool) if want_true and pool else rng.choice(SHAPES)
        truth = any(o.shape == shape for o in left.objects) and any(o.shape == shape for o in right.objects)
        return f"both images contain a {shape}", truth
    if kind == 2:
        truth = len(left.objects) > len(right.objects)
        return "the left image has more shapes than the right image", truth
    colour = rng.choice([o.colour for o in left.objects + right.objects] if want_true else list(COLOURS))
    n_left = sum(o.colour == colour for o in left.objects)
    n_right = sum(o.colour == colour for o in right.objects)
    return f"exactly one image contains a {colour} object", (n_left > 0) != (n_right > 0)
