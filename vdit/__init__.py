"""vdit: text-to-video latent diffusion transformers on JAX."""

import glob
import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vdit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# libtpu (installed with the test extra, to compile for TPU pods ahead of time) prints start-up
# errors in every process on a machine without a TPU unless it is told which TPU it describes.
# Only where no TPU device exists; a real TPU VM sets these itself. There, too, libtpu's
# machine-wide lock file guards no chip, so several processes (tests, a training run, `vdit
# plan`) may load it at once.
if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
