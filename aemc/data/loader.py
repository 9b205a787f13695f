"""Batches sliced from an in-memory uint8 image tensor, as float in [-1, 1] on the training device."""

import torch


def to_float(batch):
    """uint8 [0, 255] -> float32 [-1, 1] (the decoder's Tanh range)."""
    return batch.float().div_(127.5).sub_(1.0)


def fits_on_device(images, device, share=0.5):
    """Whether `images` take less than `share` of the free memory of a CUDA device. Memory that
    PyTorch holds in its cache but has not allocated counts as free, so repeated runs in one
    process (bench.py, notebooks) decide the same way."""
    if device.type != "cuda":
        return device.type == "cpu"
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return images.numel() * images.element_size() < share * free


class TensorLoader:
    """Batches sliced from an in-memory uint8 image tensor, returned as float in [-1, 1] on `device`.

    With `shuffle`, each epoch has its own permutation from a generator seeded by (seed, epoch), so
    a resumed run sees the same batches as an uninterrupted one. `batches(start=k)` skips the first
    k batches of the epoch (mid-epoch resume).

    `resident`: keep the whole uint8 tensor on `device` and slice it there (default: on CUDA when it
    fits in half the free memory); the epoch's permutation is moved there once, so no step waits
    for the host. Otherwise, on CUDA, the tensor stays in ordinary host memory and each batch is
    gathered into a pinned staging tensor and copied without blocking; PyTorch's pinned-memory
    cache reuses a staging block only once the copy from it has finished (it records an event on
    the stream of the copy), so batches never overwrite each other. The permutation is drawn on
    the CPU either way, so both give the same batches. `channels_last` sets the batch layout.
    """

    def __init__(self, images, batch_size, device="cpu", shuffle=False, seed=0, resident=None,
                 channels_last=False, shard=(0, 1)):
        self.device = torch.device(device)
        self.shard = shard  # (rank, world): `shares` yields this rank's part of every batch
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.channels_last = channels_last
        self.resident = fits_on_device(images, self.device) if resident is None else resident
        self.images = images.to(self.device) if self.resident else images.cpu()

    def __len__(self):
        """Batches per epoch (sharded: a last batch with fewer images than processes is dropped)."""
        full, rest = divmod(len(self.images), self.batch_size)
        return full + (rest >= self.shard[1] if rest else 0)

    @property
    def num_images(self):
        return len(self.images)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def ordered(self):
        """The same images in a fixed order (for evaluation and BatchNorm re-estimation)."""
        return TensorLoader(self.images, self.batch_size, self.device, resident=self.resident,
                            channels_last=self.channels_last)

    def _fetch(self, rows):
        """uint8 rows (a slice or an index tensor) of the images, on the device."""
        if self.images.device == self.device or self.resident:
            return self.images[rows]
        if self.device.type != "cuda":
            return self.images[rows].to(self.device)
        if isinstance(rows, slice):
            source = self.images[rows]
            staging = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            staging.copy_(source)
        else:
            staging = torch.empty((len(rows), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
            torch.index_select(self.images, 0, rows, out=staging)
        return staging.to(self.device, non_blocking=True)

    def shares(self, start=0):
        """(this rank's part of each batch, the batch's size), from batch `start` on: batch b of the
        epoch's order (the same whatever the number of processes) split into `world` contiguous,
        nearly equal parts. Unsharded: every batch whole."""
        rank, world = self.shard
        for rows in self._rows(start):
            size = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
            lo, hi = rank * size // world, (rank + 1) * size // world
            mine = slice(rows.start + lo, rows.start + hi) if isinstance(rows, slice) else rows[lo:hi]
            yield self._batch(mine), size

    def batches(self, start=0):
        """Whole batches (for evaluation, whatever the shard), from batch `start` on."""
        for rows in self._rows(start):
            yield self._batch(rows)

    def _rows(self, start):
        order = None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.images), generator=gen)
            if self.resident:
                order = order.to(self.device)
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, len(self.images))
            yield slice(lo, hi) if order is None else order[lo:hi]

    def _batch(self, rows):
        batch = to_float(self._fetch(rows))
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def __iter__(self):
        return self.batches()
