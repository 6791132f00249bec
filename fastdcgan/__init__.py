"""fastdcgan: a DCGAN face generator trained and run through fused Triton kernels."""
from fastdcgan.models import Discriminator, Generator, weights_init
from fastdcgan.sampler import CapturedGenerator

__version__ = "0.1.0"
__all__ = ["Generator", "Discriminator", "CapturedGenerator", "weights_init", "__version__"]
