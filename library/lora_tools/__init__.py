"""The shared core of the LoRA and checkpoint utilities (networks/*_lora*.py, tools/merge_models.py).

Everything here works on LoRA files as *modules*: per kohya module name a `(down, up, alpha)`
triple whose weight delta is `alpha / rank * up @ down` (a kxk convolution composes a kxk
`down` with a 1x1 `up`). Nothing here knows a model architecture beyond key names, so the
SD1/2 scripts of this issue and the SDXL / FLUX scripts of later ones share it.

* `tensors`   -- read-on-demand tensor files (one tensor in memory at a time) and a
                 streaming safetensors writer, for bounded memory on big inputs.
* `lorafile`  -- reading a LoRA file into validated modules; clear errors for other layouts
                 (LyCORIS, OFT, PEFT/diffusers, DoRA) and for inconsistent shapes; turning
                 modules back into a flat state dict.
* `arch`      -- which model a LoRA is for, read from its key names (SD1/2, SDXL, FLUX, SD3);
                 LoRA Block Weight (LBW) block names and weight lists.
* `linalg`    -- the SVD of a low-rank product without forming it, rank selection (fixed,
                 sv_ratio, sv_fro, sv_cumulative), retained-energy figures, factor clamping.
* `ops`       -- the operations: resize, SVD merge, factor merge (sum / concat / shuffle),
                 DyLoRA split, extraction from weight differences.
* `metadata`  -- ss_* / modelspec metadata for the files these tools write.
* `cli`       -- output-path safety, ratio checks, progress bars, summaries.
* `sd`        -- the SD1.x/2.x model side: the adaptable layers of a loaded checkpoint under
                 their LoRA names, checks of a LoRA against them, merging into them.
"""
