"""Inference pieces shared by training previews and gen_img.py.

prompt_file (prompt files, per-prompt options, dynamic prompts), prompt_weighting
((text:1.3) syntax and token weights), samplers (--sampler names -> diffusers schedulers),
sd_sampling (the denoising loop). Importing this package imports nothing heavy.
"""
