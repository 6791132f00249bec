"""EpochBatches: the trainer's batch source, the whole uint8 set resident on the device."""
import math

import torch

from fastdcgan.data._common import U8_TO_UNIT, to_float


class EpochBatches:
    """Shuffled float32 batches (B, 3, H, W) in [-1, 1] from uint8 NHWC images, forever.

    The whole uint8 set is moved to `device` once (on CUDA it lives on the GPU) and every batch is
    gathered there with index_select and normalised right after: no DataLoader, no host copies.
    Epoch e visits torch.randperm(N, generator=torch.Generator().manual_seed(seed + e)) -- drawn on
    the CPU, so it is the same on every rank and machine -- in global batches of
    batch_size * world_size; rank r takes the r-th contiguous slice of each, so the ranks are
    disjoint and any world size sees the same global order.

    With drop_last=False the short last global batch is kept: it is padded (from the start of the
    epoch's order) to a multiple of world_size and split evenly, as DistributedSampler does.

    `epoch` and `steps_per_epoch` describe the next batch; state_dict()/load_state_dict() carry
    (epoch, position) so a resumed run continues with exactly the same batches.
    """

    def __init__(self, images_u8, batch_size, *, seed=0, device="cpu", rank=0, world_size=1, drop_last=True):
        images = torch.as_tensor(images_u8)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.n = len(images)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        if self.global_batch > self.n:
            what = f"batch size {batch_size}" + (f" x world size {world_size}" if world_size > 1 else "")
            raise ValueError(f"{what} is larger than the dataset ({self.n} images)")
        self.seed, self.drop_last = seed, drop_last
        self.device = torch.device(device)
        self.data = images.to(self.device)
        self.steps_per_epoch = self.n // self.global_batch if drop_last else math.ceil(self.n / self.global_batch)
        self.epoch, self.position = 0, 0
        self._perm, self._perm_epoch = None, None

    def __len__(self):
        return self.steps_per_epoch

    def _order(self):
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).to(self.device)
            self._perm_epoch = self.epoch
        return self._perm

    def indices(self):
        """Dataset indices of this rank's next batch (on the device), without advancing."""
        perm = self._order()
        start = self.position * self.global_batch
        if start + self.global_batch <= self.n:
            lo = start + self.rank * self.batch_size
            return perm[lo:lo + self.batch_size]
        tail = perm[start:]
        per = math.ceil(len(tail) / self.world_size)
        tail = torch.cat([tail, perm[:per * self.world_size - len(tail)]])
        return tail[self.rank * per:(self.rank + 1) * per]

    def next_indices(self):
        """Dataset indices of this rank's next batch (on the device), advancing past it."""
        idx = self.indices()
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return idx

    def gather(self, idx, dtype=torch.float32):
        """The float batch (B, 3, H, W) in [-1, 1] of dataset indices `idx` (a device tensor), in
        `dtype` (rounded from fp32). On CUDA one fused gather+normalise kernel (channels_last
        output), else eager ops."""
        if self.data.is_cuda and self.data.is_contiguous():
            from fastdcgan.kernels.gather import gather_normalize

            return gather_normalize(self.data, idx, U8_TO_UNIT, -1.0, dtype)
        return to_float(self.data.index_select(0, idx)).to(dtype)

    def next_batch(self):
        return self.gather(self.next_indices())

    def __iter__(self):
        """The remaining batches of the current epoch."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n": self.n, "global_batch": self.global_batch}

    def load_state_dict(self, state):
        if state["n"] != self.n or state["global_batch"] != self.global_batch:
            raise ValueError(f"batch state is for {state['n']} images in global batches of {state['global_batch']}, "
                             f"not {self.n} in {self.global_batch}")
        if not 0 <= state["position"] < self.steps_per_epoch:
            raise ValueError(f"batch state position {state['position']} is outside the epoch")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._perm_epoch = None
