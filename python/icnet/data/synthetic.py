"""Procedural street scenes labelled with Cityscapes trainIds, for demos and tests (real data cannot be
downloaded everywhere). Each scene is drawn from a seed: sky above a horizon, buildings along it, a road in
perspective with sidewalks and terrain beside it, trees, poles with signs, and cars. Colours are jittered per
scene and per object, with pixel noise, so that a network must learn shapes and context, not one colour."""

import numpy as np

from icnet.cityscapes import CLASS_NAMES, PALETTE

TRAIN_ID = {name: i for i, name in enumerate(CLASS_NAMES)}


def _colour(rng, name: str, jitter: float = 40.0) -> np.ndarray:
    return np.clip(PALETTE[TRAIN_ID[name]].astype(np.float32) + rng.normal(0, jitter, 3), 0, 255)


def street_scene(seed: int, height: int = 256, width: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image [H, W, 3] and its trainId labels [H, W] (uint8)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    labels = np.zeros((height, width), np.uint8)
    ys, xs = np.mgrid[0:height, 0:width]

    def paint(mask, name, jitter=40.0):
        image[mask] = _colour(rng, name, jitter)
        labels[mask] = TRAIN_ID[name]

    horizon = int(height * rng.uniform(0.35, 0.5))
    paint(ys < horizon, "sky")
    # buildings: blocks of random width and height standing on the horizon
    x = 0
    while x < width:
        w = int(rng.uniform(0.08, 0.25) * width)
        top = int(horizon * rng.uniform(0.1, 0.7))
        paint((xs >= x) & (xs < x + w) & (ys >= top) & (ys < horizon + 2), "building")
        x += w
    # ground: road in perspective between two sidewalks, terrain outside
    paint(ys >= horizon, "terrain")
    centre = width * rng.uniform(0.35, 0.65)
    depth = (ys - horizon + 1) / (height - horizon)  # 0 at the horizon, 1 at the bottom
    half_road = width * (0.05 + 0.45 * depth)
    half_walk = half_road + width * 0.12 * depth
    ground = ys >= horizon
    paint(ground & (np.abs(xs - centre) < half_walk), "sidewalk")
    paint(ground & (np.abs(xs - centre) < half_road), "road", jitter=20.0)
    # trees: a crown over the buildings near the horizon
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0, width), horizon - rng.uniform(0, 0.3) * horizon
        r = rng.uniform(0.04, 0.1) * width
        paint((xs - cx) ** 2 + ((ys - cy) * 1.3) ** 2 < r * r, "vegetation")
    # poles with a sign, standing on the sidewalk
    for side in (-1, 1):
        if rng.random() < 0.7:
            base_y = int(rng.uniform(horizon + 0.2 * (height - horizon), height - 1))
            d = (base_y - horizon + 1) / (height - horizon)
            px = int(centre + side * (width * (0.05 + 0.45 * d) + width * 0.06 * d))
            pole_h = int((height - horizon) * 1.2 * d + 10)
            pw = max(1, int(4 * d) + 1)
            paint((xs >= px - pw) & (xs <= px + pw) & (ys <= base_y) & (ys > base_y - pole_h), "pole")
            sign = (np.abs(xs - px) < 3 * pw + 2) & (ys > base_y - pole_h - 4 * pw - 4) & (ys <= base_y - pole_h)
            paint(sign, "traffic sign")
    # cars on the road, nearer ones bigger
    for _ in range(rng.integers(0, 4)):
        base_y = int(rng.uniform(horizon + 0.15 * (height - horizon), height - 1))
        d = (base_y - horizon + 1) / (height - horizon)
        cw, ch = width * 0.22 * d + 6, height * 0.12 * d + 4
        cx = centre + rng.uniform(-0.6, 0.6) * width * (0.05 + 0.45 * d)
        body = (np.abs(xs - cx) < cw / 2) & (ys <= base_y) & (ys > base_y - ch)
        paint(body, "car", jitter=60.0)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), labels
