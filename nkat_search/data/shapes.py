"""The shapes the synthetic look-alikes (synthetic.py) are drawn from, each as a distance field.

Glyphs (the ten digits; the 26 letters, upper and lower case) are pen strokes: polylines in a unit
box, y growing down. Garments and CIFAR-10 objects are filled polygons with strokes (legs, tails,
straps) and a second channel: thin detail lines (seams, collars, zips) or parts in a second colour
(wheels, windows, wings, eyes). Each class's shape becomes, once, a distance field on a fine grid
around its unit box (the prototype), which synthetic.py samples through each image's own warp.
The shapes depend on nothing: no fonts, no files, no randomness.
"""

from __future__ import annotations

import functools
import math

import torch

FIELD = 64  # prototype resolution over the glyph coordinates [-0.5, 1.5]^2 (32 cells per unit)


Point = tuple[float, float]


def arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float) -> list[Point]:
    """Points along an ellipse from angle t0 to t1 in degrees (0 = right, 90 = down: y grows down)."""
    steps = max(3, math.ceil(abs(t1 - t0) / 15))
    ts = [math.radians(t0 + (t1 - t0) * i / steps) for i in range(steps + 1)]
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in ts]


def ring(cx: float, cy: float, rx: float, ry: float | None = None) -> list[Point]:
    return arc(cx, cy, rx, rx if ry is None else ry, 0, 360)


def seg(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y1)]


DIGITS: list[list[list[Point]]] = [
    [ring(0.5, 0.5, 0.3, 0.42)],
    [[(0.32, 0.25), (0.52, 0.08), (0.52, 0.92)]],
    [[*arc(0.5, 0.3, 0.25, 0.22, 200, 360), (0.72, 0.42), (0.22, 0.92), (0.8, 0.92)]],
    [arc(0.48, 0.29, 0.22, 0.21, -160, 90), arc(0.48, 0.71, 0.25, 0.21, -90, 160)],
    [[(0.62, 0.92), (0.62, 0.08), (0.18, 0.66), (0.84, 0.66)]],
    [[(0.76, 0.08), (0.32, 0.08), (0.28, 0.44), *arc(0.48, 0.66, 0.27, 0.26, -125, 150)]],
    [[(0.7, 0.08), (0.42, 0.3), (0.27, 0.6)], ring(0.5, 0.68, 0.23, 0.24)],
    [[(0.2, 0.08), (0.8, 0.08), (0.42, 0.92)]],
    [ring(0.5, 0.28, 0.2, 0.2), ring(0.5, 0.7, 0.24, 0.22)],
    [ring(0.48, 0.32, 0.23, 0.24), [(0.71, 0.35), (0.62, 0.92)]],
]


UPPER: list[list[list[Point]]] = [
    [[(0.15, 0.92), (0.5, 0.08), (0.85, 0.92)], seg(0.3, 0.6, 0.7, 0.6)],  # A
    [
        [
            (0.25, 0.5),
            (0.25, 0.08),
            *arc(0.55, 0.29, 0.2, 0.21, -90, 90),
            (0.25, 0.5),
            *arc(0.58, 0.71, 0.22, 0.21, -90, 90),
            (0.25, 0.92),
            (0.25, 0.5),
        ]
    ],  # B
    [arc(0.55, 0.5, 0.35, 0.42, 45, 315)],  # C
    [[(0.25, 0.08), *arc(0.42, 0.5, 0.38, 0.42, -90, 90), (0.25, 0.92), (0.25, 0.08)]],  # D
    [[(0.75, 0.08), (0.25, 0.08), (0.25, 0.92), (0.75, 0.92)], seg(0.25, 0.5, 0.65, 0.5)],  # E
    [[(0.75, 0.08), (0.25, 0.08), (0.25, 0.92)], seg(0.25, 0.5, 0.65, 0.5)],  # F
    [[*arc(0.52, 0.5, 0.36, 0.42, -40, -320), (0.88, 0.55), (0.62, 0.55)]],  # G
    [seg(0.25, 0.08, 0.25, 0.92), seg(0.75, 0.08, 0.75, 0.92), seg(0.25, 0.5, 0.75, 0.5)],  # H
    [seg(0.5, 0.08, 0.5, 0.92), seg(0.32, 0.08, 0.68, 0.08), seg(0.32, 0.92, 0.68, 0.92)],  # I
    [[(0.7, 0.08), (0.7, 0.68), *arc(0.48, 0.68, 0.22, 0.24, 0, 170)]],  # J
    [seg(0.25, 0.08, 0.25, 0.92), [(0.75, 0.08), (0.25, 0.58)], seg(0.42, 0.44, 0.78, 0.92)],  # K
    [[(0.25, 0.08), (0.25, 0.92), (0.75, 0.92)]],  # L
    [[(0.15, 0.92), (0.2, 0.08), (0.5, 0.62), (0.8, 0.08), (0.85, 0.92)]],  # M
    [[(0.25, 0.92), (0.25, 0.08), (0.75, 0.92), (0.75, 0.08)]],  # N
    [ring(0.5, 0.5, 0.35, 0.42)],  # O
    [[(0.25, 0.92), (0.25, 0.08), *arc(0.52, 0.3, 0.24, 0.22, -90, 90), (0.25, 0.52)]],  # P
    [ring(0.5, 0.5, 0.35, 0.42), seg(0.58, 0.68, 0.86, 0.95)],  # Q
    [[(0.25, 0.92), (0.25, 0.08), *arc(0.52, 0.3, 0.24, 0.22, -90, 90), (0.25, 0.52)], seg(0.45, 0.52, 0.8, 0.92)],  # R
    [arc(0.5, 0.29, 0.24, 0.21, -20, -270), arc(0.5, 0.71, 0.26, 0.21, -90, 160)],  # S
    [seg(0.15, 0.08, 0.85, 0.08), seg(0.5, 0.08, 0.5, 0.92)],  # T
    [[(0.25, 0.08), (0.25, 0.65), *arc(0.5, 0.65, 0.25, 0.27, 180, 0), (0.75, 0.08)]],  # U
    [[(0.15, 0.08), (0.5, 0.92), (0.85, 0.08)]],  # V
    [[(0.08, 0.08), (0.28, 0.92), (0.5, 0.38), (0.72, 0.92), (0.92, 0.08)]],  # W
    [seg(0.2, 0.08, 0.8, 0.92), seg(0.8, 0.08, 0.2, 0.92)],  # X
    [[(0.2, 0.08), (0.5, 0.5), (0.8, 0.08)], seg(0.5, 0.5, 0.5, 0.92)],  # Y
    [[(0.2, 0.08), (0.8, 0.08), (0.2, 0.92), (0.8, 0.92)]],  # Z
]


LOWER: list[list[list[Point]]] = [
    [ring(0.46, 0.68, 0.21, 0.23), seg(0.67, 0.42, 0.69, 0.92)],  # a
    [seg(0.3, 0.08, 0.3, 0.92), ring(0.5, 0.7, 0.21, 0.22)],  # b
    [arc(0.52, 0.68, 0.23, 0.24, 40, 320)],  # c
    [ring(0.48, 0.7, 0.21, 0.22), seg(0.7, 0.08, 0.7, 0.92)],  # d
    [[(0.28, 0.68), (0.72, 0.68), *arc(0.5, 0.68, 0.22, 0.23, 0, -315)]],  # e
    [[*arc(0.57, 0.22, 0.15, 0.14, -20, -180), (0.42, 0.92)], seg(0.25, 0.46, 0.65, 0.46)],  # f
    [ring(0.5, 0.48, 0.2, 0.2), [(0.7, 0.35), (0.7, 0.78), *arc(0.5, 0.78, 0.2, 0.17, 0, 160)]],  # g
    [seg(0.3, 0.08, 0.3, 0.92), [(0.3, 0.64), *arc(0.5, 0.64, 0.2, 0.2, 180, 360), (0.7, 0.92)]],  # h
    [seg(0.5, 0.45, 0.5, 0.92), seg(0.5, 0.2, 0.5, 0.25)],  # i
    [[(0.56, 0.45), (0.56, 0.8), *arc(0.41, 0.8, 0.15, 0.15, 0, 160)], seg(0.56, 0.2, 0.56, 0.25)],  # j
    [seg(0.3, 0.08, 0.3, 0.92), [(0.7, 0.42), (0.3, 0.7), (0.72, 0.92)]],  # k
    [[(0.42, 0.08), (0.5, 0.08), (0.5, 0.92)]],  # l
    [
        seg(0.15, 0.45, 0.15, 0.92),
        [(0.15, 0.62), *arc(0.32, 0.62, 0.17, 0.17, 180, 360), (0.49, 0.92)],
        [(0.49, 0.62), *arc(0.66, 0.62, 0.17, 0.17, 180, 360), (0.83, 0.92)],
    ],  # m
    [seg(0.3, 0.45, 0.3, 0.92), [(0.3, 0.64), *arc(0.5, 0.64, 0.2, 0.2, 180, 360), (0.7, 0.92)]],  # n
    [ring(0.5, 0.68, 0.22, 0.24)],  # o
    [seg(0.3, 0.38, 0.3, 0.98), ring(0.5, 0.56, 0.2, 0.2)],  # p
    [ring(0.5, 0.56, 0.2, 0.2), seg(0.7, 0.38, 0.7, 0.98)],  # q
    [seg(0.35, 0.45, 0.35, 0.92), arc(0.55, 0.64, 0.2, 0.19, 180, 310)],  # r
    [arc(0.5, 0.57, 0.17, 0.12, -20, -270), arc(0.5, 0.81, 0.18, 0.12, -90, 160)],  # s
    [[(0.45, 0.15), (0.45, 0.8), *arc(0.58, 0.8, 0.13, 0.12, 180, 60)], seg(0.28, 0.4, 0.68, 0.4)],  # t
    [[(0.3, 0.45), (0.3, 0.7), *arc(0.5, 0.7, 0.2, 0.22, 180, 0)], seg(0.7, 0.45, 0.7, 0.92)],  # u
    [[(0.25, 0.45), (0.5, 0.92), (0.75, 0.45)]],  # v
    [[(0.12, 0.45), (0.3, 0.92), (0.5, 0.6), (0.7, 0.92), (0.88, 0.45)]],  # w
    [seg(0.28, 0.45, 0.72, 0.92), seg(0.72, 0.45, 0.28, 0.92)],  # x
    [seg(0.25, 0.38, 0.5, 0.72), seg(0.75, 0.38, 0.4, 0.98)],  # y
    [[(0.28, 0.45), (0.72, 0.45), (0.28, 0.92), (0.72, 0.92)]],  # z
]


def mirror(points: list[Point]) -> list[Point]:
    return [(1 - x, y) for x, y in points]


def _garment(body, limbs=(), details=(), widths=0.0):
    return {"fill": [body, *limbs], "strokes": [], "detail": list(details)}


SLEEVE_SHORT = [(0.76, 0.08), (1.0, 0.3), (0.9, 0.42), (0.76, 0.32)]


SLEEVE_LONG = [(0.74, 0.06), (0.97, 0.86), (0.83, 0.9), (0.7, 0.36)]


GARMENTS = [
    _garment(
        [(0.38, 0.05), (0.5, 0.13), (0.62, 0.05), (0.77, 0.08), (0.78, 0.98), (0.22, 0.98), (0.23, 0.08)],
        [SLEEVE_SHORT, mirror(SLEEVE_SHORT)],
        [arc(0.5, 0.05, 0.12, 0.08, 0, 180)],
    ),  # T-shirt/top
    _garment(
        [(0.28, 0), (0.72, 0), (0.8, 1.0), (0.56, 1.0), (0.5, 0.32), (0.44, 1.0), (0.2, 1.0)],
        details=[seg(0.28, 0.07, 0.72, 0.07)],
    ),  # trouser
    _garment(
        [(0.27, 0.04), (0.73, 0.04), (0.74, 0.94), (0.26, 0.94)],
        [SLEEVE_LONG, mirror(SLEEVE_LONG)],
        [arc(0.5, 0.04, 0.1, 0.07, 0, 180), seg(0.26, 0.88, 0.74, 0.88)],
    ),  # pullover
    _garment(
        [(0.4, 0), (0.6, 0), (0.65, 0.3), (0.6, 0.42), (0.88, 1.0), (0.12, 1.0), (0.4, 0.42), (0.35, 0.3)],
        details=[seg(0.4, 0.42, 0.6, 0.42)],
    ),  # dress
    _garment(
        [(0.25, 0.02), (0.75, 0.02), (0.78, 1.0), (0.22, 1.0)],
        [SLEEVE_LONG, mirror(SLEEVE_LONG)],
        [
            [(0.38, 0.02), (0.5, 0.32), (0.62, 0.02)],
            seg(0.5, 0.32, 0.5, 1.0),
            seg(0.3, 0.66, 0.42, 0.66),
            seg(0.58, 0.66, 0.7, 0.66),
        ],
    ),  # coat
    {
        "fill": [[(0.02, 0.76), (0.98, 0.7), (0.98, 0.84), (0.02, 0.88)]],
        "detail": [],
        "strokes": [
            [(0.12, 0.78), (0.3, 0.5), (0.5, 0.76)],
            [(0.5, 0.74), (0.68, 0.48), (0.86, 0.72)],
            seg(0.3, 0.5, 0.68, 0.48),
            [(0.05, 0.8), (0.1, 0.55), (0.22, 0.6)],
        ],
    },  # sandal
    _garment(
        [(0.3, 0.04), (0.7, 0.04), (0.72, 0.96), (0.28, 0.96)],
        [SLEEVE_LONG, mirror(SLEEVE_LONG)],
        [
            [(0.38, 0.04), (0.5, 0.2), (0.62, 0.04)],
            *[seg(0.5, y, 0.5, y + 0.03) for y in (0.3, 0.45, 0.6, 0.75, 0.9)],
            [(0.3, 0.04), (0.4, 0.16)],
            [(0.7, 0.04), (0.6, 0.16)],
        ],
    ),  # shirt
    _garment(
        [(0.02, 0.86), (0.02, 0.62), (0.3, 0.52), (0.5, 0.44), (0.62, 0.5), (0.8, 0.62), (0.98, 0.7), (0.98, 0.88)],
        details=[seg(0.02, 0.78, 0.98, 0.8), seg(0.4, 0.52, 0.5, 0.6), seg(0.48, 0.5, 0.58, 0.58)],
    ),  # sneaker
    {
        "fill": [[(0.08, 0.32), (0.92, 0.32), (0.92, 0.96), (0.08, 0.96)]],
        "strokes": [arc(0.5, 0.34, 0.26, 0.26, 180, 360)],
        "detail": [seg(0.08, 0.5, 0.92, 0.5)],
    },  # bag
    _garment(
        [(0.18, 0.04), (0.52, 0.04), (0.56, 0.5), (0.94, 0.66), (0.98, 0.9), (0.12, 0.9), (0.16, 0.5)],
        details=[seg(0.12, 0.82, 0.98, 0.84), seg(0.18, 0.12, 0.52, 0.12)],
    ),  # ankle boot
]


# CIFAR-10 objects, side view facing right: body polygons, leg/tail strokes, and parts in a
# second colour.
LEG = 0.035


OBJECTS = [
    {
        "fill": [
            ring(0.5, 0.5, 0.46, 0.07),
            [(0.44, 0.5), (0.3, 0.86), (0.4, 0.86), (0.62, 0.5)],
            [(0.46, 0.49), (0.4, 0.24), (0.46, 0.24), (0.6, 0.49)],
            [(0.1, 0.5), (0.04, 0.26), (0.14, 0.26), (0.24, 0.49)],
        ],
        "strokes": [],
        "part": [[(0.62, 0.46), (0.88, 0.46), (0.88, 0.49), (0.62, 0.49)]],
    },  # airplane
    {
        "fill": [
            [(0.02, 0.56), (0.98, 0.56), (0.98, 0.78), (0.02, 0.78)],
            [(0.24, 0.57), (0.34, 0.34), (0.68, 0.34), (0.82, 0.57)],
        ],
        "strokes": [],
        "part": [ring(0.25, 0.8, 0.11), ring(0.76, 0.8, 0.11), [(0.36, 0.38), (0.66, 0.38), (0.75, 0.54), (0.3, 0.54)]],
    },  # automobile
    {
        "fill": [
            ring(0.45, 0.56, 0.28, 0.16),
            ring(0.74, 0.38, 0.11),
            [(0.2, 0.52), (0, 0.44), (0.04, 0.64), (0.22, 0.62)],
        ],
        "strokes": [seg(0.43, 0.7, 0.41, 0.9), seg(0.52, 0.7, 0.54, 0.9)],
        "part": [[(0.84, 0.34), (0.99, 0.4), (0.84, 0.44)], ring(0.42, 0.52, 0.18, 0.08)],
    },  # bird
    {
        "fill": [
            ring(0.45, 0.66, 0.25, 0.28),
            ring(0.56, 0.3, 0.17),
            [(0.42, 0.22), (0.45, 0.02), (0.56, 0.15)],
            [(0.6, 0.15), (0.7, 0.02), (0.72, 0.22)],
        ],
        "strokes": [arc(0.17, 0.66, 0.16, 0.22, 90, 200)],
        "part": [ring(0.5, 0.28, 0.035), ring(0.63, 0.28, 0.035)],
    },  # cat
    {
        "fill": [
            ring(0.45, 0.5, 0.3, 0.13),
            [(0.64, 0.46), (0.72, 0.2), (0.8, 0.22), (0.76, 0.52)],
            ring(0.83, 0.21, 0.1, 0.06),
        ],
        "strokes": [
            seg(0.24, 0.55, 0.22, 0.96),
            seg(0.33, 0.56, 0.35, 0.96),
            seg(0.58, 0.56, 0.56, 0.96),
            seg(0.66, 0.55, 0.68, 0.96),
            [(0.76, 0.16), (0.72, 0.02)],
            seg(0.74, 0.08, 0.65, 0.04),
            [(0.82, 0.15), (0.88, 0.02)],
        ],
        "part": [ring(0.35, 0.47, 0.04), ring(0.47, 0.45, 0.04), ring(0.56, 0.5, 0.035)],
    },  # deer
    {
        "fill": [ring(0.45, 0.52, 0.28, 0.14), ring(0.78, 0.35, 0.13), [(0.86, 0.34), (0.99, 0.4), (0.86, 0.46)]],
        "strokes": [
            seg(0.25, 0.55, 0.24, 0.86),
            seg(0.33, 0.56, 0.34, 0.86),
            seg(0.57, 0.56, 0.56, 0.86),
            seg(0.65, 0.55, 0.66, 0.86),
            seg(0.18, 0.46, 0.07, 0.28),
        ],
        "part": [[(0.72, 0.28), (0.66, 0.54), (0.76, 0.5)], ring(0.97, 0.4, 0.03)],
    },  # dog
    {
        "fill": [
            ring(0.5, 0.66, 0.38, 0.2),
            ring(0.34, 0.44, 0.1),
            ring(0.66, 0.44, 0.1),
            [(0.14, 0.7), (0, 0.95), (0.34, 0.9)],
            [(0.86, 0.7), (1.0, 0.95), (0.66, 0.9)],
        ],
        "strokes": [],
        "part": [ring(0.34, 0.42, 0.045), ring(0.66, 0.42, 0.045), ring(0.5, 0.72, 0.06)],
    },  # frog
    {
        "fill": [
            ring(0.45, 0.5, 0.3, 0.14),
            [(0.62, 0.46), (0.74, 0.12), (0.84, 0.14), (0.76, 0.52)],
            [(0.74, 0.1), (0.99, 0.3), (0.94, 0.37), (0.78, 0.26)],
        ],
        "strokes": [
            seg(0.24, 0.56, 0.22, 0.99),
            seg(0.33, 0.57, 0.35, 0.99),
            seg(0.58, 0.57, 0.56, 0.99),
            seg(0.66, 0.56, 0.68, 0.99),
            [(0.16, 0.45), (0.06, 0.72)],
        ],
        "part": [[(0.7, 0.1), (0.74, 0.1), (0.64, 0.44), (0.6, 0.42)], ring(0.9, 0.3, 0.025)],
    },  # horse
    {
        "fill": [
            [(0, 0.55), (1.0, 0.55), (0.86, 0.8), (0.12, 0.8)],
            [(0.34, 0.34), (0.7, 0.34), (0.7, 0.56), (0.34, 0.56)],
            [(0.48, 0.1), (0.56, 0.1), (0.56, 0.35), (0.48, 0.35)],
        ],
        "strokes": [],
        "part": [
            [(0.04, 0.6), (0.96, 0.6), (0.93, 0.65), (0.07, 0.65)],
            ring(0.44, 0.44, 0.035),
            ring(0.6, 0.44, 0.035),
        ],
    },  # ship
    {
        "fill": [
            [(0, 0.24), (0.64, 0.24), (0.64, 0.78), (0, 0.78)],
            [(0.64, 0.42), (0.84, 0.42), (0.98, 0.6), (0.98, 0.78), (0.64, 0.78)],
        ],
        "strokes": [],
        "part": [
            ring(0.15, 0.8, 0.1),
            ring(0.44, 0.8, 0.1),
            ring(0.83, 0.8, 0.1),
            [(0.7, 0.46), (0.82, 0.46), (0.92, 0.6), (0.7, 0.6)],
        ],
    },  # truck
]


GLYPHS = {"digits": DIGITS, "letters": UPPER + LOWER}


SHAPES = {"garments": (GARMENTS, "detail"), "objects": (OBJECTS, "part")}


def _grid(n: int = FIELD) -> torch.Tensor:
    """Cell centres of the prototype grid over [-0.5, 1.5]^2, as [n*n, 2] (x, y)."""
    c = -0.5 + (torch.arange(n, dtype=torch.float32) + 0.5) * 2 / n
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((x.flatten(), y.flatten()), dim=1)


def _segment_distance(p: torch.Tensor, lines: list[list[Point]]) -> torch.Tensor:
    """Distance of every point to the nearest segment of the polylines (inf without any)."""
    segs = [(a, b) for line in lines for a, b in zip(line, line[1:])]
    if not segs:
        return torch.full((len(p),), math.inf, dtype=p.dtype)
    ab = torch.tensor(segs, dtype=p.dtype)  # [M, 2 ends, 2]
    a, d = ab[:, 0], ab[:, 1] - ab[:, 0]
    ap = p[:, None] - a  # [P, M, 2]
    t = ((ap * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-12)).clamp_(0, 1)
    return (ap - t[..., None] * d).square_().sum(-1).amin(dim=1).sqrt_()


def _polygon_sdf(p: torch.Tensor, polygons: list[list[Point]]) -> torch.Tensor:
    """Signed distance to the union of the polygons: negative inside (even-odd rule per polygon)."""
    sdf = torch.full((len(p),), math.inf, dtype=p.dtype)
    for poly in polygons:
        v = torch.tensor(poly, dtype=p.dtype)
        w = torch.roll(v, -1, dims=0)
        dist = _segment_distance(p, [[*poly, poly[0]]])
        # A ray to +x crosses the edge (v, w) when y lies between their y and the crossing is right of x.
        straddle = (v[:, 1] > p[:, 1:2]) != (w[:, 1] > p[:, 1:2])
        x_cross = v[:, 0] + (p[:, 1:2] - v[:, 1]) * (w[:, 0] - v[:, 0]) / (w[:, 1] - v[:, 1] + 1e-12)
        inside = (straddle & (p[:, 0:1] < x_cross)).sum(1) % 2 == 1
        sdf = torch.minimum(sdf, torch.where(inside, -dist, dist))
    return sdf


def _fields(shapes: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-class [C, n*n] fields into [K, C, n, n] float32."""
    return torch.stack(shapes).view(len(shapes), -1, FIELD, FIELD)


@functools.cache
def glyph_fields(name: str) -> torch.Tensor:
    """[K, 1, FIELD, FIELD]: distance to the pen's path of each glyph of a set (digits, letters)."""
    p = _grid()
    return _fields([_segment_distance(p, g)[None] for g in GLYPHS[name]])


@functools.cache
def shape_fields(name: str) -> torch.Tensor:
    """[K, 2, FIELD, FIELD]: body signed distance (polygons and LEG-thick strokes); then the detail
    channel: distance to thin lines ("detail") or signed distance of second-colour polygons ("part")."""
    shapes, detail = SHAPES[name]
    p = _grid()
    out = []
    for s in shapes:
        body = torch.minimum(_polygon_sdf(p, s["fill"]), _segment_distance(p, s["strokes"]) - LEG)
        second = _segment_distance(p, s["detail"]) if detail == "detail" else _polygon_sdf(p, s["part"])
        out.append(torch.stack((body, second)))
    return _fields(out)
