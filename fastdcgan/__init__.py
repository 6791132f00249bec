"""fastdcgan: a DCGAN face generator trained and run through fused Triton kernels."""
from fastdcgan.models import Discriminator, Generator, weights_init

__version__ = "0.1.0"
__all__ = ["Generator", "Discriminator", "weights_init", "__version__"]
