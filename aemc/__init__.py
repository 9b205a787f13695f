"""aemc: mode connectivity of autoencoders, as a library.

The scripts at the top of the repository (train.py, eval_curve.py, ...) turn command-line flags
into settings and call this package; `dataset`, `trainer` and `utils` are the original project's
modules (the data's flags, the training loop, CLI plumbing). The package imports only `models`
and third-party code. Its modules, by job:

    settings      the typed settings every function takes (data, optimisation, speed, ...)
    errors        UserError and friends: expected failures, reported in one line
    files         atomic writes, SHA-256 digests, run directories
    data          images as one in-memory uint8 tensor: CelebA, folders, synthetic faces; loaders
    checkpoints   the checkpoint schema: save atomically, load safely, rebuild the model
    evaluation    one set of weights evaluated with BatchNorm re-estimated (PointEvaluator)
    paths         walks along curves and segments: statistics, barriers, length
    reports       the files an evaluation writes and reads back (JSON, NPZ, figures)
    resumable     long evaluations written point by point, resumed after a stop
    geometry      the plane through three points of weight space
    alignment     weight and activation matching of hidden units
    ensembles     ensembles of autoencoders scored like one model
    studies       the study's plan of stages, its state file and its table
    distributed   torchrun: one code path for 1..N processes
    speed         mixed precision, channels_last, torch.compile, backend switches
    losses        L1, Laplacian pyramid, real AlexNet LPIPS
    figures       plots, plane contours, GIFs and image grids
"""
