"""Every shipped config validates and builds the published network (checked with eval_shape)."""

import importlib

import pytest
from clu import parameter_overview

from ddpm_jax.runtime import network
from ddpm_jax.train import config_checks

CONFIGS = ["quickstart", "celeba", "cifar10", "celebahq256", "celeba64", "cifar10_cond",
           "celeba64_attributes", "digits"]


def load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def celeba64_reference_count():
    """Ho et al.'s UNet at base 128, (1,2,2,2,4), 2 blocks, attention at 16, counted by formula.

    Written from the paper's block definitions, independently of the model code.
    """
    base, mults, blocks, temb = 128, (1, 2, 2, 2, 4), 2, 512
    conv = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731
    dense = lambda cin, cout: cin * cout + cout  # noqa: E731

    def res(cin, cout):
        skip = dense(cin, cout) if cin != cout else 0
        return 2 * cin + conv(cin, cout) + dense(temb, cout) + 2 * cout + conv(cout, cout) + skip

    attn = lambda c: 2 * c + 4 * dense(c, c)  # noqa: E731
    total = dense(base, temb) + dense(temb, temb) + conv(3, base)
    channels, skips, resolution = base, [base], 64
    for level, mult in enumerate(mults):
        for _ in range(blocks):
            total += res(channels, base * mult) + (attn(base * mult) if resolution == 16 else 0)
            channels = base * mult
            skips.append(channels)
        if level < len(mults) - 1:
            total += conv(channels, channels)
            skips.append(channels)
            resolution //= 2
    total += 2 * res(channels, channels) + attn(channels)
    for level, mult in reversed(list(enumerate(mults))):
        for _ in range(blocks + 1):
            total += res(channels + skips.pop(), base * mult)
            channels = base * mult
            total += attn(channels) if resolution == 16 else 0
        if level:
            total += conv(channels, channels)
            resolution *= 2
    return total + 2 * channels + conv(channels, 3)


@pytest.mark.parametrize(
    "name,expected",
    [("cifar10", 35.7e6), ("celebahq256", 114e6), ("celeba", 332.5e6),
     ("celeba64", celeba64_reference_count())],
)
def test_published_parameter_counts_within_half_a_percent(name, expected):
    count = parameter_overview.count_parameters(network.abstract_params(load(name)))
    assert abs(count / expected - 1) < 0.005, (name, count, expected)


def test_conditional_configs_add_only_the_class_table_to_their_nets():
    """The class-conditional configs: the unconditional net plus one row per class and one for
    the null label, each as wide as the time embedding (4 x base channels)."""
    for name, base_name, classes in (("cifar10_cond", "cifar10", 10),
                                     ("celeba64_attributes", "celeba64", 4)):
        count = parameter_overview.count_parameters(network.abstract_params(load(name)))
        base = parameter_overview.count_parameters(network.abstract_params(load(base_name)))
        assert count - base == (classes + 1) * 4 * 128, name


def test_seed_net_scales_like_the_reference_at_other_widths():
    config = load("celeba")
    for base, expected in ((64, 27.2e6), (128, 108.6e6)):
        config.model.base_channels = base
        config.model.time_embedding_width = 2 * base
        count = parameter_overview.count_parameters(network.abstract_params(config))
        assert abs(count / expected - 1) < 0.005, (base, count)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
    config_checks.validate(load(name), device_count=1)


@pytest.mark.parametrize("name, padding", [("cifar10", "same"), ("celeba64", "same"),
                                           ("celebahq256", "same"), ("celeba", "symmetric")])
def test_downsample_padding_is_the_one_each_net_was_published_with(name, padding):
    # Ho et al.'s TensorFlow nets pad 'SAME'; the PyTorch project's Conv2d pads 1 each side.
    assert load(name).model.downsample_padding == padding


@pytest.mark.parametrize("start, end", [(0.5, 1e-4), (1e-4, 2.0), (0.0, 0.02), (-1e-4, 0.02)])
def test_a_beta_schedule_outside_0_start_end_1_is_refused_naming_both_fields(start, end):
    config = load("quickstart")
    config.diffusion.beta_start, config.diffusion.beta_end = start, end
    with pytest.raises(config_checks.ConfigError,
                       match=r"beta_start=.* and diffusion.beta_end=.* must satisfy "
                             r"0 < beta_start <= beta_end < 1"):
        config_checks.validate(config)
    config.diffusion.beta_start, config.diffusion.beta_end = 1e-4, 0.02
    config_checks.validate(config)


def parse_overrides(*overrides):
    """The quickstart config after `overrides`, parsed as the commands parse them."""
    from absl import flags
    from ml_collections import config_flags

    from ddpm_jax import cli

    values = flags.FlagValues()
    command_line = ["prog", "--config=configs/quickstart.py", *overrides]
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=command_line)
    argv, notes = cli.last_override_wins(command_line)
    values(argv)
    return values.config, notes, cli.overrides_summary(values["config"])


@pytest.mark.parametrize("overrides, field, expected", [
    (("(16,)", "()"), "model.attention_resolutions", ()),
    (("(16,)", "[]"), "model.attention_resolutions", ()),
    (("(8,)", "(16,)"), "model.attention_resolutions", (16,)),
    (("()", "(4, 8)"), "model.attention_resolutions", (4, 8)),
    (("(1,2)", "(1,)"), "model.channel_mults", (1,)),
    (("8", "16"), "batch_size", 16),
    (("1e-3", "2e-4"), "learning_rate", 2e-4),
    (("False", "True"), "ema_warmup", True),
    (("bundled", "folder"), "data.source", "folder"),
])
def test_repeated_overrides_apply_in_order_and_the_last_wins(overrides, field, expected):
    config, notes, summary = parse_overrides(*(f"--config.{field}={value}" for value in overrides))
    value = config
    for part in field.split("."):
        value = value[part]
    assert value == expected and type(value) is type(expected)
    assert notes == [f"--config.{field} was given 2 times: the last one, "
                     f"{overrides[-1]!r}, applies"]
    assert f"{field}={expected!r}" in summary  # the log line says what trains


def test_without_the_last_wins_rule_ml_collections_joins_repeated_tuples():
    # Why the rule exists: the library's own parsing of repeated tuple flags.
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    command_line = ["prog", "--config=configs/quickstart.py",
                    "--config.model.attention_resolutions=(16,)",
                    "--config.model.attention_resolutions=()"]
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=command_line)
    values(command_line)
    assert values.config.model.attention_resolutions == (16,)


@pytest.mark.parametrize("field, value, message", [
    ("model.channel_mults", ("abc",), "model.channel_mults must be a tuple of positive integers"),
    ("model.channel_mults", (1, 0), "model.channel_mults must be a tuple of positive integers"),
    ("model.channel_mults", (), "model.channel_mults must have at least one level"),
    ("model.attention_resolutions", (-8,), "model.attention_resolutions must be a tuple"),
    ("learning_rate", float("inf"), "learning_rate must be a positive finite number"),
    ("learning_rate", float("nan"), "learning_rate must be a positive finite number"),
    ("grad_clip_norm", float("inf"), "grad_clip_norm must be a finite number >= 0"),
    ("adam_b2", 1.0, r"adam_b2 must be in \[0, 1\)"),
])
def test_impossible_values_are_refused_naming_the_field(field, value, message):
    config = load("quickstart")
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(config_checks.ConfigError, match=message):
        config_checks.validate(config)
