import pytest

from mmrad.config import ConfigError, DataJobConfig, SFTJobConfig, dump_config, load_config


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_file_and_overrides_are_merged_and_typed(tmp_path):
    path = write(tmp_path, "data:\n  seed: 4\n  synthetic:\n    image_size: 96\n")
    config = load_config(
        DataJobConfig, path, ["data.synthetic.categories=[brick, grass]", "data.seed=9"]
    )
    assert config.data.seed == 9
    assert config.data.synthetic.image_size == 96
    assert config.data.synthetic.categories == ["brick", "grass"]


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "data:\n  synthetic:\n    image_sise: 96\n")
    with pytest.raises(ConfigError) as err:
        load_config(DataJobConfig, path)
    message = str(err.value)
    assert str(path) in message
    assert "data.synthetic.image_sise" in message
    assert "image_size" in message and "did you mean" in message


def test_bad_value_names_key_and_what_is_allowed(tmp_path):
    path = write(tmp_path, "data:\n  on_bad_image: maybe\n")
    with pytest.raises(ConfigError, match=r"data\.on_bad_image.*'skip' or 'fail'.*maybe"):
        load_config(DataJobConfig, path)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(DataJobConfig, None, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(DataJobConfig, tmp_path / "absent.yaml")


def test_cross_field_rule_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="needs `input`"):
        load_config(DataJobConfig, None, ["data.source=mvtec"])


def test_dump_round_trips(tmp_path):
    config = load_config(DataJobConfig, None, ["data.seed=5"])
    again = load_config(DataJobConfig, write(tmp_path, dump_config(config)))
    assert again == config


@pytest.mark.parametrize(
    ("model", "path"),
    [
        (DataJobConfig, "configs/local/data.yaml"),
        (DataJobConfig, "configs/cluster/data.yaml"),
        (SFTJobConfig, "configs/local/sft.yaml"),
        (SFTJobConfig, "configs/cluster/sft.yaml"),
    ],
)
def test_shipped_configs_validate(model, path):
    load_config(model, path)
