"""vdit: text-to-video latent diffusion transformers on JAX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vdit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
