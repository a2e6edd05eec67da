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
    [ring(.5, .5, .3, .42)],
    [[(.32, .25), (.52, .08), (.52, .92)]],
    [[*arc(.5, .3, .25, .22, 200, 360), (.72, .42), (.22, .92), (.8, .92)]],
    [arc(.48, .29, .22, .21, -160, 90), arc(.48, .71, .25, .21, -90, 160)],
    [[(.62, .92), (.62, .08), (.18, .66), (.84, .66)]],
    [[(.76, .08), (.32, .08), (.28, .44), *arc(.48, .66, .27, .26, -125, 150)]],
    [[(.7, .08), (.42, .3), (.27, .6)], ring(.5, .68, .23, .24)],
    [[(.2, .08), (.8, .08), (.42, .92)]],
    [ring(.5, .28, .2, .2), ring(.5, .7, .24, .22)],
    [ring(.48, .32, .23, .24), [(.71, .35), (.62, .92)]],
]


UPPER: list[list[list[Point]]] = [
    [[(.15, .92), (.5, .08), (.85, .92)], seg(.3, .6, .7, .6)],  # A
    [[(.25, .5), (.25, .08), *arc(.55, .29, .2, .21, -90, 90), (.25, .5), *arc(.58, .71, .22, .21, -90, 90),
      (.25, .92), (.25, .5)]],  # B
    [arc(.55, .5, .35, .42, 45, 315)],  # C
    [[(.25, .08), *arc(.42, .5, .38, .42, -90, 90), (.25, .92), (.25, .08)]],  # D
    [[(.75, .08), (.25, .08), (.25, .92), (.75, .92)], seg(.25, .5, .65, .5)],  # E
    [[(.75, .08), (.25, .08), (.25, .92)], seg(.25, .5, .65, .5)],  # F
    [[*arc(.52, .5, .36, .42, -40, -320), (.88, .55), (.62, .55)]],  # G
    [seg(.25, .08, .25, .92), seg(.75, .08, .75, .92), seg(.25, .5, .75, .5)],  # H
    [seg(.5, .08, .5, .92), seg(.32, .08, .68, .08), seg(.32, .92, .68, .92)],  # I
    [[(.7, .08), (.7, .68), *arc(.48, .68, .22, .24, 0, 170)]],  # J
    [seg(.25, .08, .25, .92), [(.75, .08), (.25, .58)], seg(.42, .44, .78, .92)],  # K
    [[(.25, .08), (.25, .92), (.75, .92)]],  # L
    [[(.15, .92), (.2, .08), (.5, .62), (.8, .08), (.85, .92)]],  # M
    [[(.25, .92), (.25, .08), (.75, .92), (.75, .08)]],  # N
    [ring(.5, .5, .35, .42)],  # O
    [[(.25, .92), (.25, .08), *arc(.52, .3, .24, .22, -90, 90), (.25, .52)]],  # P
    [ring(.5, .5, .35, .42), seg(.58, .68, .86, .95)],  # Q
    [[(.25, .92), (.25, .08), *arc(.52, .3, .24, .22, -90, 90), (.25, .52)], seg(.45, .52, .8, .92)],  # R
    [arc(.5, .29, .24, .21, -20, -270), arc(.5, .71, .26, .21, -90, 160)],  # S
    [seg(.15, .08, .85, .08), seg(.5, .08, .5, .92)],  # T
    [[(.25, .08), (.25, .65), *arc(.5, .65, .25, .27, 180, 0), (.75, .08)]],  # U
    [[(.15, .08), (.5, .92), (.85, .08)]],  # V
    [[(.08, .08), (.28, .92), (.5, .38), (.72, .92), (.92, .08)]],  # W
    [seg(.2, .08, .8, .92), seg(.8, .08, .2, .92)],  # X
    [[(.2, .08), (.5, .5), (.8, .08)], seg(.5, .5, .5, .92)],  # Y
    [[(.2, .08), (.8, .08), (.2, .92), (.8, .92)]],  # Z
]


LOWER: list[list[list[Point]]] = [
    [ring(.46, .68, .21, .23), seg(.67, .42, .69, .92)],  # a
    [seg(.3, .08, .3, .92), ring(.5, .7, .21, .22)],  # b
    [arc(.52, .68, .23, .24, 40, 320)],  # c
    [ring(.48, .7, .21, .22), seg(.7, .08, .7, .92)],  # d
    [[(.28, .68), (.72, .68), *arc(.5, .68, .22, .23, 0, -315)]],  # e
    [[*arc(.57, .22, .15, .14, -20, -180), (.42, .92)], seg(.25, .46, .65, .46)],  # f
    [ring(.5, .48, .2, .2), [(.7, .35), (.7, .78), *arc(.5, .78, .2, .17, 0, 160)]],  # g
    [seg(.3, .08, .3, .92), [(.3, .64), *arc(.5, .64, .2, .2, 180, 360), (.7, .92)]],  # h
    [seg(.5, .45, .5, .92), seg(.5, .2, .5, .25)],  # i
    [[(.56, .45), (.56, .8), *arc(.41, .8, .15, .15, 0, 160)], seg(.56, .2, .56, .25)],  # j
    [seg(.3, .08, .3, .92), [(.7, .42), (.3, .7), (.72, .92)]],  # k
    [[(.42, .08), (.5, .08), (.5, .92)]],  # l
    [seg(.15, .45, .15, .92), [(.15, .62), *arc(.32, .62, .17, .17, 180, 360), (.49, .92)],
     [(.49, .62), *arc(.66, .62, .17, .17, 180, 360), (.83, .92)]],  # m
    [seg(.3, .45, .3, .92), [(.3, .64), *arc(.5, .64, .2, .2, 180, 360), (.7, .92)]],  # n
    [ring(.5, .68, .22, .24)],  # o
    [seg(.3, .38, .3, .98), ring(.5, .56, .2, .2)],  # p
    [ring(.5, .56, .2, .2), seg(.7, .38, .7, .98)],  # q
    [seg(.35, .45, .35, .92), arc(.55, .64, .2, .19, 180, 310)],  # r
    [arc(.5, .57, .17, .12, -20, -270), arc(.5, .81, .18, .12, -90, 160)],  # s
    [[(.45, .15), (.45, .8), *arc(.58, .8, .13, .12, 180, 60)], seg(.28, .4, .68, .4)],  # t
    [[(.3, .45), (.3, .7), *arc(.5, .7, .2, .22, 180, 0)], seg(.7, .45, .7, .92)],  # u
    [[(.25, .45), (.5, .92), (.75, .45)]],  # v
    [[(.12, .45), (.3, .92), (.5, .6), (.7, .92), (.88, .45)]],  # w
    [seg(.28, .45, .72, .92), seg(.72, .45, .28, .92)],  # x
    [seg(.25, .38, .5, .72), seg(.75, .38, .4, .98)],  # y
    [[(.28, .45), (.72, .45), (.28, .92), (.72, .92)]],  # z
]


def mirror(points: list[Point]) -> list[Point]:
    return [(1 - x, y) for x, y in points]


def _garment(body, limbs=(), details=(), widths=0.0):
    return {"fill": [body, *limbs], "strokes": [], "detail": list(details)}


SLEEVE_SHORT = [(.76, .08), (1.0, .3), (.9, .42), (.76, .32)]


SLEEVE_LONG = [(.74, .06), (.97, .86), (.83, .9), (.7, .36)]


GARMENTS = [
    _garment([(.38, .05), (.5, .13), (.62, .05), (.77, .08), (.78, .98), (.22, .98), (.23, .08)],
             [SLEEVE_SHORT, mirror(SLEEVE_SHORT)], [arc(.5, .05, .12, .08, 0, 180)]),  # T-shirt/top
    _garment([(.28, 0), (.72, 0), (.8, 1.0), (.56, 1.0), (.5, .32), (.44, 1.0), (.2, 1.0)],
             details=[seg(.28, .07, .72, .07)]),  # trouser
    _garment([(.27, .04), (.73, .04), (.74, .94), (.26, .94)], [SLEEVE_LONG, mirror(SLEEVE_LONG)],
             [arc(.5, .04, .1, .07, 0, 180), seg(.26, .88, .74, .88)]),  # pullover
    _garment([(.4, 0), (.6, 0), (.65, .3), (.6, .42), (.88, 1.0), (.12, 1.0), (.4, .42), (.35, .3)],
             details=[seg(.4, .42, .6, .42)]),  # dress
    _garment([(.25, .02), (.75, .02), (.78, 1.0), (.22, 1.0)], [SLEEVE_LONG, mirror(SLEEVE_LONG)],
             [[(.38, .02), (.5, .32), (.62, .02)], seg(.5, .32, .5, 1.0), seg(.3, .66, .42, .66),
              seg(.58, .66, .7, .66)]),  # coat
    {"fill": [[(.02, .76), (.98, .7), (.98, .84), (.02, .88)]], "detail": [],
     "strokes": [[(.12, .78), (.3, .5), (.5, .76)], [(.5, .74), (.68, .48), (.86, .72)], seg(.3, .5, .68, .48),
                 [(.05, .8), (.1, .55), (.22, .6)]]},  # sandal
    _garment([(.3, .04), (.7, .04), (.72, .96), (.28, .96)], [SLEEVE_LONG, mirror(SLEEVE_LONG)],
             [[(.38, .04), (.5, .2), (.62, .04)], *[seg(.5, y, .5, y + .03) for y in (.3, .45, .6, .75, .9)],
              [(.3, .04), (.4, .16)], [(.7, .04), (.6, .16)]]),  # shirt
    _garment([(.02, .86), (.02, .62), (.3, .52), (.5, .44), (.62, .5), (.8, .62), (.98, .7), (.98, .88)],
             details=[seg(.02, .78, .98, .8), seg(.4, .52, .5, .6), seg(.48, .5, .58, .58)]),  # sneaker
    {"fill": [[(.08, .32), (.92, .32), (.92, .96), (.08, .96)]], "strokes": [arc(.5, .34, .26, .26, 180, 360)],
     "detail": [seg(.08, .5, .92, .5)]},  # bag
    _garment([(.18, .04), (.52, .04), (.56, .5), (.94, .66), (.98, .9), (.12, .9), (.16, .5)],
             details=[seg(.12, .82, .98, .84), seg(.18, .12, .52, .12)]),  # ankle boot
]


# CIFAR-10 objects, side view facing right: body polygons, leg/tail strokes, and parts in a
# second colour.
LEG = 0.035


OBJECTS = [
    {"fill": [ring(.5, .5, .46, .07), [(.44, .5), (.3, .86), (.4, .86), (.62, .5)],
              [(.46, .49), (.4, .24), (.46, .24), (.6, .49)], [(.1, .5), (.04, .26), (.14, .26), (.24, .49)]],
     "strokes": [], "part": [[(.62, .46), (.88, .46), (.88, .49), (.62, .49)]]},  # airplane
    {"fill": [[(.02, .56), (.98, .56), (.98, .78), (.02, .78)], [(.24, .57), (.34, .34), (.68, .34), (.82, .57)]],
     "strokes": [], "part": [ring(.25, .8, .11), ring(.76, .8, .11), [(.36, .38), (.66, .38), (.75, .54), (.3, .54)]]},  # automobile
    {"fill": [ring(.45, .56, .28, .16), ring(.74, .38, .11), [(.2, .52), (0, .44), (.04, .64), (.22, .62)]],
     "strokes": [seg(.43, .7, .41, .9), seg(.52, .7, .54, .9)],
     "part": [[(.84, .34), (.99, .4), (.84, .44)], ring(.42, .52, .18, .08)]},  # bird
    {"fill": [ring(.45, .66, .25, .28), ring(.56, .3, .17), [(.42, .22), (.45, .02), (.56, .15)],
              [(.6, .15), (.7, .02), (.72, .22)]],
     "strokes": [arc(.17, .66, .16, .22, 90, 200)], "part": [ring(.5, .28, .035), ring(.63, .28, .035)]},  # cat
    {"fill": [ring(.45, .5, .3, .13), [(.64, .46), (.72, .2), (.8, .22), (.76, .52)], ring(.83, .21, .1, .06)],
     "strokes": [seg(.24, .55, .22, .96), seg(.33, .56, .35, .96), seg(.58, .56, .56, .96), seg(.66, .55, .68, .96),
                 [(.76, .16), (.72, .02)], seg(.74, .08, .65, .04), [(.82, .15), (.88, .02)]],
     "part": [ring(.35, .47, .04), ring(.47, .45, .04), ring(.56, .5, .035)]},  # deer
    {"fill": [ring(.45, .52, .28, .14), ring(.78, .35, .13), [(.86, .34), (.99, .4), (.86, .46)]],
     "strokes": [seg(.25, .55, .24, .86), seg(.33, .56, .34, .86), seg(.57, .56, .56, .86), seg(.65, .55, .66, .86),
                 seg(.18, .46, .07, .28)],
     "part": [[(.72, .28), (.66, .54), (.76, .5)], ring(.97, .4, .03)]},  # dog
    {"fill": [ring(.5, .66, .38, .2), ring(.34, .44, .1), ring(.66, .44, .1),
              [(.14, .7), (0, .95), (.34, .9)], [(.86, .7), (1.0, .95), (.66, .9)]],
     "strokes": [], "part": [ring(.34, .42, .045), ring(.66, .42, .045), ring(.5, .72, .06)]},  # frog
    {"fill": [ring(.45, .5, .3, .14), [(.62, .46), (.74, .12), (.84, .14), (.76, .52)],
              [(.74, .1), (.99, .3), (.94, .37), (.78, .26)]],
     "strokes": [seg(.24, .56, .22, .99), seg(.33, .57, .35, .99), seg(.58, .57, .56, .99), seg(.66, .56, .68, .99),
                 [(.16, .45), (.06, .72)]],
     "part": [[(.7, .1), (.74, .1), (.64, .44), (.6, .42)], ring(.9, .3, .025)]},  # horse
    {"fill": [[(0, .55), (1.0, .55), (.86, .8), (.12, .8)], [(.34, .34), (.7, .34), (.7, .56), (.34, .56)],
              [(.48, .1), (.56, .1), (.56, .35), (.48, .35)]],
     "strokes": [], "part": [[(.04, .6), (.96, .6), (.93, .65), (.07, .65)], ring(.44, .44, .035), ring(.6, .44, .035)]},  # ship
    {"fill": [[(0, .24), (.64, .24), (.64, .78), (0, .78)], [(.64, .42), (.84, .42), (.98, .6), (.98, .78), (.64, .78)]],
     "strokes": [], "part": [ring(.15, .8, .1), ring(.44, .8, .1), ring(.83, .8, .1),
                             [(.7, .46), (.82, .46), (.92, .6), (.7, .6)]]},  # truck
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
