"""One typed config: the documented defaults file, overrides, and strict validation."""

from __future__ import annotations

import pytest
from conftest import REPO

from pipeline.utils.config import Config, load_config
from pipeline.utils.schema import parse_assignments
from pipeline.utils.errors import FeatcacheError


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
