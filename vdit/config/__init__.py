"""Configs are data: typed dataclasses, loaded from YAML with dotted `key=value` overrides.

Every problem (an unknown key, a value of the wrong type, a value out of range, sections that
disagree) is reported with its full dotted key and what is allowed, before anything compiles.
`sections.py` holds the dataclasses and their checks, `loading.py` YAML, overrides and dumps.
"""

from vdit.config.loading import (
    AUTOENCODER_CONFIG,
    DEFAULT_CONFIG,
    diff,
    dump_yaml,
    find_config_file,
    from_dict,
    load_config,
    load_from_command_line,
    parse_overrides,
    shipped_path,
    to_dict,
)
from vdit.config.sections import (
    AutoencoderConfig,
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    MeshConfig,
    ModelConfig,
    SampleConfig,
    TextConfig,
    TrainConfig,
)

__all__ = ["AUTOENCODER_CONFIG", "DEFAULT_CONFIG", "AutoencoderConfig", "Config", "ConfigError",
           "DataConfig", "DiffusionConfig", "MeshConfig", "ModelConfig", "SampleConfig",
           "TextConfig", "TrainConfig", "diff", "dump_yaml", "find_config_file", "from_dict",
           "load_config", "load_from_command_line", "parse_overrides", "shipped_path", "to_dict"]
