"""Training checkpoints: one file with both networks, both optimizers, progress, RNG states and
the config. Written atomically; read with weights_only=True; foreign or corrupt files get a
clear error. Bare pytorch/examples `netG_epoch_N.pth` state_dicts load as generators too."""
from pathlib import Path

import torch

from fastdcgan.images import atomic_write
from fastdcgan.models import Generator

FORMAT = "fastdcgan-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a usable checkpoint (corrupt, foreign, or for another model shape)."""


def save(path, payload):
    """Atomically writes payload (a dict of tensors and plain values) with the format tag."""
    data = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def read(path, map_location="cpu"):
    """Loads any torch file safely; turns every failure into an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # garbage bytes fail in many ways inside the unpickler
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a PyTorch checkpoint "
                              f"({msg})") from None


def load_training(path, map_location="cpu"):
    """A fastdcgan training checkpoint, validated; refuses anything else with the reason."""
    ckpt = read(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        kind = "a bare generator state_dict" if _is_generator_state(ckpt) else "not a fastdcgan checkpoint"
        raise CheckpointError(f"{path} is {kind}; --resume needs a checkpoint written by "
                              "fastdcgan.train (a pytorch/examples netG file works with "
                              "fastdcgan.generate only)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer fastdcgan (checkpoint version "
                              f"{ckpt['version']} > {VERSION})")
    missing = [k for k in ("netG", "netD", "optG", "optD", "step", "config") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is an incomplete fastdcgan checkpoint: missing {missing}")
    return ckpt


def _strip_prefix(state):
    """DataParallel / torch.compile prefixes -> plain example keys."""
    out = {}
    for k, v in state.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _is_generator_state(obj):
    if not isinstance(obj, dict):
        return False
    try:
        generator_from_state(obj)
        return True
    except (CheckpointError, AttributeError):
        return False


def generator_from_state(state, source="state_dict", backend="auto"):
    """Builds a Generator whose nz/ngf/nc are read off the weights and loads the state into it."""
    state = _strip_prefix(state)
    first, last = state.get("main.0.weight"), state.get("main.12.weight")
    if not (isinstance(first, torch.Tensor) and isinstance(last, torch.Tensor)
            and first.dim() == 4 and last.dim() == 4):
        raise CheckpointError(f"{source} holds no DCGAN generator weights (expected keys "
                              f"main.0.weight ... main.12.weight, got {sorted(state)[:6]}...)")
    nz, ngf8 = first.shape[:2]
    ngf, nc = last.shape[:2]
    if ngf8 != 8 * ngf or "main.11.weight" in state or "main.10.weight" not in state:
        raise CheckpointError(f"{source} is not a DCGAN generator: main.0.weight {tuple(first.shape)}, "
                              f"main.12.weight {tuple(last.shape)} (a discriminator's weights?)")
    G = Generator(nz=nz, ngf=ngf, nc=nc, backend=backend)
    load_module_state(G, state, "generator", source)
    return G


def load_generator(path, device="cpu", backend="auto"):
    """A Generator in eval mode from a fastdcgan checkpoint or a bare pytorch/examples netG file."""
    ckpt = read(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        state = ckpt.get("netG")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} is a fastdcgan checkpoint without generator weights")
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise CheckpointError(f"{path} is neither a fastdcgan checkpoint nor a generator state_dict "
                              f"(got {type(ckpt).__name__})")
    return generator_from_state(state, source=str(path), backend=backend).to(device).eval()


def load_module_state(module, state, what, source):
    """load_state_dict with an error naming the file and which network did not fit."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: {what} weights are missing or not a state_dict")
    try:
        module.load_state_dict(_strip_prefix(state))
    except RuntimeError as e:
        raise CheckpointError(f"{source}: {what} weights do not fit this model: {e}") from None
