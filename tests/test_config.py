"""One typed config: the documented defaults file, overrides, and strict validation."""

from __future__ import annotations

import pytest
from conftest import REPO

from pipeline.utils.config import Config, load_config
from pipeline.utils.errors import FeatcacheError
from pipeline.utils.schema import parse_assignments


def test_documented_default_toml_equals_the_dataclass_defaults():
    assert load_config(REPO / "configs" / "default.toml") == Config()


def test_overrides_are_typed_and_layered(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[backbone]\nname = "vgg16"\nimage_size = 128\n[data]\nval_fraction = 0.2\n')
    cfg = load_config(
        f, parse_assignments(["backbone.image_size=96", "backbone.layers=fc1,fc2", "extract.progress=false"])
    )
    assert cfg.backbone.name == "vgg16" and cfg.backbone.image_size == 96
    assert (
        cfg.backbone.layers == ["fc1", "fc2"]
        and cfg.extract.progress is False
        and cfg.data.val_fraction == 0.2
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"extract.batch_size": "many"}, "extract.batch_size"),
        ({"data.test_fraction": "0.6", "data.val_fraction": "0.5"}, "nothing is left to train on"),
        ({"backbone.resize": "squash"}, "backbone.resize"),
        ({"nosuch.key": "1"}, "nosuch.key"),
        ({"data": "x"}, "data"),
        ({"data.group_pattern": "("}, "group_pattern"),
        ({"backbone.image_size": "5"}, "image_size"),
        ({"data.limit": "-1"}, "data.limit"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(FeatcacheError, match=needle.replace(".", r"\.")):
        load_config(None, overrides)


def test_assignment_syntax():
    with pytest.raises(FeatcacheError, match="KEY=VALUE"):
        parse_assignments(["novalue"])


def test_documented_default_toml_names_every_key():
    from pipeline.utils.config import config_keys, read_toml

    raw = read_toml(REPO / "configs" / "default.toml", "config file")
    assert {f"{s}.{k}" for s, table in raw.items() for k in table} == set(config_keys())


def test_every_command_takes_config_and_set_and_its_flags_come_from_the_schema():
    import argparse

    from pipeline.cli import FLAGS, build_parser
    from pipeline.utils.config import config_keys

    def commands(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = list(commands(sub, f"{prefix}{name} "))
                    yield from nested or [(f"{prefix}{name}", sub)]

    keys = config_keys()
    found = dict(commands(build_parser()))
    assert set(found) == set(FLAGS)
    for name, parser in found.items():
        options = {o for a in parser._actions for o in a.option_strings}
        assert {"--config", "--set", "--quiet"} <= options, name
        for key in FLAGS[name]:
            assert keys[key].option.flag in options, (name, key)
    flagged = {k for k, key in keys.items() if key.option.flag} - {"extract.progress"}
    assert flagged == {k for shown in FLAGS.values() for k in shown}  # no flag is declared and never shown
