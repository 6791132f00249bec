"""Training-stability warnings: GANs fail quietly, so watch the numbers while training.

Three detectors, each fed per step (losses) or per interval (samples) and returning a warning
message (naming the step and the evidence) or None, and `StabilityMonitor`, which the trainer
calls and which rate-limits each kind of warning to once per `cooldown` steps:

    monitor = StabilityMonitor()
    try:
        for msg in monitor.update(step, loss_d, loss_g, d_x, d_g_z):
            tqdm.write(msg)                      # and log it; monitor.history keeps them all
        if step % sample_every == 0:
            for msg in monitor.check_samples(step, G(fixed_noise), real_batch):
                tqdm.write(msg)
    except NonFiniteError as e:                  # stop; the last checkpoint is the good one
        tqdm.write(str(e))

Losses are those of the pytorch/examples DCGAN: loss_d = BCE(D(x), 1) + BCE(D(G(z)), 0),
loss_g = BCE(D(G(z)), 1); d_x and d_g_z are the batch means of D's probabilities.
"""
import math
from collections import deque

WINDOW = 200             # steps averaged by the loss detectors
D_LOSS_MAX = 0.05        # D winning: mean D loss below this (D(x) ~ 0.98, D(G(z)) ~ 0.02 or better)
D_G_Z_MAX = 0.05         # ... and mean D(G(z)) below this
G_LOSS_MAX = 20.0        # exploding: mean G loss above this (D(G(z)) ~ 2e-9); healthy runs stay < 10
COLLAPSE_RATIO = 0.35    # collapse: a fake diversity measure below this fraction of the real one
WARMUP_STEPS = 500       # no sample checks before this step: an untrained G has little diversity
MAX_DIVERSITY_SAMPLES = 256  # diversity uses at most this many images per set (cost ~ N^2)


class NonFiniteError(FloatingPointError):
    """A loss or D output became NaN/Inf: stop training and keep the last checkpoint."""

    def __init__(self, step, values):
        self.step = step
        self.values = dict(values)
        bad = ", ".join(f"{k}={v}" for k, v in self.values.items() if not math.isfinite(v))
        super().__init__(f"step {step}: training diverged: non-finite {bad}; stopping (keep the "
                         "last checkpoint; lower the learning rates or check the data)")


class DiscriminatorWinsDetector:
    """D loss near 0 and D(G(z)) near 0, averaged over `window` steps: G gets no useful gradient."""

    def __init__(self, window=WINDOW, d_loss_max=D_LOSS_MAX, d_g_z_max=D_G_Z_MAX):
        self.window, self.d_loss_max, self.d_g_z_max = window, d_loss_max, d_g_z_max
        self._recent = deque(maxlen=window)

    def update(self, step, loss_d, d_x, d_g_z):
        self._recent.append((float(loss_d), float(d_x), float(d_g_z)))
        if len(self._recent) < self.window:
            return None
        loss, dx, dgz = (sum(v) / self.window for v in zip(*self._recent))
        if loss >= self.d_loss_max or dgz >= self.d_g_z_max:
            return None
        return (f"step {step}: discriminator is winning outright: D loss {loss:.3g} (mean of last "
                f"{self.window} steps, warn below {self.d_loss_max}), D(x) {dx:.3f} and D(G(z)) "
                f"{dgz:.3g} (warn below {self.d_g_z_max}); the generator gets almost no gradient. "
                "Try a lower D learning rate or restart from an earlier checkpoint.")


class DivergenceDetector:
    """Raises NonFiniteError on NaN/Inf; warns when the mean G loss over `window` steps explodes."""

    def __init__(self, window=WINDOW, g_loss_max=G_LOSS_MAX):
        self.window, self.g_loss_max = window, g_loss_max
        self._recent = deque(maxlen=window)

    def update(self, step, loss_d, loss_g, d_x, d_g_z):
        values = {"loss_d": float(loss_d), "loss_g": float(loss_g), "D(x)": float(d_x),
                  "D(G(z))": float(d_g_z)}
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteError(step, values)
        self._recent.append(values["loss_g"])
        if len(self._recent) < self.window:
            return None
        mean = sum(self._recent) / self.window
        if mean <= self.g_loss_max:
            return None
        return (f"step {step}: generator loss is exploding: G loss {mean:.3g} (mean of last "
                f"{self.window} steps, warn above {self.g_loss_max}), last {self._recent[-1]:.3g}; "
                "training is diverging. Lower the learning rates or restart from an earlier "
                "checkpoint.")


def sample_diversity(images):
    """Diversity of a batch (N >= 2, any shape per image) in RMS-pixel units (L2 / sqrt(dim)).

    Returns (mean pairwise distance, mean distance to the nearest other image). The first drops
    when all samples look alike; the second also when they fall into a few repeated modes.
    Uses at most the first MAX_DIVERSITY_SAMPLES images; computed on CPU in float64.
    """
    x = images[:MAX_DIVERSITY_SAMPLES].detach().flatten(1).cpu().double()
    n, dim = x.shape
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    gram = x @ x.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt() / math.sqrt(dim)
    mean_pairwise = dist.sum().item() / (n * (n - 1))  # the diagonal is 0
    dist.fill_diagonal_(math.inf)
    return mean_pairwise, dist.min(dim=1).values.mean().item()


class ModeCollapseDetector:
    """Generated samples far less diverse than real samples measured the same way.

    Fires when the mean pairwise distance or the mean nearest-neighbour distance of the fakes
    falls below `ratio` times the real value. Real diversity is measured on as many real images
    as there are fakes (nearest-neighbour distance shrinks with N), so pass real batches at
    least as large as the fake ones; the last real batch given is reused when none is passed.
    """

    def __init__(self, ratio=COLLAPSE_RATIO):
        self.ratio = ratio
        self._real = None

    def set_real(self, real):
        """Keeps (a CPU copy of the first MAX_DIVERSITY_SAMPLES of) real samples for later checks."""
        self._real = real[:MAX_DIVERSITY_SAMPLES].detach().cpu()

    def check(self, step, fake, real=None):
        if real is not None:
            self.set_real(real)
        if self._real is None:
            raise ValueError("mode-collapse check needs real samples at least once")
        n = min(len(fake), MAX_DIVERSITY_SAMPLES)
        if len(self._real) < n:
            raise ValueError(f"{len(self._real)} real samples for {n} fakes; pass at least as many "
                             "real samples as fake ones")
        fake_pw, fake_nn = sample_diversity(fake[:n])
        real_pw, real_nn = sample_diversity(self._real[:n])
        pw_ratio = fake_pw / max(real_pw, 1e-12)
        nn_ratio = fake_nn / max(real_nn, 1e-12)
        if min(pw_ratio, nn_ratio) >= self.ratio:
            return None
        return (f"step {step}: possible mode collapse: {n} generated samples are far less diverse "
                f"than real ones: mean pairwise distance {fake_pw:.3g} vs {real_pw:.3g} real "
                f"(ratio {pw_ratio:.2f}), nearest-neighbour distance {fake_nn:.3g} vs {real_nn:.3g} "
                f"(ratio {nn_ratio:.2f}); warn below ratio {self.ratio}. Look at the samples; "
                "restart from an earlier checkpoint or lower the learning rates.")


class StabilityMonitor:
    """All detectors, with each kind of warning emitted at most once per `cooldown` steps.

    update() and check_samples() return the new warning messages (usually an empty list);
    `history` keeps every emitted (step, kind, message). update() raises NonFiniteError (after
    recording it in history) when a value is NaN/Inf. Sample checks are skipped before
    `warmup` steps. cooldown defaults to `window`.
    """

    def __init__(self, window=WINDOW, cooldown=None, warmup=WARMUP_STEPS, d_loss_max=D_LOSS_MAX,
                 d_g_z_max=D_G_Z_MAX, g_loss_max=G_LOSS_MAX, collapse_ratio=COLLAPSE_RATIO):
        self.cooldown = window if cooldown is None else cooldown
        self.warmup = warmup
        self.d_wins = DiscriminatorWinsDetector(window, d_loss_max, d_g_z_max)
        self.divergence = DivergenceDetector(window, g_loss_max)
        self.collapse = ModeCollapseDetector(collapse_ratio)
        self.history = []
        self._last = {}  # kind -> step of its last warning

    def _emit(self, step, found):
        out = []
        for kind, msg in found:
            if msg is None:
                continue
            last = self._last.get(kind)
            if last is not None and step - last < self.cooldown:
                continue
            self._last[kind] = step
            self.history.append((step, kind, msg))
            out.append(msg)
        return out

    def update(self, step, loss_d, loss_g, d_x, d_g_z):
        """Feeds one training step (floats or 0-d tensors); returns new warning messages."""
        try:
            diverging = self.divergence.update(step, loss_d, loss_g, d_x, d_g_z)
        except NonFiniteError as e:
            self.history.append((step, "non_finite", str(e)))
            raise
        return self._emit(step, [("d_wins", self.d_wins.update(step, loss_d, d_x, d_g_z)),
                                 ("g_loss_explodes", diverging)])

    def check_samples(self, step, fake_samples, real_samples=None):
        """Compares the diversity of generated samples (e.g. G(fixed_noise)) with real ones.

        real_samples may be given once (even during warmup) and is then reused."""
        if real_samples is not None:
            self.collapse.set_real(real_samples)
        if step < self.warmup:
            return []
        return self._emit(step, [("mode_collapse", self.collapse.check(step, fake_samples))])
