"""aemc: mode connectivity of autoencoders, as a library.

The scripts at the top of the repository (train.py, eval_curve.py, ...) turn command-line flags
into settings and call this package; `dataset`, `trainer` and `utils` are the original project's
modules (the data's flags, the training loop, CLI plumbing). The package imports only `models`
and third-party code. Its modules, by job:

    settings      the typed settings every function takes (data, optimisation, speed, ...)
    errors        UserError and friends: expected failures, reported in one line
    cli           argparse plumbing: one-line flag errors, no traceback for expected failures
    files         atomic writes, SHA-256 digests, run directories
    architectures a factory's name and keyword arguments -> a module (built-in or the user's)
    data          images as one in-memory uint8 tensor: CelebA, folders, synthetic faces; loaders
    checkpoints   the checkpoint schema: save atomically, load safely, rebuild the model
    objective     a batch's training objective (reconstruction + beta * KL + curve weight decay)
    evaluation    one set of weights evaluated with BatchNorm re-estimated (PointEvaluator)
    paths         walks along curves and segments: statistics, barriers, length
    barriers      barriers under the literature's names (mean of the ends, line, midpoint), any metric
    layerwise     paths that interpolate one layer (or the encoder or the decoder), the rest at the start
    reports       the files an evaluation writes and reads back (JSON, NPZ, figures)
    resumable     long evaluations written point by point, resumed after a stop
    geometry      the plane through three points of weight space
    alignment     weight and activation matching of hidden units
    learned_matching  permutations learned to lower the segment's loss (straight-through estimator)
    latent        a map of one latent space onto another, folded into the weights
    stitching     model stitching: A's bottom, a fitted map, B's top; the penalty at every cut
    channel_maps  maps between two models' activations (permutation, Procrustes, least squares)
    repair        REPAIR: a point's per-channel statistics rescaled to the ends' interpolation
    ensembles     ensembles of autoencoders scored like one model
    studies       the study's plan of stages, its state file and its table
    scheduling    running a study's stages: several at once here, or as SLURM jobs (submitit)
    intervals     results over seed pairs: mean, sd, paired differences with t intervals
    study_tables  a study's results read from its stages' reports: tables, CSV, figures
    symmetry_study the symmetry study: every way of undoing the symmetry, stitching, per-layer tables
    tracking      TensorBoard and Weights & Biases logging
    prose         the README's generated demo table and sentences (make media)
    distributed   torchrun: one code path for 1..N processes
    speed         mixed precision, channels_last, torch.compile, backend switches
    losses        L1, Laplacian pyramid, real AlexNet LPIPS
    figures       plots, plane contours, GIFs and image grids
"""
