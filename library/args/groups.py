"""Option groups shared by the entry scripts.

Each ``add_*_arguments`` function registers one group of options on an
``argparse.ArgumentParser``. Names, types, defaults and choices follow the
command-line contract of kohya-ss/sd-scripts (shared/spec/cli-options.md §4) so
existing command lines and ``--config_file`` TOML files keep working; the help
texts are this project's own.

Only the standard library is imported here (directly or indirectly): building a
parser and answering ``--help`` must stay fast, without torch or diffusers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.args.types import int_or_float

__all__ = [
    "add_logging_arguments",
    "add_sd_models_arguments",
    "add_model_spec_arguments",
    "add_dataset_arguments",
    "add_training_arguments",
    "add_masked_loss_arguments",
    "add_deepspeed_arguments",
    "add_sd_saving_arguments",
    "add_optimizer_arguments",
    "add_config_arguments",
    "add_custom_train_arguments",
    "add_dit_training_arguments",
    "add_sdxl_training_arguments",
    "add_flux_train_arguments",
    "add_sd3_training_arguments",
    "add_train_network_arguments",
]

# Note: argparse %-formats help strings, so a literal percent sign is written "%%".


def _flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action="store_true", help=help)


# --------------------------------------------------------------------------- G-LOG
def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Console logging: level, destination file, plain formatting (3 options)."""
    parser.add_argument(
        "--console_log_level",
        type=str,
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="how much to log on the console (INFO when not given)",
    )
    parser.add_argument(
        "--console_log_file",
        type=str,
        default=None,
        help="send log messages to this file (appended) instead of the terminal",
    )
    _flag(parser, "--console_log_simple", "plain one-line log records instead of rich formatting")


# --------------------------------------------------------------------------- G-MODEL
def add_sd_models_arguments(parser: argparse.ArgumentParser) -> None:
    """Which base model to start from (4 options)."""
    _flag(parser, "--v2", "the base model is a Stable Diffusion 2.x model")
    _flag(
        parser,
        "--v_parameterization",
        "the model predicts v (velocity) instead of noise; use with v-prediction models such as SD 2.x 768",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="base model to train from: a .ckpt/.safetensors file, a Diffusers folder or a Hugging Face model id",
    )
    parser.add_argument(
        "--tokenizer_cache_dir",
        type=str,
        default=None,
        help="folder where tokenizers are saved after the first download and loaded from later (offline use)",
    )


# --------------------------------------------------------------------------- G-SPEC
def add_model_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """Values written into the saved file's modelspec.* metadata (11 options)."""
    fields = [
        ("--metadata_title", "title stored in the model metadata (the output name when not given)"),
        ("--metadata_author", "author stored in the model metadata"),
        ("--metadata_description", "description stored in the model metadata"),
        ("--metadata_license", "license stored in the model metadata"),
        ("--metadata_tags", "comma-separated tags stored in the model metadata"),
        ("--metadata_usage_hint", "usage hint stored in the model metadata"),
        (
            "--metadata_thumbnail",
            "thumbnail stored in the model metadata; an image file path is embedded as a data URL",
        ),
        ("--metadata_merged_from", "source models noted in the metadata (for merged models)"),
        ("--metadata_trigger_phrase", "trigger phrase stored in the model metadata"),
        ("--metadata_preprocessor", "preprocessor name stored in the model metadata"),
        (
            "--metadata_is_negative_embedding",
            "marks the file as a negative embedding in the model metadata",
        ),
    ]
    for name, text in fields:
        parser.add_argument(name, type=str, default=None, help=text)


# --------------------------------------------------------------------------- G-DATA
def add_dataset_arguments(
    parser: argparse.ArgumentParser,
    support_dreambooth: bool,
    support_caption: bool,
    support_caption_dropout: bool,
) -> None:
    """Dataset and caption handling (up to 38 options, depending on the flags)."""
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="training images: a folder holding <repeats>_<name> subfolders (or the image folder for metadata datasets)",
    )
    _flag(parser, "--cache_info", "remember caption texts and image sizes in metadata_cache.json to start faster next time")
    _flag(parser, "--shuffle_caption", "randomly reorder the caption parts separated by --caption_separator")
    parser.add_argument(
        "--caption_separator", type=str, default=",", help="text that separates caption parts (default: ,)"
    )
    parser.add_argument(
        "--caption_extension",
        type=str,
        default=".caption",
        help="file extension of the caption file next to each image (default: .caption)",
    )
    parser.add_argument(
        "--caption_extention",
        type=str,
        default=None,
        help="old misspelled name of --caption_extension; wins over it when given",
    )
    parser.add_argument(
        "--keep_tokens",
        type=int,
        default=0,
        help="number of leading caption parts that are never shuffled or dropped",
    )
    parser.add_argument(
        "--keep_tokens_separator",
        type=str,
        default="",
        help="marker in a caption: the part before it is kept fixed, only the part after it is shuffled/dropped",
    )
    parser.add_argument(
        "--secondary_separator",
        type=str,
        default=None,
        help="separator that groups words into one caption part; replaced by --caption_separator after shuffling",
    )
    _flag(parser, "--enable_wildcard", "expand {a|b|c} choices in captions and pick one random line of multi-line captions")
    parser.add_argument("--caption_prefix", type=str, default=None, help="text put in front of every caption")
    parser.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    _flag(parser, "--color_aug", "random colour augmentation (cannot be combined with latent caching)")
    _flag(parser, "--flip_aug", "randomly mirror images left-right")
    parser.add_argument(
        "--face_crop_aug_range",
        type=str,
        default=None,
        help="lo,hi: crop around the face so it fills a random fraction of the image in this range (e.g. 2.0,4.0)",
    )
    _flag(parser, "--random_crop", "crop at a random position instead of the centre")
    _flag(parser, "--debug_dataset", "show what the dataset produces (images, captions) instead of training")
    parser.add_argument(
        "--resolution",
        type=str,
        default=None,
        help="training resolution: one size (512) or width,height (768,512)",
    )
    _flag(parser, "--cache_latents", "encode every image with the VAE once before training and keep the latents in memory")
    parser.add_argument(
        "--vae_batch_size", type=int, default=1, help="how many images the VAE encodes at once while caching"
    )
    _flag(parser, "--cache_latents_to_disk", "save cached latents as .npz files next to the images (turns on --cache_latents)")
    _flag(parser, "--skip_cache_check", "use existing cache files without checking that they match the current settings")
    _flag(parser, "--enable_bucket", "group images of similar aspect ratio into buckets instead of cropping all to one shape")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side in pixels")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side in pixels")
    parser.add_argument(
        "--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this many pixels"
    )
    _flag(parser, "--bucket_no_upscale", "choose buckets from each image's own size and never enlarge images")
    parser.add_argument(
        "--resize_interpolation",
        type=str,
        default=None,
        choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"],
        help="filter used when resizing images (default: area to shrink, lanczos to enlarge)",
    )
    parser.add_argument(
        "--token_warmup_min",
        type=int,
        default=1,
        help="number of caption parts used at the start of token warmup",
    )
    parser.add_argument(
        "--token_warmup_step",
        type=float,
        default=0,
        help="step at which the whole caption is used (a value below 1 is a fraction of all steps); 0 turns warmup off",
    )
    _flag(parser, "--alpha_mask", "use the image's alpha channel as a loss mask")
    parser.add_argument(
        "--dataset_class",
        type=str,
        default=None,
        help="use your own dataset class, given as package.module.ClassName",
    )
    if support_caption_dropout:
        parser.add_argument(
            "--caption_dropout_rate",
            type=float,
            default=0.0,
            help="probability that an image is trained with an empty caption",
        )
        parser.add_argument(
            "--caption_dropout_every_n_epochs",
            type=int,
            default=0,
            help="train every N-th epoch with empty captions (0: never)",
        )
        parser.add_argument(
            "--caption_tag_dropout_rate",
            type=float,
            default=0.0,
            help="probability of leaving out each (non-fixed) caption part",
        )
    if support_dreambooth:
        parser.add_argument(
            "--reg_data_dir",
            type=str,
            default=None,
            help="regularization images: a folder holding <repeats>_<name> subfolders",
        )
    if support_caption:
        parser.add_argument(
            "--in_json",
            type=str,
            default=None,
            help="metadata JSON with captions (and sizes) for fine-tuning style datasets",
        )
        parser.add_argument(
            "--dataset_repeats",
            type=int,
            default=1,
            help="how often each image of a metadata dataset is repeated per epoch",
        )


# --------------------------------------------------------------------------- G-TRAIN
def add_training_arguments(parser: argparse.ArgumentParser, support_dreambooth: bool) -> None:
    """Output, saving, precision, noise, logging and sampling options (75 or 76 options)."""
    parser.add_argument("--output_dir", type=str, default=None, help="folder for trained models, states and sample images")
    parser.add_argument(
        "--output_name", type=str, default=None, help="file name (without extension) of the saved model"
    )
    parser.add_argument(
        "--huggingface_repo_id", type=str, default=None, help="Hugging Face repository to upload results to"
    )
    parser.add_argument(
        "--huggingface_repo_type", type=str, default=None, help="type of that Hugging Face repository (e.g. model)"
    )
    parser.add_argument(
        "--huggingface_path_in_repo", type=str, default=None, help="folder inside the Hugging Face repository to upload into"
    )
    parser.add_argument(
        "--huggingface_token",
        type=str,
        default=None,
        help="Hugging Face access token (better put it in the --config_file TOML than on the command line)",
    )
    parser.add_argument(
        "--huggingface_repo_visibility",
        type=str,
        default=None,
        help="'public' creates a public repository; anything else a private one",
    )
    _flag(parser, "--save_state_to_huggingface", "upload saved training states as well")
    _flag(parser, "--resume_from_huggingface", "read --resume as repo_id/path[:revision[:repo_type]] on Hugging Face")
    _flag(parser, "--async_upload", "upload in the background while training continues")
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=[None, "float", "fp16", "bf16"],
        help="number format of the saved weights (float means 32-bit)",
    )
    parser.add_argument("--save_every_n_epochs", type=int, default=None, help="save a model every N epochs")
    parser.add_argument("--save_every_n_steps", type=int, default=None, help="save a model every N optimizer steps")
    parser.add_argument(
        "--save_n_epoch_ratio",
        type=int,
        default=None,
        help="choose the save interval so that about N models are saved over the whole run",
    )
    parser.add_argument(
        "--save_last_n_epochs", type=int, default=None, help="keep only the newest N models saved per epoch"
    )
    parser.add_argument(
        "--save_last_n_epochs_state",
        type=int,
        default=None,
        help="keep only the newest N states saved per epoch (overrides --save_last_n_epochs for states)",
    )
    parser.add_argument(
        "--save_last_n_steps",
        type=int,
        default=None,
        help="remove models saved by step once they are more than N steps old",
    )
    parser.add_argument(
        "--save_last_n_steps_state",
        type=int,
        default=None,
        help="remove states saved by step once they are more than N steps old",
    )
    _flag(parser, "--save_state", "save the full training state (optimizer, RNG, ...) whenever a model is saved")
    _flag(parser, "--save_state_on_train_end", "save the full training state once training ends")
    parser.add_argument(
        "--resume", type=str, default=None, help="training state folder (or Hugging Face location) to continue from"
    )
    parser.add_argument("--train_batch_size", type=int, default=1, help="images per batch on each device")
    parser.add_argument(
        "--max_token_length",
        type=int,
        default=None,
        choices=[None, 150, 225],
        help="longer CLIP prompts: 150 or 225 tokens (75 when not given)",
    )
    _flag(parser, "--mem_eff_attn", "use the built-in memory-saving attention")
    _flag(parser, "--torch_compile", "compile the models with torch.compile")
    parser.add_argument(
        "--dynamo_backend",
        type=str,
        default="inductor",
        choices=[
            "eager",
            "aot_eager",
            "inductor",
            "aot_ts_nvfuser",
            "nvprims_nvfuser",
            "cudagraphs",
            "ofi",
            "fx2trt",
            "onnxrt",
            "tensort",
            "ipex",
            "tvm",
        ],
        help="backend for --torch_compile (default: inductor)",
    )
    _flag(parser, "--xformers", "use xformers attention kernels")
    _flag(parser, "--sdpa", "use PyTorch's scaled_dot_product_attention")
    parser.add_argument(
        "--vae", type=str, default=None, help="use this VAE (file or Diffusers folder) instead of the model's own"
    )
    parser.add_argument("--max_train_steps", type=int, default=1600, help="number of optimizer steps to train")
    parser.add_argument(
        "--max_train_epochs", type=int, default=None, help="number of epochs to train (replaces --max_train_steps)"
    )
    parser.add_argument(
        "--max_data_loader_n_workers",
        type=int,
        default=8,
        help="at most this many data-loading worker processes",
    )
    _flag(parser, "--persistent_data_loader_workers", "keep data-loading workers between epochs")
    parser.add_argument("--seed", type=int, default=None, help="random seed (a random one when not given)")
    _flag(parser, "--gradient_checkpointing", "recompute activations in the backward pass to save memory")
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="number of batches whose gradients are added up before each optimizer step",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "fp16", "bf16"],
        help="run computations in fp16 or bf16 where safe",
    )
    _flag(parser, "--full_fp16", "keep trained weights and gradients in fp16 (needs --mixed_precision fp16)")
    _flag(parser, "--full_bf16", "keep trained weights and gradients in bf16 (needs --mixed_precision bf16)")
    _flag(parser, "--fp8_base", "store the frozen base model in float8 to save memory (needs mixed precision)")
    parser.add_argument(
        "--ddp_timeout", type=int, default=None, help="timeout in minutes for multi-GPU communication"
    )
    _flag(parser, "--ddp_gradient_as_bucket_view", "multi-GPU: let gradients share memory with DDP buckets")
    _flag(parser, "--ddp_static_graph", "multi-GPU: tell DDP the model graph never changes")
    parser.add_argument(
        "--clip_skip",
        type=int,
        default=None,
        help="take the text embedding from the N-th layer counted from the end of CLIP (1 = last layer)",
    )
    parser.add_argument(
        "--logging_dir", type=str, default=None, help="folder for TensorBoard logs; logging is on when given"
    )
    parser.add_argument(
        "--log_with",
        type=str,
        default=None,
        choices=["tensorboard", "wandb", "all"],
        help="where to send training logs",
    )
    parser.add_argument(
        "--log_prefix", type=str, default=None, help="text put in front of the log folder name of each run"
    )
    parser.add_argument(
        "--log_tracker_name", type=str, default=None, help="project name given to the log trackers"
    )
    parser.add_argument("--wandb_run_name", type=str, default=None, help="name of the Weights & Biases run")
    parser.add_argument(
        "--log_tracker_config",
        type=str,
        default=None,
        help="TOML file with extra settings for the log trackers",
    )
    parser.add_argument(
        "--wandb_api_key",
        type=str,
        default=None,
        help="Weights & Biases API key for logging in (better put it in the --config_file TOML than on the command line)",
    )
    _flag(parser, "--log_config", "send the training settings (without secrets and paths) to the log trackers")
    parser.add_argument(
        "--noise_offset",
        type=float,
        default=None,
        help="strength of a per-channel constant added to the noise (helps very dark/bright images)",
    )
    _flag(parser, "--noise_offset_random_strength", "scale the noise offset by a random factor between 0 and 1 each step")
    parser.add_argument(
        "--multires_noise_iterations",
        type=int,
        default=None,
        help="add multi-resolution (pyramid) noise with this many levels",
    )
    parser.add_argument(
        "--ip_noise_gamma",
        type=float,
        default=None,
        help="strength of input perturbation noise",
    )
    _flag(parser, "--ip_noise_gamma_random_strength", "scale --ip_noise_gamma by a random factor between 0 and 1 each step")
    parser.add_argument(
        "--multires_noise_discount",
        type=float,
        default=0.3,
        help="how much weaker each coarser level of multi-resolution noise is (default 0.3)",
    )
    parser.add_argument(
        "--adaptive_noise_scale",
        type=float,
        default=None,
        help="add this times the absolute latent mean to --noise_offset (needs --noise_offset)",
    )
    _flag(parser, "--zero_terminal_snr", "rescale the noise schedule so the last timestep is pure noise")
    parser.add_argument(
        "--min_timestep", type=int, default=None, help="lowest timestep sampled during training (default 0)"
    )
    parser.add_argument(
        "--max_timestep",
        type=int,
        default=None,
        help="timesteps are sampled below this value (default 1000)",
    )
    parser.add_argument(
        "--loss_type",
        type=str,
        default="l2",
        choices=["l1", "l2", "huber", "smooth_l1"],
        help="loss function between prediction and target",
    )
    parser.add_argument(
        "--huber_schedule",
        type=str,
        default="snr",
        choices=["constant", "exponential", "snr"],
        help="how the Huber parameter changes with the timestep",
    )
    parser.add_argument(
        "--huber_c", type=float, default=0.1, help="Huber / smooth L1 parameter (delta)"
    )
    parser.add_argument(
        "--huber_scale",
        type=float,
        default=1.0,
        help="factor on the Huber parameter for the constant and exponential schedules",
    )
    _flag(parser, "--lowram", "load models straight onto the GPU to need less system memory")
    _flag(parser, "--highvram", "skip GPU memory clean-ups during caching (for cards with plenty of memory)")
    parser.add_argument(
        "--sample_every_n_steps", type=int, default=None, help="make sample images every N steps"
    )
    _flag(parser, "--sample_at_first", "make sample images before training starts")
    parser.add_argument(
        "--sample_every_n_epochs",
        type=int,
        default=None,
        help="make sample images every N epochs (takes priority over --sample_every_n_steps)",
    )
    parser.add_argument(
        "--sample_prompts", type=str, default=None, help="prompts for sample images (.txt, .toml or .json file)"
    )
    parser.add_argument(
        "--sample_sampler",
        type=str,
        default="ddim",
        choices=[
            "ddim",
            "pndm",
            "lms",
            "euler",
            "euler_a",
            "heun",
            "dpm_2",
            "dpm_2_a",
            "dpmsolver",
            "dpmsolver++",
            "dpmsingle",
            "k_lms",
            "k_euler",
            "k_euler_a",
            "k_dpm_2",
            "k_dpm_2_a",
        ],
        help="sampler for sample images unless a prompt sets its own (default: ddim)",
    )
    parser.add_argument(
        "--config_file",
        type=str,
        default=None,
        help="TOML file with option values; options given on the command line win over it",
    )
    _flag(
        parser,
        "--output_config",
        "write the options given on the command line (those differing from the defaults) to --config_file, then exit",
    )
    if support_dreambooth:
        parser.add_argument(
            "--prior_loss_weight",
            type=float,
            default=1.0,
            help="loss factor for regularization images",
        )


# --------------------------------------------------------------------------- G-MASK
def add_masked_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Masked loss (2 options)."""
    parser.add_argument(
        "--conditioning_data_dir",
        type=str,
        default=None,
        help="folder of mask images with the same file names as the training images",
    )
    _flag(parser, "--masked_loss", "weight the loss by a mask (red channel of the mask image, or the alpha channel)")


# --------------------------------------------------------------------------- G-DS
def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed settings passed to accelerate (9 options)."""
    _flag(parser, "--deepspeed", "train with DeepSpeed through accelerate")
    parser.add_argument(
        "--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default 2)"
    )
    parser.add_argument(
        "--offload_optimizer_device",
        type=str,
        default=None,
        choices=[None, "cpu", "nvme"],
        help="move optimizer state to this device (ZeRO stage 2 and 3)",
    )
    parser.add_argument(
        "--offload_optimizer_nvme_path",
        type=str,
        default=None,
        help="NVMe folder for optimizer offloading (ZeRO stage 3)",
    )
    parser.add_argument(
        "--offload_param_device",
        type=str,
        default=None,
        choices=[None, "cpu", "nvme"],
        help="move model parameters to this device (ZeRO stage 3)",
    )
    parser.add_argument(
        "--offload_param_nvme_path",
        type=str,
        default=None,
        help="NVMe folder for parameter offloading (ZeRO stage 3)",
    )
    _flag(parser, "--zero3_init_flag", "build models under deepspeed.zero.Init (ZeRO stage 3)")
    _flag(parser, "--zero3_save_16bit_model", "gather and save a 16-bit model under ZeRO stage 3")
    _flag(
        parser,
        "--fp16_master_weights_and_gradients",
        "keep master weights and gradients in fp16 (the optimizer must support it)",
    )


# --------------------------------------------------------------------------- G-SAVE
def add_sd_saving_arguments(parser: argparse.ArgumentParser) -> None:
    """Format of fully fine-tuned models (2 options)."""
    parser.add_argument(
        "--save_model_as",
        type=str,
        default=None,
        choices=[None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"],
        help="format of the saved model (default: same kind as the loaded model)",
    )
    _flag(parser, "--use_safetensors", "save as .safetensors when --save_model_as is not given")


# --------------------------------------------------------------------------- G-OPT
def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer and learning-rate schedule (16 options)."""
    parser.add_argument(
        "--optimizer_type",
        type=str,
        default="",
        help="optimizer name (AdamW, AdamW8bit, Lion, Prodigy, Adafactor, ...) or an importable module.Class "
        "(default AdamW)",
    )
    _flag(parser, "--use_8bit_adam", "deprecated: same as --optimizer_type AdamW8bit")
    _flag(parser, "--use_lion_optimizer", "deprecated: same as --optimizer_type Lion")
    parser.add_argument("--learning_rate", type=float, default=2.0e-6, help="learning rate")
    parser.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="clip gradients to this norm; 0 turns clipping off",
    )
    parser.add_argument(
        "--optimizer_args",
        type=str,
        default=None,
        nargs="*",
        help="extra optimizer settings as key=value, values written as Python literals "
        '(e.g. weight_decay=0.01 betas=0.9,0.999 "mode=\'x\'")',
    )
    parser.add_argument(
        "--lr_scheduler_type",
        type=str,
        default="",
        help="use this scheduler class instead of --lr_scheduler (a torch.optim.lr_scheduler name or module.Class)",
    )
    parser.add_argument(
        "--lr_scheduler_args",
        type=str,
        default=None,
        nargs="*",
        help="extra scheduler settings as key=value, values written as Python literals",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="learning-rate schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
        "polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant, adafactor "
        "(default constant)",
    )
    parser.add_argument(
        "--lr_warmup_steps",
        type=int_or_float,
        default=0,
        help="warmup length: a number of steps, or a ratio of all steps written as a value below 1 or as N%%",
    )
    parser.add_argument(
        "--lr_decay_steps",
        type=int_or_float,
        default=0,
        help="decay length for warmup_stable_decay and similar schedules: steps, a ratio below 1, or N%%",
    )
    parser.add_argument(
        "--lr_scheduler_num_cycles",
        type=int,
        default=1,
        help="number of restarts/cycles for cosine_with_restarts (and the min-lr / WSD schedules)",
    )
    parser.add_argument(
        "--lr_scheduler_power", type=float, default=1, help="exponent of the polynomial schedule"
    )
    _flag(
        parser,
        "--fused_backward_pass",
        "update weights during the backward pass to save memory (Adafactor only, no gradient accumulation)",
    )
    parser.add_argument(
        "--lr_scheduler_timescale",
        type=int,
        default=None,
        help="timescale of the inverse_sqrt schedule (default: the warmup steps)",
    )
    parser.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=None,
        help="lowest learning rate as a fraction of the starting one (cosine_with_min_lr, warmup_stable_decay)",
    )


# --------------------------------------------------------------------------- G-CFG
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset definition file (1 option)."""
    parser.add_argument(
        "--dataset_config",
        type=Path,
        default=None,
        help="dataset definition file (.toml or .json) describing subsets, folders and per-subset settings",
    )


# --------------------------------------------------------------------------- G-CUSTOM
def add_custom_train_arguments(parser: argparse.ArgumentParser, support_weighted_captions: bool = True) -> None:
    """Loss weighting by SNR and caption weighting (4 or 5 options)."""
    parser.add_argument(
        "--min_snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting with this gamma (5 is a common value; SD/SDXL)",
    )
    _flag(
        parser,
        "--scale_v_pred_loss_like_noise_pred",
        "scale the v-prediction loss so it behaves like a noise-prediction loss (needs --v_parameterization)",
    )
    parser.add_argument(
        "--v_pred_like_loss",
        type=float,
        default=None,
        help="add a v-prediction-like loss term with this weight (not with --v_parameterization)",
    )
    _flag(parser, "--debiased_estimation_loss", "weight the loss by the inverse square root of the SNR")
    if support_weighted_captions:
        _flag(
            parser,
            "--weighted_captions",
            "read emphasis like (word:1.2) and [word] in captions and weight the text embedding accordingly",
        )


# --------------------------------------------------------------------------- G-DIT
def add_dit_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the transformer (SD3 / FLUX) trainers (9 options)."""
    _flag(parser, "--cache_text_encoder_outputs", "run the text encoders once before training and reuse their outputs")
    _flag(
        parser,
        "--cache_text_encoder_outputs_to_disk",
        "save text-encoder outputs as .npz files (turns on --cache_text_encoder_outputs)",
    )
    parser.add_argument(
        "--text_encoder_batch_size",
        type=int,
        default=None,
        help="batch size while caching text-encoder outputs (default: the training batch size)",
    )
    _flag(parser, "--disable_mmap_load_safetensors", "read .safetensors files into memory instead of memory-mapping them")
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="uniform",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"],
        help="timestep sampling density / loss weighting scheme (default uniform)",
    )
    parser.add_argument(
        "--logit_mean", type=float, default=0.0, help="mean of the logit_normal scheme"
    )
    parser.add_argument(
        "--logit_std", type=float, default=1.0, help="standard deviation of the logit_normal scheme"
    )
    parser.add_argument(
        "--mode_scale", type=float, default=1.29, help="scale of the mode scheme"
    )
    parser.add_argument(
        "--blocks_to_swap",
        type=int,
        default=None,
        help="keep this many transformer blocks in CPU memory and move them to the GPU only when needed",
    )


# --------------------------------------------------------------------------- G-SDXL
def add_sdxl_training_arguments(parser: argparse.ArgumentParser, support_text_encoder_caching: bool = True) -> None:
    """SDXL trainers (2 or 3 options)."""
    if support_text_encoder_caching:
        _flag(
            parser,
            "--cache_text_encoder_outputs",
            "run both text encoders once before training and reuse their outputs",
        )
        _flag(
            parser,
            "--cache_text_encoder_outputs_to_disk",
            "save text-encoder outputs as _te_outputs.npz files (turns on --cache_text_encoder_outputs)",
        )
    _flag(parser, "--disable_mmap_load_safetensors", "read .safetensors files into memory instead of memory-mapping them")


# --------------------------------------------------------------------------- G-FLUX
def add_flux_train_arguments(parser: argparse.ArgumentParser) -> None:
    """FLUX.1 / Chroma model files and flow-matching settings (12 options)."""
    parser.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder file (.safetensors)")
    parser.add_argument("--t5xxl", type=str, default=None, help="T5-XXL text encoder file (.safetensors)")
    parser.add_argument("--ae", type=str, default=None, help="FLUX autoencoder file (.safetensors)")
    parser.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        default=None,
        help="FLUX ControlNet weights (for the ControlNet scripts)",
    )
    parser.add_argument(
        "--t5xxl_max_token_length",
        type=int,
        default=None,
        help="T5 prompt length in tokens (default 256 for schnell, 512 for dev)",
    )
    _flag(parser, "--apply_t5_attn_mask", "mask T5 padding tokens in the text encoder and the transformer")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="guidance value given to guidance-distilled (dev) models while training",
    )
    parser.add_argument(
        "--timestep_sampling",
        type=str,
        default="sigma",
        choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"],
        help="how timesteps are drawn during training",
    )
    parser.add_argument(
        "--sigmoid_scale",
        type=float,
        default=1.0,
        help="factor on the normal sample before the sigmoid (sigmoid/shift sampling)",
    )
    parser.add_argument(
        "--model_prediction_type",
        type=str,
        default="sigma_scaled",
        choices=["raw", "additive", "sigma_scaled"],
        help="how the model output is turned into the prediction",
    )
    parser.add_argument(
        "--discrete_flow_shift",
        type=float,
        default=3.0,
        help="shift of the scheduler sigmas and of 'shift' timestep sampling",
    )
    parser.add_argument(
        "--model_type",
        type=str,
        default="flux",
        choices=["flux", "chroma"],
        help="model family: FLUX.1 or Chroma",
    )


# --------------------------------------------------------------------------- G-SD3
def add_sd3_training_arguments(parser: argparse.ArgumentParser) -> None:
    """SD3 / SD3.5 model files and settings (16 options)."""
    parser.add_argument(
        "--clip_l", type=str, default=None, help="CLIP-L weights (taken from the checkpoint when not given)"
    )
    parser.add_argument(
        "--clip_g", type=str, default=None, help="CLIP-G weights (taken from the checkpoint when not given)"
    )
    parser.add_argument(
        "--t5xxl", type=str, default=None, help="T5-XXL weights (taken from the checkpoint when not given)"
    )
    _flag(parser, "--save_clip", "accepted for compatibility; has no effect")
    _flag(parser, "--save_t5xxl", "accepted for compatibility; has no effect")
    parser.add_argument("--t5xxl_device", type=str, default=None, help="accepted for compatibility; has no effect")
    parser.add_argument("--t5xxl_dtype", type=str, default=None, help="accepted for compatibility; has no effect")
    parser.add_argument(
        "--t5xxl_max_token_length", type=int, default=256, help="T5 prompt length in tokens (default 256)"
    )
    _flag(parser, "--apply_lg_attn_mask", "mask padding tokens of CLIP-L and CLIP-G")
    _flag(parser, "--apply_t5_attn_mask", "mask padding tokens of T5")
    parser.add_argument(
        "--clip_l_dropout_rate",
        type=float,
        default=0.0,
        help="probability of zeroing the CLIP-L conditioning of a sample",
    )
    parser.add_argument(
        "--clip_g_dropout_rate",
        type=float,
        default=0.0,
        help="probability of zeroing the CLIP-G conditioning of a sample",
    )
    parser.add_argument(
        "--t5_dropout_rate",
        type=float,
        default=0.0,
        help="probability of zeroing the T5 conditioning of a sample",
    )
    parser.add_argument(
        "--pos_emb_random_crop_rate",
        type=float,
        default=0.0,
        help="probability of cropping the position embedding at a random place (SD3.5 Medium)",
    )
    _flag(parser, "--enable_scaled_pos_embed", "scale position embeddings with the resolution (SD3.5 Medium)")
    parser.add_argument(
        "--training_shift",
        type=float,
        default=1.0,
        help="shift applied to the sampled timestep distribution",
    )


# --------------------------------------------------------------------------- train_network.py
def add_train_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The 28 options train_network.py adds on top of its shared groups."""
    _flag(
        parser,
        "--cpu_offload_checkpointing",
        "move checkpointed activations to CPU memory (where the model supports it)",
    )
    _flag(parser, "--no_metadata", "write only the minimal training metadata (plus modelspec) into the file")
    parser.add_argument(
        "--save_model_as",
        type=str,
        default="safetensors",
        choices=[None, "ckpt", "pt", "safetensors"],
        help="file format of the saved network (default safetensors)",
    )
    parser.add_argument(
        "--unet_lr",
        type=float,
        default=None,
        help="learning rate of the U-Net/transformer part of the network (default --learning_rate)",
    )
    parser.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        nargs="*",
        help="learning rate(s) of the text-encoder part, one per text encoder where supported "
        "(default --learning_rate)",
    )
    _flag(parser, "--fp8_base_unet", "store only the U-Net/transformer in float8; text encoders keep fp16/bf16")
    parser.add_argument(
        "--network_weights", type=str, default=None, help="network file to load as the starting point"
    )
    parser.add_argument(
        "--network_module",
        type=str,
        default=None,
        help="Python module that builds the network (for example networks.lora)",
    )
    parser.add_argument(
        "--network_dim", type=int, default=None, help="network rank; the network module defines its meaning"
    )
    parser.add_argument(
        "--network_alpha",
        type=float,
        default=1,
        help="alpha for weight scaling (scale = alpha / dim); default 1",
    )
    parser.add_argument(
        "--network_dropout",
        type=float,
        default=None,
        help="dropout rate applied to the low-rank activations",
    )
    parser.add_argument(
        "--network_args",
        type=str,
        default=None,
        nargs="*",
        help="extra key=value settings passed to the network module",
    )
    _flag(parser, "--network_train_unet_only", "train only the U-Net/transformer part; no text-encoder modules")
    _flag(parser, "--network_train_text_encoder_only", "train only the text-encoder part")
    parser.add_argument(
        "--training_comment",
        type=str,
        default=None,
        help="free text stored in the metadata (ss_training_comment)",
    )
    _flag(parser, "--dim_from_weights", "take the network shape from --network_weights")
    parser.add_argument(
        "--scale_weight_norms",
        type=float,
        default=None,
        help="limit the norm of each up/down weight product to this value (max-norm regularisation)",
    )
    parser.add_argument(
        "--base_weights",
        type=str,
        default=None,
        nargs="*",
        help="network files merged into the base model before training",
    )
    parser.add_argument(
        "--base_weights_multiplier",
        type=float,
        default=None,
        nargs="*",
        help="merge strength for each --base_weights file (default 1.0)",
    )
    _flag(parser, "--no_half_vae", "keep the VAE in float32 under mixed precision")
    _flag(parser, "--skip_until_initial_step", "skip batches until --initial_step (or --initial_epoch) is reached")
    parser.add_argument(
        "--initial_epoch",
        type=int,
        default=None,
        help="epoch number to start counting from (1-based); the LR schedule is not affected",
    )
    parser.add_argument(
        "--initial_step",
        type=int,
        default=None,
        help="global step to start counting from; wins over --initial_epoch",
    )
    parser.add_argument(
        "--validation_seed",
        type=int,
        default=None,
        help="seed for splitting off and running validation (default --seed)",
    )
    parser.add_argument(
        "--validation_split",
        type=float,
        default=0.0,
        help="fraction of the images kept aside for validation",
    )
    parser.add_argument(
        "--validate_every_n_steps", type=int, default=None, help="run validation every N steps"
    )
    parser.add_argument(
        "--validate_every_n_epochs",
        type=int,
        default=None,
        help="run validation every N epochs (default: every epoch)",
    )
    parser.add_argument(
        "--max_validation_steps",
        type=int,
        default=None,
        help="use at most this many validation batches per validation run",
    )
