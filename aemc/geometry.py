"""The plane through three points of weight space (Garipov et al., NeurIPS 2018, Fig. 1 and their
`plane.py`): an orthonormal basis, plane coordinates of any point, and the points of a grid.

w0, w1, w2 are parameter vectors (parameters only, not BatchNorm buffers), in float64:
u = (w2 - w0) / dx with dx = ||w2 - w0||; v = the part of (w1 - w0) orthogonal to u, divided by its
norm dy. The point with plane coordinates (x, y) is w0 + x u + y v; coordinates are weight-space
distances, so w0 sits at (0, 0), w2 at (dx, 0) and w1 at (u . (w1 - w0), dy).

Example::
    >>> plane = Plane(vector(start), vector(middle), vector(end))
    >>> xs, ys = plane.grid(21, margins=(0.2, 0.2, 0.2, 0.2))
    >>> theta = plane.weights(xs[3], ys[5], names_and_shapes(start))   # {name: tensor}
"""
import numpy as np
import torch

# below these, the three points do not span a plane (relative to the size of the weights)
IDENTICAL = 1e-12
COLLINEAR = 1e-9


class DegeneratePlane(ValueError):
    pass


def vector(model):
    """The parameters of `model` (a module, or {name: tensor}) as one float64 numpy vector."""
    tensors = model.values() if isinstance(model, dict) else [p for _, p in model.named_parameters()]
    return np.concatenate([t.detach().cpu().double().numpy().ravel() for t in tensors])


def names_and_shapes(model):
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


class Plane:
    def __init__(self, w0, w1, w2, labels=("start", "middle", "end")):
        self.origin = np.asarray(w0, dtype=np.float64)
        scale = max(1.0, float(np.linalg.norm(self.origin)))
        along = np.asarray(w2, dtype=np.float64) - self.origin
        self.dx = float(np.linalg.norm(along))
        if self.dx <= IDENTICAL * scale:
            raise DegeneratePlane(f"the {labels[0]} and the {labels[2]} are the same point: they span no plane")
        self.u = along / self.dx
        side = np.asarray(w1, dtype=np.float64) - self.origin
        self.x1 = float(self.u @ side)  # w1 sits at (x1, dy)
        side = side - self.x1 * self.u
        self.dy = float(np.linalg.norm(side))
        if self.dy <= COLLINEAR * self.dx:
            raise DegeneratePlane(f"the {labels[1]} lies on the line through the {labels[0]} and the "
                                  f"{labels[2]} (its distance from it is {self.dy:.3g}): they span no plane")
        self.v = side / self.dy

    def coordinates(self, w):
        """(x, y, distance of w from the plane) of the parameter vector w."""
        offset = np.asarray(w, dtype=np.float64) - self.origin
        x, y = float(self.u @ offset), float(self.v @ offset)
        return x, y, float(np.linalg.norm(offset - x * self.u - y * self.v))

    def barycentric(self, x, y):
        """(a0, a1, a2) with a0 + a1 + a2 = 1 and a0 w0 + a1 w1 + a2 w2 = the point (x, y) of the
        plane: the weights of the three points that span it (negative outside their triangle)."""
        a1 = y / self.dy
        a2 = (x - a1 * self.x1) / self.dx
        return 1.0 - a1 - a2, a1, a2

    def point(self, x, y):
        """The parameter vector w0 + x u + y v (float64)."""
        return self.origin + x * self.u + y * self.v

    def grid(self, grid_points, margins):
        """x and y of a grid_points x grid_points grid spanning [-left dx, (1 + right) dx] by
        [-bottom dy, (1 + top) dy]; margins = (left, right, bottom, top)."""
        left, right, bottom, top = margins
        return (np.linspace(-left, 1 + right, grid_points) * self.dx,
                np.linspace(-bottom, 1 + top, grid_points) * self.dy)

    def weights(self, x, y, layout, device="cpu"):
        """{parameter name: float32 tensor} of the point (x, y), in `layout` [(name, shape), ...]."""
        flat = torch.from_numpy(self.point(x, y)).float()
        theta, start = {}, 0
        for name, shape in layout:
            size = int(np.prod(shape))
            theta[name] = flat[start:start + size].view(shape).to(device)
            start += size
        return theta
