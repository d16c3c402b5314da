"""Strict config loading: unknown keys, wrong types and bad files are ConfigErrors naming the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from p2pfm.config import ConfigError, build_config, config_to_dict, load_toml, require


@dataclass(frozen=True)
class Inner:
    """A nested component with a range check."""

    depth: int = 1
    ratio: float = 0.5

    def __post_init__(self) -> None:
        require(self.depth >= 0, "inner.depth", "must be non-negative")


@dataclass(frozen=True)
class Outer:
    """Every kind of field build_config knows about."""

    name: str = "run"
    count: int = 3
    rate: float = 1.0
    enabled: bool = False
    mode: Literal["fast", "slow"] = "fast"
    path: Path = Path("out")
    maybe: Path | None = None
    tags: tuple[str, ...] = ()
    sizes: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


@dataclass(frozen=True)
class NeedsValue:
    """A config with a required field."""

    value: int


def test_build_config_with_no_values_gives_defaults():
    """An empty table builds the dataclass with all its defaults."""
    assert build_config(Outer, {}) == Outer()


def test_build_config_rejects_unknown_key_naming_it():
    """An unknown top-level key is refused and named, with the known keys listed."""
    with pytest.raises(ConfigError, match=r"unknown config key colour") as info:
        build_config(Outer, {"colour": "red"})
    assert "count" in str(info.value)  # the known keys are listed to help the user


def test_build_config_rejects_several_unknown_keys_naming_all():
    """Several unknown keys are all named, sorted."""
    with pytest.raises(ConfigError, match=r"unknown config keys alpha, beta"):
        build_config(Outer, {"beta": 1, "alpha": 2, "count": 4})


def test_build_config_rejects_unknown_nested_key_with_dotted_prefix():
    """An unknown key inside a nested table is named with its dotted path."""
    with pytest.raises(ConfigError, match=r"inner\.colour"):
        build_config(Outer, {"inner": {"colour": "red"}})


@pytest.mark.parametrize(
    ("values", "field_name", "expected"),
    [
        ({"count": 1.5}, "count", "integer"),  # float where int belongs
        ({"count": True}, "count", "integer"),  # bool is not an int here
        ({"count": "3"}, "count", "integer"),
        ({"rate": "fast"}, "rate", "number"),
        ({"rate": True}, "rate", "number"),  # bool is not a float either
        ({"enabled": 1}, "enabled", "true or false"),  # int where bool belongs
        ({"name": 5}, "name", "string"),
        ({"tags": "a,b"}, "tags", "list"),  # str where a list belongs
        ({"tags": ["a", 2]}, r"tags\[1\]", "string"),
        ({"sizes": [1, "x"]}, r"sizes\[1\]", "integer"),
        ({"path": 3}, "path", "path"),
        ({"maybe": 3}, "maybe", "path"),
        ({"mode": "medium"}, "mode", "one of"),
        ({"inner": 5}, "inner", "table"),
        ({"inner": {"depth": 1.0}}, r"inner\.depth", "integer"),
        ({"inner": {"ratio": "big"}}, r"inner\.ratio", "number"),
    ],
)
def test_build_config_rejects_wrong_type_naming_the_field(values, field_name, expected):
    """A value of the wrong type raises ConfigError naming the (dotted) field and the expected type."""
    with pytest.raises(ConfigError, match=rf"^{field_name}: .*{expected}"):
        build_config(Outer, values)


def test_build_config_accepts_int_for_float_and_converts_it():
    """An integer where a float belongs is lossless and becomes a float."""
    config = build_config(Outer, {"rate": 2, "inner": {"ratio": 1}})
    assert config.rate == 2.0 and isinstance(config.rate, float)
    assert config.inner.ratio == 1.0 and isinstance(config.inner.ratio, float)


def test_build_config_builds_nested_dataclasses_literal_path_and_tuple():
    """Nested tables become dataclasses, strings become Paths, lists become tuples or lists."""
    config = build_config(
        Outer,
        {
            "name": "x",
            "enabled": True,
            "mode": "slow",
            "path": "a/b",
            "maybe": "c",
            "tags": ["t1", "t2"],
            "sizes": [1, 2],
            "inner": {"depth": 7},
        },
    )
    assert config.inner == Inner(depth=7, ratio=0.5)
    assert config.mode == "slow"
    assert config.path == Path("a/b") and isinstance(config.path, Path)
    assert config.maybe == Path("c")
    assert config.tags == ("t1", "t2") and isinstance(config.tags, tuple)
    assert config.sizes == [1, 2] and isinstance(config.sizes, list)


def test_build_config_accepts_none_for_optional_field():
    """None is a valid value of an optional field."""
    assert build_config(Outer, {"maybe": None}).maybe is None


def test_build_config_range_check_in_post_init_names_the_field():
    """A __post_init__ range check surfaces as ConfigError naming the field."""
    with pytest.raises(ConfigError, match=r"inner\.depth: must be non-negative"):
        build_config(Outer, {"inner": {"depth": -1}})


@dataclass(frozen=True)
class Holder:
    """Embeds Outer's home-named Inner one level deeper, as a scenario embeds the peer's [model]."""

    outer: Outer = field(default_factory=Outer)


def test_build_config_range_check_of_embedded_config_names_the_full_path():
    """A config that names its fields from its home table ("inner.depth") gets the path above it, once."""
    with pytest.raises(ConfigError, match=r"^outer\.inner\.depth: must be non-negative$"):
        build_config(Holder, {"outer": {"inner": {"depth": -1}}})


def test_build_config_missing_required_field_is_a_config_error():
    """A missing required field is a ConfigError, not a bare TypeError."""
    with pytest.raises(ConfigError, match="value"):
        build_config(NeedsValue, {})


def test_build_config_rejects_non_mapping():
    """A non-table top-level value is refused."""
    with pytest.raises(ConfigError, match="expected a table"):
        build_config(Outer, ["count", 3])  # type: ignore[arg-type]


def test_config_error_is_a_value_error():
    """ConfigError subclasses ValueError, so generic callers still catch it."""
    assert issubclass(ConfigError, ValueError)


def test_load_toml_missing_file_names_the_file(tmp_path):
    """A missing file is a ConfigError naming the path."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml does not exist"):
        load_toml(path)


def test_load_toml_bad_syntax_names_the_file(tmp_path):
    """Invalid TOML is a ConfigError naming the path."""
    path = tmp_path / "broken.toml"
    path.write_text("count = = 3\n")
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML"):
        load_toml(path)


def test_load_toml_directory_is_a_config_error(tmp_path):
    """A path that cannot be read as a file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=str(tmp_path.name)):
        load_toml(tmp_path)


def test_load_toml_reads_tables(tmp_path):
    """A valid file loads into nested dicts that build_config accepts."""
    path = tmp_path / "ok.toml"
    path.write_text('count = 4\nmode = "slow"\n[inner]\ndepth = 2\n')
    config = build_config(Outer, load_toml(path))
    assert config.count == 4 and config.mode == "slow" and config.inner.depth == 2


def test_config_to_dict_round_trips_through_build_config():
    """config_to_dict gives plain values (str paths, lists) that rebuild the same config."""
    config = Outer(
        name="n",
        count=9,
        rate=0.25,
        enabled=True,
        mode="slow",
        path=Path("p/q"),
        maybe=Path("m"),
        tags=("a", "b"),
        sizes=[3],
        inner=Inner(depth=2, ratio=0.1),
    )
    plain = config_to_dict(config)
    assert plain["path"] == "p/q" and plain["maybe"] == "m"
    assert plain["tags"] == ["a", "b"]
    assert plain["inner"] == {"depth": 2, "ratio": 0.1}
    assert build_config(Outer, plain) == config


def test_config_to_dict_includes_every_field():
    """Every dataclass field appears in the dict, nested ones too."""
    plain = config_to_dict(Outer())
    assert set(plain) == {f.name for f in dataclasses.fields(Outer)}
    assert set(plain["inner"]) == {"depth", "ratio"}
