"""CelebA 64x64 conditioned on two attributes: each combination of Male and Smiling is a
class (4 classes: "not Male, not Smiling", "not Male, Smiling", "Male, not Smiling",
"Male, Smiling").

The recipe and net of `celeba64.py` with a class embedding and 10% label dropout
(classifier-free guidance, Ho & Salimans 2022). Other attributes: `--config.data.label=
Eyeglasses,Young` (n attributes give 2^n classes; set model.num_classes to match).
"""

from configs import celeba64


def get_config():
    config = celeba64.get_config()
    config.data.label = "Male,Smiling"
    config.model.num_classes = 4
    config.label_dropout = 0.1
    config.sample.guidance_scale = 1.5
    config.sample.num_images = 16  # a row of 4 per class
    config.eval.guidance_scale = 1.5
    return config
