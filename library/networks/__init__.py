"""Shared machinery for the network plug-ins under networks/ (LoRA, DyLoRA, OFT, ...).

* `args`       -- `--network_args` validation and conversion (unknown keys are errors).
* `discovery`  -- finding the layers to adapt by container class name, kohya key names
                  (including the canonical `text_model.` path of CLIP text encoders).
* `blocks`     -- U-Net block indices (SD1/2 diffusers layout, SDXL LDM layout) and the
                  block-wise learning-rate weights / ranks.
* `modules`    -- the per-layer adapter base class (hooking, multiplier, merging).
* `network`    -- the network base class: the interface the trainer calls.
* `weights_io` -- reading and writing network weight files (safetensors with sshs_*
                  hashes, or torch pickles), atomically.

Nothing here imports an entry script or a networks/ module.
"""
