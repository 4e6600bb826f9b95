"""QuPath-importable GeoJSON: the scored tiles as `tile` objects and the tissue as annotations.

Conventions (QuPath's PathObjectTypeAdapters, v0.4+): a FeatureCollection of Features whose
`properties.objectType` is "tile" / "annotation", `properties.measurements` a plain name -> number
object, `properties.classification` {"name", "color": [r, g, b]}; coordinates in level-0 pixels with
the origin at the top-left of the full-resolution image. A Feature `id` must be a UUID; ours are
derived from the slide name and the object's position, so re-running gives the same ids.

Tiles are exact integer squares (the Parquet table's x, y, width, height). Tissue outlines are
traced on the tissue mask, scaled to level 0, repaired to valid polygons with their holes, and
written one annotation per connected piece: always a Polygon, each ring closed.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Sequence

import numpy as np

from .atomic import atomic_write_bytes

# Tableau-10: distinct, colour-blind-aware; QuPath shows a class in this colour.
CLASS_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
TISSUE_COLOUR = (0, 150, 0)
_NAMESPACE = uuid.UUID("6f0c1c52-7d5e-4d0b-9d3e-2b8f6a1a7c11")


def class_colour(index: int) -> list[int]:
    return list(CLASS_COLOURS[index % len(CLASS_COLOURS)])


def _id(*parts) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(str(p) for p in parts)))


def tile_features(slide_name: str, x, y, width, height, tissue_fraction, probs: np.ndarray,
                  classes: Sequence[str]) -> list[dict]:
    """One QuPath `tile` Feature per row; classified as the class with the highest probability."""
    probs = np.asarray(probs, np.float64)
    winners = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    features = []
    for i in range(len(probs)):
        x0, y0 = int(x[i]), int(y[i])
        x1, y1 = x0 + int(width[i]), y0 + int(height[i])
        measurements = {f"prob_{c}": float(probs[i, j]) for j, c in enumerate(classes)}
        measurements["tissue_fraction"] = float(tissue_fraction[i])
        features.append({
            "type": "Feature",
            "id": _id(slide_name, "tile", x0, y0),
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "tile",
                "classification": {"name": classes[winners[i]], "color": class_colour(int(winners[i]))},
                "measurements": measurements,
            },
        })
    return features


def tissue_polygons(mask: np.ndarray, downsample: float, *, simplify_px: float = 0.5) -> list:
    """Valid shapely Polygons (holes kept) of the mask's connected pieces, in level-0 pixels.

    Contours are traced at the 0.5 level of the padded mask (pixel edges, not centres: a mask
    pixel (r, c) spans [c, c+1) x [r, r+1)), nested contours combine even-odd (tissue, hole,
    island in a hole), and the result is simplified by `simplify_px` mask pixels.
    """
    from shapely import affinity, make_valid
    from shapely.geometry import MultiPolygon, Polygon
    from skimage.measure import find_contours

    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.uint8), 1)
    rings = []
    for contour in find_contours(padded, 0.5):
        if len(contour) < 4:
            continue
        # Simplified ring by ring (a traced contour has a vertex per mask pixel): the even-odd
        # combination below then works on a fraction of the vertices.
        ring = Polygon(np.column_stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5])).simplify(simplify_px)
        ring = make_valid(ring) if not ring.is_valid else ring
        if not ring.is_empty:
            rings.append(ring)
    shape = None
    for ring in sorted(rings, key=lambda r: -r.area):
        shape = ring if shape is None else shape.symmetric_difference(ring)
    if shape is None:
        return []
    shape = make_valid(shape)
    shape = affinity.scale(shape, xfact=downsample, yfact=downsample, origin=(0, 0))
    parts = list(shape.geoms) if hasattr(shape, "geoms") else [shape]
    polygons = []
    for part in parts:
        if isinstance(part, MultiPolygon):
            polygons += list(part.geoms)
        elif isinstance(part, Polygon) and not part.is_empty and part.area > 0:
            polygons.append(part)
    return polygons


def _ring(coords) -> list[list[float]]:
    points = [[round(float(px), 2), round(float(py), 2)] for px, py in coords]
    if points[0] != points[-1]:
        points.append(points[0])
    return points


def polygon_geometry(polygon) -> dict:
    """GeoJSON Polygon of a shapely Polygon: exterior counter-clockwise, holes clockwise, closed."""
    from shapely.geometry.polygon import orient

    polygon = orient(polygon, sign=1.0)
    return {"type": "Polygon",
            "coordinates": [_ring(polygon.exterior.coords)] + [_ring(r.coords) for r in polygon.interiors]}


def tissue_features(slide_name: str, mask: np.ndarray, downsample: float) -> list[dict]:
    features = []
    for i, polygon in enumerate(tissue_polygons(mask, downsample)):
        features.append({
            "type": "Feature",
            "id": _id(slide_name, "tissue", i),
            "geometry": polygon_geometry(polygon),
            "properties": {"objectType": "annotation", "name": f"Tissue {i + 1}",
                           "classification": {"name": "Tissue", "color": list(TISSUE_COLOUR)},
                           "measurements": {"area_px2": round(float(polygon.area), 1)}},
        })
    return features


def feature_collection(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": features}


def write_geojson(collection: dict, dest: str | os.PathLike) -> None:
    atomic_write_bytes(dest, json.dumps(collection, separators=(",", ":")).encode())
