"""Batches sliced from an in-memory uint8 image tensor, as float in [-1, 1] on the training device."""
import math

import torch


def to_float(batch):
    """uint8 [0, 255] -> float32 [-1, 1] (the decoder's Tanh range)."""
    return batch.float().div_(127.5).sub_(1.0)


def fits_on_device(images, device, share=0.5):
    """Whether `images` take less than `share` of the free memory of a CUDA device."""
    if device.type != "cuda":
        return device.type == "cpu"
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() < share * free


class TensorLoader:
    """Batches sliced from an in-memory uint8 image tensor, returned as float in [-1, 1] on `device`.

    With `shuffle`, each epoch has its own permutation from a generator seeded by (seed, epoch), so
    a resumed run sees the same batches as an uninterrupted one. `batches(start=k)` skips the first
    k batches of the epoch (mid-epoch resume).

    `resident`: keep the whole uint8 tensor on `device` and slice it there (default: on CUDA when it
    fits in half the free memory). Otherwise, on CUDA, the tensor is pinned and each batch is
    gathered into one of two pinned buffers and copied without blocking. The permutation is drawn
    on the CPU either way, so both give the same batches. `channels_last` sets the batch layout.
    """

    def __init__(self, images, batch_size, device="cpu", shuffle=False, seed=0, resident=None,
                 channels_last=False):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.channels_last = channels_last
        self.resident = fits_on_device(images, self.device) if resident is None else resident
        if self.resident:
            self.images = images.to(self.device)
        elif self.device.type == "cuda":
            self.images = images.pin_memory()
        else:
            self.images = images
        self._buffers = None  # pinned staging buffers and their copy-done events (CUDA, host data)

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    @property
    def num_images(self):
        return len(self.images)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def ordered(self):
        """The same images in a fixed order (for evaluation and BatchNorm re-estimation)."""
        return TensorLoader(self.images, self.batch_size, self.device, resident=self.resident,
                            channels_last=self.channels_last)

    def _staged(self, i, idx):
        """Gather host rows `idx` into pinned buffer i % 2 and start its copy to the device."""
        if self._buffers is None:
            shape = (self.batch_size, *self.images.shape[1:])
            self._buffers = [(torch.empty(shape, dtype=self.images.dtype).pin_memory(), torch.cuda.Event())
                             for _ in range(2)]
        buf, done = self._buffers[i % 2]
        done.synchronize()  # the copy that last used this buffer has finished
        torch.index_select(self.images, 0, idx, out=buf[:len(idx)])
        batch = buf[:len(idx)].to(self.device, non_blocking=True)
        done.record()
        return batch

    def batches(self, start=0):
        order = None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.images), generator=gen)
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, (i + 1) * self.batch_size
            if order is None:  # a contiguous slice: already pinned or resident
                batch = self.images[lo:hi].to(self.device, non_blocking=True)
            elif self.resident:
                batch = self.images[order[lo:hi].to(self.device)]
            elif self.device.type == "cuda":
                batch = self._staged(i, order[lo:hi])
            else:
                batch = self.images[order[lo:hi]].to(self.device)
            batch = to_float(batch)
            yield batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def __iter__(self):
        return self.batches()
