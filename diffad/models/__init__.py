"""The denoising network: OpenAI's ADM UNet with a feature head, guided-diffusion checkpoint loading,
and the trained denoiser (:mod:`diffad.models.denoiser`: how a preset builds it, ``model.pt``)."""

from diffad.models.checkpoint import (
    GUIDED_DIFFUSION_URLS,
    MissingInitCheckpoint,
    download_guided_diffusion_checkpoint,
    load_guided_diffusion_checkpoint,
    read_state_dict,
    resolve_init_checkpoint,
)
from diffad.models.denoiser import (
    MODEL_NAME,
    TrainedModel,
    build_diffusion,
    build_feature_extractor,
    build_unet,
)
from diffad.models.unet import (
    UNET_CONFIGS,
    UNetConfig,
    UNetModel,
    count_parameters,
    create_unet,
    default_channel_mult,
    timestep_embedding,
    unet_config,
)

__all__ = [
    "UNetModel",
    "UNetConfig",
    "UNET_CONFIGS",
    "unet_config",
    "create_unet",
    "count_parameters",
    "default_channel_mult",
    "timestep_embedding",
    "GUIDED_DIFFUSION_URLS",
    "load_guided_diffusion_checkpoint",
    "download_guided_diffusion_checkpoint",
    "read_state_dict",
    "resolve_init_checkpoint",
    "MissingInitCheckpoint",
    "MODEL_NAME",
    "TrainedModel",
    "build_diffusion",
    "build_feature_extractor",
    "build_unet",
]
