"""Figures of a walk along a path: metric-vs-t plots, reconstruction GIFs and strips.

matplotlib (its Figure API: no pyplot, no global backend state, works headless), torchvision and
imageio take seconds to import, which every process of every script would pay before its first
step: the functions that draw import them.
"""
import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"curve": "tab:blue", "segment": "tab:red", "aligned_segment": "tab:green",  # by PathKey.name
           "repaired_segment": "tab:orange", "aligned_repaired_segment": "tab:purple"}
SCALE = 2      # reconstructions are 64x64: drawn at 2x in GIFs and strips
HEADER = 22    # pixels of caption above each GIF frame


def plot_metric(walks, key, ylabel, path, title=None):
    """`key` against t for every walk {PathKey: {"ts": [...], "train_<key>": [...], "test_<key>": [...]}}:
    train solid, test dashed, one colour per path (as in Garipov et al.'s figures)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for path_key, walk in walks.items():
        for split, style in (("train", "-"), ("test", "--")):
            values = walk.get(f"{split}_{key}")
            if values is not None:
                ax.plot(walk["ts"], values, style, marker="o", markersize=3, color=COLOURS.get(path_key.name),
                        label=f"{path_key.label}, {split}")
    ax.set_xlabel("t")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_ensemble(walks, loss_name, path, title=None):
    """Two panels against t for every walk: the diversity from each end, and the gain of the
    ensemble of the point with each end (mean of the two members' losses - the ensemble's loss)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4), dpi=120)
    left, right = fig.subplots(1, 2)
    for key, walk in walks.items():
        colour = COLOURS.get(key.name)
        for side, style in (("start", "-"), ("end", "--")):
            left.plot(walk["ts"], walk[f"diversity_{side}"], style, marker="o", markersize=3, color=colour,
                      label=f"{key.label}, from the {side}")
            right.plot(walk["ts"], walk[f"ensemble_{side}_loss_gain"], style, marker="o", markersize=3,
                       color=colour, label=f"{key.label}, with the {side}")
    left.set_ylabel("diversity: mean |f_t(x) - f_end(x)|")
    right.set_ylabel(f"ensemble gain ({loss_name}): members' mean - ensemble")
    for ax in (left, right):
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_layerwise(walks, loss_name, path, title=None):
    """The test-loss barriers of each layer-wise path (one group of layers interpolated, the rest at
    the start), as horizontal bars in the model's order, with the whole segment's as lines."""
    from matplotlib.figure import Figure
    groups = [(key, walk) for key, walk in walks.items() if key.kind == "layerwise"]
    whole = next(walk for key, walk in walks.items() if key.kind == "segment")
    fig = Figure(figsize=(7, 0.35 * len(groups) + 1.6), dpi=120)
    ax = fig.subplots()
    y = np.arange(len(groups))[::-1]
    for offset, (name, colour) in zip((0.2, -0.2), (("barrier_mean_ends", "tab:red"), ("barrier_line", "tab:blue"))):
        ax.barh(y + offset, [w["barriers"]["test_loss"][name] for _, w in groups], height=0.38, color=colour,
                label=name)
        ax.axvline(whole["barriers"]["test_loss"][name], color=colour, linestyle="--", linewidth=1,
                   label=f"{name}, all layers")
    ax.set_yticks(y, [key.group for key, _ in groups], fontsize=7)
    ax.set_xlabel(f"test {loss_name} barrier (images in [-1, 1])")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_ensembles(table, loss_name, path, title=None):
    """Test loss against the number of members, one colour per family of ensembles (row["family"]:
    curve, segment, endpoints, ...): the ensemble's loss (solid) and the mean of its members' (dashed)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    families = {}
    for row in table.values():
        families.setdefault(row["family"], []).append((len(row["keys"]), row))
    for family, rows in families.items():
        colour = COLOURS.get(family, "black" if family == "endpoints" else None)
        ks = [k for k, _ in rows]
        ax.plot(ks, [r["ensemble"]["loss"] for _, r in rows], "-", marker="o", color=colour,
                label=f"{family}: ensemble")
        ax.plot(ks, [r["member_mean"]["loss"] for _, r in rows], "--", marker="x", color=colour,
                label=f"{family}: mean of its members")
    ax.set_xlabel("members")
    ax.set_ylabel(f"test {loss_name} loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_loss_grid(rows, path):
    """One small panel per (loss, pair of inits): test loss against t along every path evaluated."""
    from matplotlib.figure import Figure
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    pairs = list(dict.fromkeys((r["start"], r["end"]) for r in rows))
    fig = Figure(figsize=(3.2 * len(pairs), 2.6 * len(losses)), dpi=110)
    axes = fig.subplots(len(losses), len(pairs), squeeze=False)
    for row in rows:
        ax = axes[losses.index(row["loss"])][pairs.index((row["start"], row["end"]))]
        for key, walk in row["walks"].items():
            ax.plot(walk["ts"], walk["test_loss"], "-", marker="o", markersize=2, color=COLOURS.get(key.name),
                    label=key.label)
        ax.set_title(f"{row['loss']}: {row['start']} / {row['end']}", fontsize=8)
        ax.set_xlabel("t", fontsize=7)
        ax.set_ylabel(f"test {row['loss']} loss", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def _over_pairs(ax, rows, x_key, y_key, colour, label):
    """Every pair's values against x as a thin line, and their mean with the standard deviation as
    error bars (one pair: the line alone)."""
    import numpy as np
    xs = sorted({row[x_key] for row in rows})
    pairs = sorted({row.get("pair", 1) for row in rows})
    by = {(row[x_key], row.get("pair", 1)): row[y_key] for row in rows}
    for pair in pairs:
        ax.plot(xs, [by.get((x, pair), np.nan) for x in xs], "-", color=colour, linewidth=0.6, alpha=0.35)
    values = [[by[(x, p)] for p in pairs if (x, p) in by] for x in xs]
    means = [float(np.mean(v)) for v in values]
    spread = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    ax.errorbar(xs, means, yerr=spread, fmt="-o", color=colour, capsize=3, markersize=4,
                label=f"{label} (mean ± sd, {len(pairs)} pair{'s' if len(pairs) > 1 else ''})")
    return xs


def plot_width(rows, path):
    """barrier_line of the test loss against the base width f (log scale), one line per path: the
    segment, the aligned segment, aligned + REPAIR, the trained curve (Ainsworth et al.'s Fig. 4):
    the mean over pairs with error bars, and every pair as a thin line."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    paths = (("segment", "segment", "tab:red"), ("aligned_segment", "aligned segment", "tab:green"),
             ("aligned_repaired_segment", "aligned segment + REPAIR", "tab:purple"),
             ("curve", "trained curve", "tab:blue"))
    for prefix, label, colour in paths:
        widths = _over_pairs(ax, rows, "width", f"{prefix}_barrier_line", colour, label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    _save_barrier_plot(fig, ax, "width f (filters of the first layer)",
                       "test loss barrier_line (images in [-1, 1])", path)


def plot_instability(rows, path):
    """The barrier of the segment between two copies spawned at epoch K against K (Frankle et al.
    2020, Fig. 1): the mean over parent runs with error bars, every parent's as a thin line."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for name, colour in (("barrier_mean_ends", "tab:red"), ("barrier_line", "tab:blue")):
        _over_pairs(ax, rows, "spawn_epoch", f"segment_{name}", colour, name)
    _save_barrier_plot(fig, ax, "epoch K the copies were spawned at", "test loss barrier between the copies", path)


def plot_stitching(layers, ylabel, path, title=None):
    """The stitching penalty (test loss of the stitched model - mean of the ends') against depth, a
    line per direction (A into B, B into A), the layers' names as ticks (as Bansal et al. 2021 plot it)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(6, 0.6 * len(layers) + 2), 4.5), dpi=120)
    ax = fig.subplots()
    x = np.arange(len(layers))
    for key, colour in zip(layers[0]["directions"] if layers else (), ("tab:blue", "tab:red")):
        ax.plot(x, [r["directions"][key]["penalty"]["loss"] for r in layers], "-o", color=colour, markersize=4,
                label=layers[0]["directions"][key]["label"])
    ax.set_xticks(x, [r["layer"] for r in layers], rotation=45, ha="right", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    _save_barrier_plot(fig, ax, "stitched after layer (deeper to the right)", ylabel, path)


def _save_barrier_plot(fig, ax, xlabel, ylabel, path):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def save_rows(rows, path):
    """Save image rows (each (K, 3, H, W) in [-1, 1]) as one PNG grid, a row per tensor."""
    import torchvision.utils as vutils
    vutils.save_image(torch.cat(rows).float().cpu(), path, nrow=len(rows[0]), normalize=True,
                      value_range=(-1, 1))


def _to_pil(images, nrow):
    """(N, 3, 64, 64) in [-1, 1] -> a PIL grid scaled by SCALE."""
    import torchvision.utils as vutils
    from torchvision.transforms.functional import to_pil_image
    grid = vutils.make_grid(images.float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1),
                            pad_value=1.0)
    img = to_pil_image(grid)
    return img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)


def reconstruction_frames(originals, recons, ts, label, prior=None):
    """One frame per t: originals (top) above their reconstructions at t, captioned with t; with
    `prior` (a VAE's decodings of fixed prior samples, a list over t), a third row of those.

    originals: (K, C, H, W); recons, prior: lists over t of (K, C, H, W). Returns uint8 (H, W, 3) arrays.
    """
    frames = []
    caption = "top: test images" + ("; bottom: decoded prior samples" if prior is not None else "")
    for i, (t, rec) in enumerate(zip(ts, recons)):
        rows = [originals, rec] + ([prior[i][:len(originals)]] if prior is not None else [])
        grid = _to_pil(torch.cat(rows), nrow=len(originals))
        frame = Image.new("RGB", (grid.width, grid.height + HEADER), "white")
        frame.paste(grid, (0, HEADER))
        ImageDraw.Draw(frame).text((6, 5), f"{label}   t = {t:.2f}   ({caption})", fill="black")
        frames.append(np.asarray(frame))
    return frames


def save_gif(frames, path, seconds_per_frame=0.3):
    """An endlessly looping GIF of the frames (all the same size)."""
    import imageio.v3 as iio
    iio.imwrite(path, np.stack(frames), extension=".gif", duration=int(seconds_per_frame * 1000), loop=0)


def save_strip(originals, recons, ts, label, path):
    """All frames as one PNG for papers: a row of originals (unless None), then one row per t, labelled."""
    rows = ([originals] if originals is not None else []) + list(recons)
    grid = _to_pil(torch.cat(rows), nrow=len(recons[0]))
    margin = 70
    strip = Image.new("RGB", (grid.width + margin, grid.height + HEADER), "white")
    strip.paste(grid, (margin, HEADER))
    draw = ImageDraw.Draw(strip)
    draw.text((6, 5), label, fill="black")
    row_h = grid.height / len(rows)
    for i, text in enumerate((["input"] if originals is not None else []) + [f"t = {t:.2f}" for t in ts]):
        draw.text((6, HEADER + i * row_h + row_h / 2 - 5), text, fill="black")
    strip.save(path)


def plane_levels(values, count=12):
    """Contour levels for a loss surface: log-spaced above the minimum (as Garipov et al.'s plane
    figures), so the low valley gets most of the levels; NaN values are ignored."""
    finite = values[np.isfinite(values)]
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1e-12
    return low + (high - low) * (np.geomspace(1, 101, count) - 1) / 100


def plot_plane(geometry, values, what, path, has_curve, labels):
    """Filled contours of `values` (G x G, [i, j] at x = xs[i], y = ys[j]) over the plane, with the
    bends marked, the curve drawn, the segment between the ends dashed and diverged (NaN) points
    crossed out."""
    from matplotlib.figure import Figure
    xs, ys = geometry["xs"], geometry["ys"]
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    Z = np.ma.masked_invalid(values)
    fig = Figure(figsize=(7, 5), dpi=120)
    ax = fig.subplots()
    levels = plane_levels(values)
    filled = ax.contourf(X, Y, Z, levels=levels, cmap="viridis", extend="neither")
    ax.contour(X, Y, Z, levels=levels, colors="white", linewidths=0.4, alpha=0.6)
    fig.colorbar(filled, ax=ax, format="%.3g", label=what)
    bad = ~np.isfinite(values)
    if bad.any():
        ax.scatter(X[bad], Y[bad], marker="x", color="red", s=25, label="diverged (NaN)", zorder=5)
    bends = geometry["bend_coordinates"]
    ends = bends[[0, -1]]
    ax.plot(ends[:, 0], ends[:, 1], "--", color="white", linewidth=1.5, label="straight segment", zorder=3)
    if has_curve:
        curve = geometry["curve_coordinates"]
        ax.plot(curve[:, 0], curve[:, 1], "-", color="black", linewidth=2, label="curve", zorder=4)
        ax.scatter(bends[1:-1, 0], bends[1:-1, 1], marker="D", color="black", s=40, label="interior bends", zorder=6)
    else:
        ax.scatter(bends[1, 0], bends[1, 1], marker="o", color="black", s=50, zorder=6)
        ax.annotate(labels[1], bends[1], textcoords="offset points", xytext=(6, 6), fontsize=8, color="white")
    ax.scatter(ends[:, 0], ends[:, 1], marker="o", color="black", s=50, label="ends", zorder=6)
    ax.set_xlabel("x: along the segment (weight-space distance)")
    ax.set_ylabel("y: towards the middle point")
    ax.set_title(what, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
