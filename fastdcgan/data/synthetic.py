"""Procedural cartoon faces: a vectorised numpy renderer and the SyntheticFaces dataset.

Every face is a set of implicit shapes (ellipses, boxes, parabolas) in a face-local frame
(u right, v down, 1 unit ~ half the face width) that is shifted, scaled and tilted per face.
A batch of faces is rendered at once: each feature is evaluated on one pixel window that holds
it in every face of the batch, its signed distance is turned into an anti-aliased coverage
(a one-pixel linear ramp across the edge) and painted over what is already there. The finest
features (eyes, mouth) are sampled DETAIL_SS x DETAIL_SS times per pixel and box-filtered down;
the rest rely on the analytic edge ramp alone (exact box-filter coverage for straight edges, and
capped for lines thinner than a pixel).

Parameters are drawn per chunk of CHUNK faces from a generator seeded by (seed, chunk index), so
face i depends only on (seed, i): SyntheticFaces(n=100) is a prefix of SyntheticFaces(n=1000).
"""
import gc
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from fastdcgan.data._common import FaceDataset, load_cached, save_cached
from fastdcgan.data._common import cache_dir as default_cache_dir

# Bump whenever the pictures change: it is part of the cache key.
RENDERER_VERSION = 2
CHUNK = 256  # faces per seeded parameter draw; fixed so that face i never depends on n
BATCH = 64  # faces rendered together: amortises numpy call overhead; the windows still fit in L2
DETAIL_SS = 2
MAX_SHIFT = 0.06  # faces sit within +-MAX_SHIFT (image fractions) of the centre

f32 = np.float32

_SKIN = np.array([  # light to dark anchors, interpolated
    [1.00, 0.87, 0.77], [0.96, 0.78, 0.64], [0.87, 0.66, 0.50],
    [0.72, 0.51, 0.36], [0.54, 0.36, 0.24], [0.36, 0.23, 0.15]])
_HAIR = np.array([  # black, dark brown, brown, auburn, ginger, blonde, platinum, grey
    [0.07, 0.06, 0.06], [0.22, 0.14, 0.09], [0.42, 0.28, 0.16], [0.50, 0.20, 0.10],
    [0.78, 0.42, 0.18], [0.86, 0.72, 0.44], [0.93, 0.88, 0.74], [0.62, 0.62, 0.64]])
_HAIR_P = [0.24, 0.22, 0.17, 0.07, 0.06, 0.12, 0.04, 0.08]
_IRIS = np.array([  # dark brown, brown, hazel, green, blue, grey
    [0.22, 0.12, 0.06], [0.42, 0.25, 0.10], [0.50, 0.42, 0.18], [0.25, 0.48, 0.25],
    [0.25, 0.45, 0.75], [0.48, 0.55, 0.60]])
_IRIS_P = [0.3, 0.25, 0.12, 0.1, 0.15, 0.08]

# Hair styles as values of one parametric hair model (see _render): a cap ellipse (centre v,
# half-width relative to the face, half-height) whose outline is bumpy (curls) or spiky, cut
# below a hairline v = h0 + hk*u^2 (+ skew*u + fringe jag) and above v = top (only the sides of
# bald heads), plus optional hair hanging behind the head down to v = back.
_STYLES = {  # name: probability, cap_cv, cap_w, cap_h, curl, spike, h0, hk, fringe, top, back range
    "short":    (0.21, -0.28, 1.08, 1.30, 0.00, 0.00, -0.85, 0.55, 0.00, -9.0, None),
    "long":     (0.22, -0.30, 1.14, 1.36, 0.00, 0.00, -0.95, 1.25, 0.00, -9.0, (1.2, 2.6)),
    "bangs":    (0.15, -0.30, 1.12, 1.33, 0.00, 0.00, -0.50, 0.25, 0.05, -9.0, (0.4, 1.0)),
    "bald":     (0.11, -0.28, 1.08, 1.30, 0.00, 0.00, -2.50, 2.90, 0.00, -0.75, None),
    "receding": (0.07, -0.28, 1.08, 1.30, 0.00, 0.00, -1.25, 1.00, 0.00, -9.0, None),
    "curly":    (0.17, -0.45, 1.45, 1.60, 0.10, 0.00, -0.85, 0.60, 0.00, -9.0, None),
    "spiky":    (0.07, -0.30, 1.08, 1.30, 0.00, 0.16, -0.80, 0.55, 0.00, -9.0, None),
}
_STYLE_KEYS = ("cap_cv", "cap_w", "cap_h", "curl", "spike", "h0", "hk", "fringe", "top")


def _hsv(h, s, v):
    """Vectorised HSV -> RGB, all in [0, 1]; returns (n, 3)."""
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _sample(rng, m):
    """All random parameters of m faces as float32 arrays; the draw order is part of the format."""
    def U(lo, hi):
        return rng.uniform(lo, hi, m)

    def pick(table, prob):
        return table[rng.choice(len(table), m, p=prob)]

    P = {}
    # placement (image fractions) and face shape (face units)
    P["cx"], P["cy"] = U(0.5 - MAX_SHIFT, 0.5 + MAX_SHIFT), U(0.5 - MAX_SHIFT, 0.5)
    P["scale"], P["tilt"] = U(0.2, 0.25), U(-0.14, 0.14)
    P["fw"], P["fh"], P["jaw"] = U(0.84, 1.0), U(1.18, 1.38), U(0.08, 0.35)
    # colours
    t = U(0.0, 1.0) ** 1.2 * (len(_SKIN) - 1)
    skin = np.stack([np.interp(t, np.arange(len(_SKIN)), _SKIN[:, c]) for c in range(3)], 1)
    P["skin"] = np.clip(skin * (1 + rng.uniform(-0.04, 0.04, (m, 3))), 0, 1)
    natural = np.clip(pick(_HAIR, _HAIR_P) * (1 + rng.uniform(-0.12, 0.12, (m, 1))), 0, 1)
    P["beard_col"] = natural * 0.85
    P["hair"] = np.where(rng.random((m, 1)) < 0.05, _hsv(rng.random(m), U(0.5, 0.8), U(0.5, 0.9)), natural)
    P["brow"] = natural * U(0.45, 0.8)[:, None]
    P["bg0"] = _hsv(rng.random(m), U(0.05, 0.6), U(0.35, 0.97))
    P["bg1"] = np.clip(P["bg0"] * U(0.55, 1.2)[:, None] + rng.uniform(-0.15, 0.15, (m, 3)), 0, 1)
    ang = U(0, 2 * math.pi)
    P["bg_dx"], P["bg_dy"], P["bg_r"] = np.cos(ang), np.sin(ang), U(-1.2, 1.2) * (rng.random(m) < 0.4)
    P["cloth"] = _hsv(rng.random(m), U(0.0, 0.8), U(0.12, 0.9))
    P["iris"] = np.clip(pick(_IRIS, _IRIS_P) * (1 + rng.uniform(-0.1, 0.1, (m, 3))), 0, 1)
    lip = P["skin"] * np.array([0.86, 0.58, 0.58]) * U(0.85, 1.0)[:, None]
    P["lip"] = np.where(rng.random((m, 1)) < 0.12, _hsv(U(-0.04, 0.04) % 1.0, U(0.55, 0.85), U(0.5, 0.85)), lip)
    # hair style
    names = list(_STYLES)
    style = rng.choice(len(names), m, p=[_STYLES[k][0] for k in names])
    table = np.array([_STYLES[k][1:10] for k in names])
    P.update({key: table[style, j] for j, key in enumerate(_STYLE_KEYS)})
    P["style"] = style
    P["cap_w"] = P["cap_w"] * P["fw"] * U(0.97, 1.06)
    P["cap_h"] = P["cap_h"] * U(0.97, 1.05)
    P["h0"] = P["h0"] + U(-0.08, 0.08)
    P["skew"] = U(-0.25, 0.25) * (style != names.index("bald"))
    ranges = np.array([_STYLES[k][10] or (0.0, 0.0) for k in names])
    P["back"] = ranges[style, 0] + U(0, 1) * (ranges[style, 1] - ranges[style, 0])
    P["strand_f"], P["strand_ph"] = U(8, 14), U(0, 2 * math.pi)
    P["curl_fx"], P["curl_fy"] = U(11, 16), U(11, 16)
    for j in range(4):
        P[f"curl_p{j}"] = U(0, 2 * math.pi)
    P["spike"] = P["spike"] * U(0.7, 1.3)
    P["spike_f"], P["spike_ph"] = U(2.5, 4.0), U(0, 1)
    # ears, neck, clothes
    P["ear_y"], P["ear_w"], P["ear_h"] = U(-0.12, 0.05), U(0.13, 0.19), U(0.24, 0.32)
    P["neck_w"] = P["fw"] * U(0.45, 0.6)
    P["sh_top"], P["sh_w"], P["collar"] = U(0.45, 0.7), U(1.7, 2.4), U(0.12, 0.45)
    # eyes and brows
    P["ex"], P["ey"] = U(0.34, 0.45), U(-0.2, -0.04)
    P["ew"] = U(0.14, 0.2)
    P["eh"] = np.where(rng.random(m) < 0.06, U(0.012, 0.022), U(0.065, 0.115))  # some squint/close
    P["ir"] = np.minimum(P["eh"] * U(0.85, 1.15), P["ew"] * 0.6)
    P["gx"], P["gy"] = U(-0.35, 0.35) * (P["ew"] - P["ir"]), U(-0.2, 0.2) * P["eh"]
    P["pupil"] = U(0.35, 0.55)
    P["by"], P["bw"], P["bt"] = P["ey"] - U(0.17, 0.27), U(0.14, 0.22), U(0.022, 0.055)
    P["b_ang"], P["b_curv"] = U(-0.3, 0.35), U(0.0, 1.6)
    # nose and mouth
    P["ny"], P["nw"], P["n_side"] = U(0.26, 0.42), U(0.06, 0.11), np.sign(U(-1, 1))
    P["my"], P["mw"] = P["ny"] + U(0.28, 0.4), U(0.2, 0.34)
    P["m_curv"] = U(-0.13, 0.05)
    P["m_open"] = U(0.03, 0.17) * (rng.random(m) < 0.45)
    P["lt"] = U(0.022, 0.05)
    P["teeth"] = rng.random(m) < 0.7
    # extras: glasses, beard, moustache, blush
    P["glasses"] = rng.random(m) < 0.25
    P["g_w"], P["g_h"], P["g_rect"] = P["ew"] + U(0.07, 0.12), P["eh"] + U(0.07, 0.13), rng.random(m)
    P["g_ft"], P["g_dy"] = U(0.015, 0.035), U(-0.02, 0.04)
    P["g_frame"] = _hsv(rng.random(m), U(0.0, 0.8), U(0.05, 0.6))
    P["g_tint"] = np.where(rng.random(m) < 0.2, U(0.75, 0.92), U(0.0, 0.12))
    beard = rng.random(m)
    P["beard"] = np.where(beard < 0.1, 0.95, np.where(beard < 0.18, 0.4, 0.0))
    P["beard_top"], P["beard_k"] = U(0.2, 0.45), U(0.3, 0.9)
    P["goatee"] = np.where(rng.random(m) < 0.3, U(0.25, 0.45), 5.0)
    P["moustache"] = np.where(rng.random(m) < 0.15, 0.95, P["beard"])
    P["blush"] = U(0.12, 0.3) * (rng.random(m) < 0.3)
    return {k: np.asarray(v, f32) for k, v in P.items()}


_MOUTH = np.array([0.3, 0.06, 0.08], f32)[None, :, None, None]
_TEETH = np.array([0.96, 0.94, 0.88], f32)[None, :, None, None]
_LASH = np.array([0.1, 0.07, 0.07], f32)[None, :, None, None]
_WHITE = np.array([0.96, 0.95, 0.93], f32)[None, :, None, None]
_PUPIL = np.array([0.03, 0.03, 0.03], f32)[None, :, None, None]
_SHINE = np.array([1.0, 1.0, 1.0], f32)[None, :, None, None]
_BLUSH = np.array([0.95, 0.4, 0.42], f32)[None, :, None, None]
_LENS = np.array([0.05, 0.05, 0.08], f32)[None, :, None, None]


class _Params(dict):
    """Per-face parameters shaped to broadcast over (B, h, w) (scalars) or (B, 3, h, w) (colours),
    optionally restricted to the faces idx; entries are built on first use."""

    def __init__(self, P, idx=None):
        super().__init__()
        self.P, self.idx = P, idx

    def __missing__(self, key):
        v = self.P[key] if self.idx is None else self.P[key][self.idx]
        v = v[:, None, None] if v.ndim == 1 else v[:, :, None, None]
        self[key] = v
        return v


def _ellipse(U, V, cu, cv, a, b):
    """Signed distance to an axis-aligned ellipse, to first order: (q - 1) / |grad q| for
    q = ((U-cu)/a)^2 + ((V-cv)/b)^2. Accurate near the outline however elongated the ellipse,
    so its edge is one pixel soft all round and it never reaches past its box (+ its blur)."""
    x = np.subtract(U, cu)
    x *= 1 / a
    y = np.subtract(V, cv)
    y *= 1 / b
    gx = x * (1 / a)
    gy = y * (1 / b)
    x *= x
    y *= y
    x += y
    x -= 1
    gx *= gx
    gy *= gy
    gx += gy
    np.sqrt(gx, out=gx)
    gx *= 2
    x /= gx  # -inf at the very centre: covered
    return x


def _ellipse_round(U, V, cu, cv, a, b):
    """Cheaper distance for near-circular ellipses: exact on the axes, and off by at most the
    aspect ratio elsewhere (edges ~1 pixel soft for the big, round-ish shapes it is used for)."""
    x = np.subtract(U, cu)
    x *= 1 / a
    x *= x
    y = np.subtract(V, cv)
    y *= 1 / b
    y *= y
    x += y
    np.sqrt(x, out=x)
    x -= 1
    x *= np.minimum(a, b)
    return x


def _render(P, size):
    """Render the faces described by P into uint8 (B, size, size, 3).

    Each face is drawn centred (up to its sub-pixel offset) on a canvas `margin` pixels larger than
    the image on every side, then cropped at its integer offset: a feature then sits at nearly the
    same canvas pixels in every face of the batch, and one slice of the canvas holds it in all."""
    B, R = len(P["cx"]), size
    margin = int(round(MAX_SHIFT * R)) + 1  # > the largest integer offset
    C = R + 2 * margin
    s = P["scale"] * R  # pixels per face unit
    off_x, off_y = P["cx"] * R - R / 2, P["cy"] * R - R / 2
    ix, iy = np.rint(off_x), np.rint(off_y)
    fcx, fcy = C / 2 + (off_x - ix), C / 2 + (off_y - iy)  # face centre on the canvas
    cos, sin = np.cos(P["tilt"]), np.sin(P["tilt"])
    g = _Params(P)
    img = np.empty((B, 3, C, C), f32)

    # background: linear + radial gradient in image coordinates (separable, so cheap)
    a = (np.arange(C, dtype=f32) + (0.5 - margin)) / R - 0.5
    ax, ay = a + (ix / R)[:, None], a + (iy / R)[:, None]
    tx = ax * P["bg_dx"][:, None] + ax * ax * P["bg_r"][:, None] + 0.5
    ty = ay * P["bg_dy"][:, None] + ay * ay * P["bg_r"][:, None]
    for ch in range(3):  # colour = bg0 + (bg1 - bg0) * (tx + ty), one broadcast add per channel
        dc = (P["bg1"][:, ch] - P["bg0"][:, ch])[:, None]
        np.add((tx * dc + P["bg0"][:, ch, None])[:, None, :], (ty * dc)[:, :, None], out=img[:, ch])

    acos, asin = np.abs(cos), np.abs(sin)

    flat = img.reshape(-1)
    chan = (np.arange(3) * (C * C))[None, :, None, None]

    def region(u0, u1, v0, v1, ss=1, on=None, tight=False):
        """A window holding the face-unit box [u0,u1]x[v0,v1] of the faces `on` (all by default),
        shapes sampled ss x ss per pixel; None if empty. paint() into it, then commit().

        By default one canvas slice covers the box of every face (a view, painted in place);
        tight=True gives each face a same-sized window at its own place, gathered into one
        array: dearer per pixel, but for small features whose position varies from face to face
        it is far fewer pixels."""
        sel = slice(None)
        if on is not None:
            sel = np.flatnonzero(on)
            if sel.size == 0:
                return None
        uc, vc, hu, hv = (u0 + u1) * 0.5, (v0 + v1) * 0.5, (u1 - u0) * 0.5, (v1 - v0) * 0.5
        xc, xh = fcx + s * (uc * cos - vc * sin), s * (hu * acos + hv * asin)
        yc, yh = fcy + s * (uc * sin + vc * cos), s * (hu * asin + hv * acos)
        xc, xh, yc, yh = (t[sel] for t in np.broadcast_arrays(xc, xh, yc, yh))
        if tight:
            r0 = np.maximum((yc - yh).astype(int) - 1, 0)
            c0 = np.maximum((xc - xh).astype(int) - 1, 0)
            h = min(int((yc + yh - r0).max()) + 2, C)
            w = min(int((xc + xh - c0).max()) + 2, C)
            r0, c0 = np.minimum(r0, C - h), np.minimum(c0, C - w)  # same-size windows stay inside
            faces = np.arange(B)[sel]
            at = (faces * (3 * C * C) + r0 * C + c0)[:, None, None, None] + chan
            at = at + (np.arange(h) * C)[:, None] + np.arange(w)
            dst, put = flat[at], at
        else:
            r0 = max(int((yc - yh).min()) - 1, 0)
            c0 = max(int((xc - xh).min()) - 1, 0)
            h = min(int((yc + yh).max()) + 2, C) - r0
            w = min(int((xc + xh).max()) + 2, C) - c0
            dst = img[sel, :, r0:r0 + h, c0:c0 + w]
            put = None if on is None else (sel, slice(r0, r0 + h), slice(c0, c0 + w))
        if h <= 0 or w <= 0:
            return None
        py = np.asarray(r0, f32)[..., None] + (np.arange(h * ss, dtype=f32) + 0.5) / ss
        px = np.asarray(c0, f32)[..., None] + (np.arange(w * ss, dtype=f32) + 0.5) / ss
        si = s[sel][:, None]
        xs = ((px - fcx[sel][:, None]) / si)[:, None, :]  # face units, untilted
        ys = ((py - fcy[sel][:, None]) / si)[:, :, None]
        cs, sn = cos[sel][:, None, None], sin[sel][:, None, None]
        return SimpleNamespace(U=xs * cs + ys * sn, V=ys * cs - xs * sn, xs=xs, ys=ys, ss=ss, k=(si * ss)[:, :, None],
                               dst=dst, put=put, g=g if on is None else _Params(P, sel))

    def commit(r):
        """Write back a gathered window (a plain window of all faces is a view, painted in place)."""
        if isinstance(r.put, np.ndarray):
            flat[r.put] = r.dst
        elif r.put is not None:
            img[r.put[0], :, r.put[1], r.put[2]] = r.dst

    def cov(r, d, blur=None, alpha=None, width=None):
        """Coverage of {d < 0}: a linear ramp one sample (or `blur` face units) wide across the edge.
        For a line `width` face units wide (d = |distance to its centre| - width/2), coverage is
        also capped at the width in samples, so lines thinner than a pixel come out faint, not fat."""
        d *= -r.k if blur is None else -1 / np.maximum(1 / r.k, blur)
        d += 0.5
        np.clip(d, 0, 1 if width is None else np.minimum(width * r.k, 1), out=d)
        if alpha is not None:
            d *= alpha
        return d

    def paint(r, c, colour, shade=None):
        """Blend colour (times shade, if given) over r.dst by coverage c, box-filtered down to
        pixels when supersampled. One channel at a time: numpy is ~10x slower when an operand
        broadcasts along a middle axis."""
        if r.ss > 1:
            n = r.ss
            c = sum(c[:, i::n, j::n] for i in range(n) for j in range(n)) * (1 / n**2)
        for ch in range(3):
            dst = r.dst[:, ch]
            t = colour[:, ch] if shade is None else colour[:, ch] * shade
            t = t - dst
            t *= c
            dst += t

    def curls(r):
        """An irregular field of blobs in [-1, 1] (a product of two uneven waves, one along x and
        one along y: cheap, being separable), or None where no face in r has curly hair."""
        G = r.g
        if not G["curl"].any():
            return None
        wx = np.sin(r.xs * G["curl_fx"] + G["curl_p0"]) + 0.5 * np.sin(r.xs * (1.7 * G["curl_fx"]) + G["curl_p1"])
        wy = np.sin(r.ys * G["curl_fy"] + G["curl_p2"]) + 0.5 * np.sin(r.ys * (1.9 * G["curl_fy"]) + G["curl_p3"])
        return wx * (wy * (1 / 2.25))

    def hair_tex(r, field):
        """Brightness of hair: vertical strands, and the curls field where curly."""
        t = 1 + 0.1 * np.sin(r.xs * r.g["strand_f"] + r.g["strand_ph"])
        return t if field is None else t * (1 + 1.5 * r.g["curl"] * field)

    # back hair: the cap ellipse united with a box hanging down to length `back`
    cw = P["cap_w"] * 1.12
    r = region(-cw, cw, P["cap_cv"] - P["cap_h"], P["back"] + 0.08, on=P["back"] > 0)
    if r:
        G = r.g
        jag = 0.06 * np.sin(r.xs * 11 + G["strand_ph"])
        box = np.maximum(np.maximum(np.abs(r.U) - G["cap_w"] * 1.12, r.V - G["back"] - jag), G["cap_cv"] - r.V)
        d = np.minimum(_ellipse_round(r.U, r.V, 0, G["cap_cv"], G["cap_w"] * 1.1, G["cap_h"]), box)
        paint(r, cov(r, d), G["hair"] * 0.8, hair_tex(r, None))  # no curly style has back hair
        commit(r)

    # clothes: the top of a wide ellipse; then the neck, its lower end cut as a round collar
    st = P["fh"] + P["sh_top"]
    r = region(-P["sh_w"], P["sh_w"], st, 9.0)
    paint(r, cov(r, _ellipse_round(r.U, r.V, 0, g["fh"] + g["sh_top"] + 1.6, g["sh_w"], 1.6)), g["cloth"])
    commit(r)
    r = region(-P["neck_w"], P["neck_w"], 0.6, st + P["collar"])
    U = r.U / g["neck_w"]
    d = r.V - (g["fh"] + g["sh_top"]) - g["collar"] * (1 - 0.6 * U * U)
    np.maximum(d, (np.abs(U) - 1) * g["neck_w"], out=d)
    paint(r, cov(r, d), g["skin"] * 0.78)
    commit(r)

    # ears
    for side in (-1, 1):
        ex = side * P["fw"] * 0.95
        r = region(ex - P["ear_w"], ex + P["ear_w"], P["ear_y"] - P["ear_h"], P["ear_y"] + P["ear_h"], tight=True)
        d = _ellipse(r.U, r.V, side * g["fw"] * 0.95, g["ear_y"], g["ear_w"], g["ear_h"])
        paint(r, cov(r, d), g["skin"] * 0.88)
        commit(r)

    # face: an egg-shaped oval (the jaw tapers toward the chin), darker toward its rim
    r = region(-P["fw"], P["fw"], -P["fh"], P["fh"])
    vn = r.V / g["fh"]
    taper = np.clip(vn, 0, 1)
    taper *= taper
    taper *= -g["jaw"]
    taper += 1
    taper *= g["fw"]
    r2 = np.divide(r.U, taper, out=taper)
    r2 *= r2
    vn *= vn
    r2 += vn
    shade = r2 * r2
    shade *= -0.14
    shade += 1.04
    shade -= 0.05 * r.U
    d = np.sqrt(r2, out=r2)
    d -= 1
    d *= g["fw"]
    paint(r, cov(r, d), g["skin"], shade)
    commit(r)

    # cheek blush
    r = region(-P["ex"] - 0.35, P["ex"] + 0.35, P["ny"] - 0.2, P["ny"] + 0.2, on=P["blush"] > 0, tight=True)
    if r:
        G = r.g
        d = _ellipse(np.abs(r.U), r.V, G["ex"] + 0.05, G["ny"], 0.15, 0.08)
        paint(r, cov(r, d, blur=0.12, alpha=G["blush"]), _BLUSH)
        commit(r)

    # beard: the jaw below a curve that rises to sideburns, optionally narrowed to a goatee
    r = region(-P["fw"] * 1.1, P["fw"] * 1.1, P["beard_top"] - P["beard_k"] * 1.5, P["fh"] * 1.1, on=P["beard"] > 0)
    if r:
        G = r.g
        vn = r.V / (G["fh"] * 1.05)
        taper = 1 - G["jaw"] * np.clip(vn, 0, 1) ** 2
        d = (np.sqrt((r.U / (G["fw"] * 1.05 * taper)) ** 2 + vn * vn) - 1) * G["fw"]
        u2 = r.U * r.U
        d = np.maximum(d, G["beard_top"] - G["beard_k"] * u2 * u2 - r.V)
        if (G["goatee"] < 5).any():  # a goatee: only the part inside an ellipse round the chin
            np.maximum(d, _ellipse(r.U, r.V, 0, G["fh"], G["goatee"], G["fh"] - G["beard_top"] + 0.1), out=d)
        paint(r, cov(r, d, alpha=G["beard"]), G["beard_col"], hair_tex(r, curls(r)))
        commit(r)

    # nose: soft shadow down one side, shadow under the tip, nostrils, a highlight on the tip
    r = region(-P["nw"] - 0.15, P["nw"] + 0.15, P["ey"] - 0.05, P["ny"] + 0.15, tight=True)
    U, V = r.U, r.V
    d = _ellipse(U, V, g["n_side"] * 0.07, (g["ey"] + g["ny"]) * 0.5, 0.035, (g["ny"] - g["ey"]) * 0.5)
    paint(r, cov(r, d, blur=0.08, alpha=0.35), g["skin"] * 0.7)
    paint(r, cov(r, _ellipse(U, V, 0, g["ny"] + 0.03, g["nw"], 0.04), blur=0.08, alpha=0.45), g["skin"] * 0.65)
    paint(r, cov(r, _ellipse(np.abs(U), V, g["nw"] * 0.55, g["ny"] + 0.02, 0.03, 0.02), alpha=0.7), g["skin"] * 0.4)
    paint(r, cov(r, _ellipse(U, V, 0, g["ny"] - 0.05, 0.035, 0.03), blur=0.08, alpha=0.5), np.minimum(g["skin"] * 1.15, 1))
    commit(r)

    # mouth: the region between two parabolas (smile/frown curvature, opening), lips around it,
    # teeth in the upper part of the opening
    lo, hi = np.minimum(P["m_curv"], 0), np.maximum(P["m_curv"], 0)
    r = region(-1.1 * P["mw"], 1.1 * P["mw"], P["my"] + lo - 0.35 * P["m_open"] - P["lt"],
               P["my"] + hi + P["m_open"] + 1.3 * P["lt"], ss=DETAIL_SS, tight=True)
    mw, op, lt = g["mw"], g["m_open"], g["lt"]
    MU = r.U / mw
    MV = r.V - g["my"]
    edge = 1 - MU * MU
    c = g["m_curv"] * MU * MU
    top, bot = c - 0.35 * op * edge, c + op * edge
    paint(r, cov(r, np.maximum(np.maximum(top - lt - MV, MV - bot - lt * 1.3), (np.abs(MU) - 1.06) * mw)), g["lip"])
    inner = np.maximum(np.maximum(top - MV, MV - bot), (np.abs(MU) - 1) * mw)
    teeth = np.maximum(inner, MV - top - 0.45 * op * edge)
    paint(r, cov(r, inner), _MOUTH)
    paint(r, cov(r, teeth, alpha=g["teeth"]), _TEETH)
    commit(r)
    r = region(-P["mw"], P["mw"], P["my"] - P["lt"] - 0.15 - np.abs(P["m_curv"]), P["my"] - P["lt"] + 0.02,
               on=P["moustache"] > 0, tight=True)
    if r:
        G = r.g
        d = _ellipse(r.U, r.V + G["m_curv"] * (r.U / G["mw"]) ** 2, 0, G["my"] - G["lt"] - 0.07, G["mw"] * 0.95, 0.06)
        paint(r, cov(r, d, alpha=G["moustache"]), G["beard_col"])
        commit(r)

    # eyes: lash outline, white, iris, pupil, highlight (the gaze is shared by both eyes)
    ew, eh, ir = g["ew"], g["eh"], g["ir"]
    for side in (-1, 1):
        ex = side * P["ex"]
        r = region(ex - P["ew"] - 0.03, ex + P["ew"] + 0.03, P["ey"] - P["eh"] - 0.05, P["ey"] + P["eh"] + 0.02,
                   ss=DETAIL_SS, tight=True)
        EU = r.U - side * g["ex"]
        EV = r.V - g["ey"]
        d = _ellipse(EU, EV, 0, 0, ew, eh)
        paint(r, cov(r, d - 0.025), _LASH)  # lash line: the white grown by 0.025
        white = cov(r, d)
        paint(r, white, _WHITE)
        EU -= g["gx"]
        EV -= g["gy"]
        rad = np.sqrt(EU * EU + EV * EV)
        paint(r, cov(r, rad - ir) * white, g["iris"])
        paint(r, cov(r, rad - ir * g["pupil"]) * white, _PUPIL)
        EU += ir * 0.35
        EV += ir * 0.35
        paint(r, cov(r, np.sqrt(EU * EU + EV * EV) - ir * 0.25) * white, _SHINE)
        commit(r)

    # eyebrows: arched bars above the eyes, tilted symmetrically
    for side in (-1, 1):
        ex = side * P["ex"]
        bend = np.abs(P["b_ang"]) * P["bw"] + P["bt"] + 0.03  # how far the arched, tilted bar strays
        r = region(ex - P["bw"] - 0.05, ex + P["bw"] + 0.05, P["by"] - bend - P["b_curv"] * P["bw"] ** 2, P["by"] + bend,
                   tight=True)
        BU = side * r.U - g["ex"]
        BV = r.V - g["by"] + BU * g["b_ang"] + g["b_curv"] * BU * BU
        paint(r, cov(r, _ellipse(BU, BV, 0, 0, g["bw"], g["bt"]), width=2 * g["bt"]), g["brow"])
        commit(r)

    # front hair: the cap ellipse (bumpy when curly, jagged when spiky) above the hairline and
    # below `top`; the window ends where the hairline leaves the cap
    grow = P["curl"] + P["spike"]
    cw = P["cap_w"] + grow
    low = np.minimum(P["cap_cv"] + P["cap_h"], P["h0"] + P["hk"] * cw * cw + np.abs(P["skew"]) * cw + P["fringe"])
    r = region(-cw, cw, np.maximum(P["cap_cv"] - P["cap_h"] - grow, P["top"]), low + grow)
    U, V = r.U, r.V
    d = _ellipse_round(U, V, 0, g["cap_cv"], g["cap_w"], g["cap_h"])
    field = curls(r)
    if field is not None:
        d += g["curl"] * field
    if g["spike"].any():  # a triangle wave along x pushes the outline out into spikes
        tri = np.abs(2 * np.modf(r.xs * g["spike_f"] + g["spike_ph"] + 8)[0] - 1)
        d -= g["spike"] * (1 - tri)
    hl = g["h0"] + g["fringe"] * np.sin(r.xs * 25)
    hl = hl + (g["hk"] * U + g["skew"]) * U
    np.subtract(V, hl, out=hl)
    np.maximum(d, hl, out=d)
    if (g["top"] > -9).any():
        np.maximum(d, g["top"] - V, out=d)
    paint(r, cov(r, d), g["hair"], hair_tex(r, field))
    commit(r)

    # glasses: tinted lenses, then frame rings (round to rectangular), bridge and temples
    r = region(-P["fw"] * 1.05, P["fw"] * 1.05, P["ey"] + P["g_dy"] - P["g_h"] - 0.05,
               P["ey"] + P["g_dy"] + P["g_h"] + 0.05, on=P["glasses"])
    if r:
        G = r.g
        U, V = r.U, r.V
        gy = G["ey"] + G["g_dy"]
        nx = np.abs(np.abs(U) - G["ex"]) / G["g_w"]
        ny = np.abs(V - gy) / G["g_h"]
        d = (np.sqrt(nx * nx + ny * ny) * (1 - G["g_rect"]) + np.maximum(nx, ny) * G["g_rect"] - 1) * G["g_h"]
        bar = np.abs(V - gy + G["g_h"] * 0.4) - G["g_ft"]
        bridge = np.maximum(np.abs(U) - G["ex"] + G["g_w"] * 0.9, bar)
        temple = np.maximum(np.maximum(G["ex"] + G["g_w"] * 0.9 - np.abs(U), np.abs(U) - G["fw"] * 1.02), bar)
        frame = np.minimum(np.abs(d) - G["g_ft"], np.minimum(bridge, temple))
        paint(r, cov(r, d, alpha=G["g_tint"]), _LENS)
        paint(r, cov(r, frame, width=2 * G["g_ft"]), G["g_frame"])
        commit(r)

    # quantise, crop every face at its offset, interleave the channels (NHWC)
    img *= 255
    img += 0.5
    np.clip(img, 0, 255, out=img)
    q = img.astype(np.uint8)  # truncating x + 0.5: round half up
    out = np.empty((B, R, R, 3), np.uint8)
    for b in range(B):
        y0, x0 = margin - int(iy[b]), margin - int(ix[b])
        for ch in range(3):
            out[b, :, :, ch] = q[b, ch, y0:y0 + R, x0:x0 + R]
    return out


def _render_chunk(seed, k, size):
    """All CHUNK faces of chunk k. Whole chunks are rendered so that the batches, and so the
    pixels, never depend on how many faces were asked for."""
    P = _sample(np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(k,)))), CHUNK)
    faces = np.empty((CHUNK, size, size, 3), np.uint8)
    order = np.lexsort((P["scale"], P["style"]))  # batch faces of one hair style and similar size
    for b in range(0, CHUNK, BATCH):
        idx = order[b:b + BATCH]
        faces[idx] = _render({key: v[idx] for key, v in P.items()}, size)
    return faces


def render_faces(n, size=64, seed=0, progress=None):
    """Faces 0..n-1 of the stream for `seed`, as uint8 (n, size, size, 3); `progress(k)` is
    called after each k faces."""
    out = np.empty((n, size, size, 3), np.uint8)
    gc_enabled = gc.isenabled()
    gc.disable()  # rendering makes no reference cycles; collections would only cost time
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # see _ellipse
            for start in range(0, n, CHUNK):
                m = min(CHUNK, n - start)
                out[start:start + m] = _render_chunk(seed, start // CHUNK, size)[:m]
                if progress is not None:
                    progress(m)
    finally:
        if gc_enabled:
            gc.enable()
    return out


class SyntheticFaces(FaceDataset):
    """n procedurally rendered cartoon faces (size x size RGB), the same bytes for the same seed
    on every run; face i depends only on (seed, i). Rendered once into a uint8 cache keyed by
    (n, size, seed, RENDERER_VERSION); later constructions load it."""

    def __init__(self, n=20000, size=64, seed=0, cache_dir=None):
        if n < 1 or size < 8 or seed < 0:
            raise ValueError(f"need n >= 1, size >= 8 and seed >= 0, got n={n}, size={size}, seed={seed}")
        self.seed = seed
        self.cache_path = Path(default_cache_dir() if cache_dir is None else cache_dir) / (
            f"synthetic-v{RENDERER_VERSION}-n{n}-{size}px-seed{seed}.npy")
        images = load_cached(self.cache_path, size)
        if images is None or len(images) != n:
            with tqdm(total=n, desc="rendering synthetic faces", unit="img") as bar:
                images = render_faces(n, size, seed, progress=bar.update)
            save_cached(self.cache_path, images)
        super().__init__(images)
