"""Pallas flash-attention kernels: `flash_gpu` (Triton lowering), `flash_tpu` (Mosaic); what they
share lives in `common`. Call them through `vdit.ops.attention`."""
