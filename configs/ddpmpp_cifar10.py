"""EDM's DDPM++ net for CIFAR-10 32x32 (Song et al. 2021's DDPM++ as EDM's `SongUNet` builds
it for `--arch=ddpmpp`; 55.73 M parameters), trained as EDM publishes it.

The net: base 128 channels, multipliers (2, 2, 2), 4 residual blocks per level, single-head
attention at 16x16 (on the up path only after the last block of the level), residual
resampling blocks with a 1x1 conv on their skip, residual and attention outputs times
1/sqrt(2), dropout 0.13; the sinusoidal embedding of the net's time input then two dense
layers to 512. The same function as EDM's up to initialisation: EDM initialises with its own
scheme (xavier-uniform, zero outputs), this with Flax's (and zero outputs). Its published
training is EDM's (`edm_cifar10.py`), which `get_config` returns.
"""

from ml_collections import ConfigDict


def ddpmpp_net(model: ConfigDict) -> None:
    """Sets `model` (a config's `model` section) to DDPM++ for 32x32 images."""
    model.base_channels = 128
    model.channel_mults = (2, 2, 2)
    model.num_res_blocks = 4
    model.attention_resolutions = (16,)
    model.num_heads = 1
    model.dropout = 0.13
    model.resample = "resblock"
    model.resample_projection = True
    model.skip_scale = 0.5**0.5
    model.decoder_attention = "last_block"


def get_config() -> ConfigDict:
    from configs import edm_cifar10

    return edm_cifar10.get_config()
