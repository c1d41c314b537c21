import pytest

from mmrad.config import ConfigError, DataJobConfig, SFTJobConfig, dump_config, load_config
from mmrad.eval.config import EvalJobConfig
from mmrad.rl.config import GRPOJobConfig


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
        (DataJobConfig, "configs/local/learning/data.yaml"),
        (SFTJobConfig, "configs/local/learning/sft.yaml"),
        (EvalJobConfig, "configs/local/learning/eval.yaml"),
        (GRPOJobConfig, "configs/local/learning/grpo.yaml"),
    ],
)
def test_shipped_configs_validate(model, path):
    load_config(model, path)


SHARED_TRAINING_KEYS = (
    "learners.num_workers", "learners.use_gpu", "learners.cpus_per_worker",
    "learners.gpus_per_worker", "learners.micro_batch_size", "learners.fsdp.version",
    "learners.fsdp.mixed_precision", "optimizer.lr", "optimizer.weight_decay",
    "optimizer.max_grad_norm", "schedule.max_steps", "schedule.warmup_ratio",
    "schedule.min_lr_ratio", "schedule.seed", "schedule.checkpoint_every", "schedule.log_every",
)  # fmt: skip


@pytest.mark.parametrize("key", SHARED_TRAINING_KEYS)
def test_sft_and_grpo_name_what_they_share_the_same_way(key):
    from mmrad.config import leaf_keys
    from mmrad.rl.config import GRPOJobConfig

    for model in (SFTJobConfig, GRPOJobConfig):
        assert key in leaf_keys(model().model_dump()), (model.__name__, key)


@pytest.mark.parametrize(
    ("model_name", "old", "new"),
    [
        ("sft", "train.lr=0.1", "optimizer.lr"),
        ("sft", "scaling.num_workers=1", "learners.num_workers"),
        ("sft", "fsdp.version=1", "learners.fsdp.version"),
        ("sft", "train.batch_size_per_worker=2", "learners.micro_batch_size"),
        ("sft", "train.val_every=5", "validation.every"),
        ("grpo", "algorithm.lr=0.1", "optimizer.lr"),
        ("grpo", "algorithm.max_grad_norm=2", "optimizer.max_grad_norm"),
        ("grpo", "algorithm.warmup_ratio=0.1", "schedule.warmup_ratio"),
    ],
)
def test_old_keys_fail_naming_the_new_key(model_name, old, new):
    from mmrad.rl.config import GRPOJobConfig

    model = {"sft": SFTJobConfig, "grpo": GRPOJobConfig}[model_name]
    with pytest.raises(ConfigError, match=f"key '{old.split('=')[0]}' is now '{new}'"):
        load_config(model, None, [old])


def test_old_keys_in_a_file_are_named_with_the_file(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  lr: 0.1\n  seed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTJobConfig, path)
    assert str(path) in str(err.value)
    assert "'train.lr' is now 'optimizer.lr'" in str(err.value)
    assert "'train.seed' is now 'schedule.seed'" in str(err.value)


@pytest.mark.parametrize("job", ["sft", "grpo"])
def test_both_jobs_refuse_images_off_the_model_grid(job):
    from mmrad.rl.config import GRPOJobConfig

    model = {"sft": SFTJobConfig, "grpo": GRPOJobConfig}[job]
    with pytest.raises(ConfigError, match="data.pixels .* differ from model.pixels"):
        load_config(model, None, ["data.pixels.max_pixels=12544"])


def test_one_path_resolver_makes_every_local_path_absolute(tmp_path, monkeypatch):
    """Every path field of every job, at any depth: local paths absolute, object-store
    URIs and hub ids as given (a hub id is a model name that is no local path)."""
    from mmrad.config import with_absolute_paths
    from mmrad.rl.config import GRPOJobConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/tiny").mkdir(parents=True)
    sft = with_absolute_paths(load_config(SFTJobConfig, None, [
        "model.path=models/tiny", "data.manifest=s3://bucket/data/manifest.parquet",
        "run.storage_path=runs/sft", "export.out=out/export",
    ]))  # fmt: skip
    assert sft.model.path == str(tmp_path / "models/tiny")
    assert sft.model.cache_dir is None  # each node's own folder, never the driver's
    assert sft.data.manifest == "s3://bucket/data/manifest.parquet"
    assert sft.run.storage_path == str(tmp_path / "runs/sft")
    assert sft.export.out == str(tmp_path / "out/export")
    grpo = with_absolute_paths(load_config(GRPOJobConfig, None, ["model.path=Org/hub-model"]))
    assert grpo.model.path == "Org/hub-model"
    assert grpo.run.storage_path == str(tmp_path / "runs/grpo")
    assert grpo.data.manifest == str(tmp_path / "runs/data/synthetic/manifest.parquet")


def _path_values(section, prefix=""):
    from pydantic import BaseModel

    from mmrad.config import path_fields

    kinds = path_fields(type(section))
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            yield from _path_values(value, f"{prefix}{name}.")
        elif name in kinds and isinstance(value, str):
            yield f"{prefix}{name}", kinds[name], value


@pytest.mark.parametrize("title", ["mmrad sft", "mmrad grpo", "mmrad tune", "mmrad eval run",
                                   "mmrad annotate"])  # fmt: skip
def test_every_jobs_paths_go_through_the_one_resolver(title, tmp_path, monkeypatch):
    """Each job's local paths (its defaults) come out absolute; those that may name a hub
    id or a keyword stay as given when no such local path exists."""
    import os

    from mmrad.config import with_absolute_paths
    from mmrad.config_docs import JOB_CONFIGS

    monkeypatch.chdir(tmp_path)
    given = {"search_space": {"optimizer.lr": {"choice": [0.1]}}} if title == "mmrad tune" else {}
    job = JOB_CONFIGS[title].model_validate(given)
    found = list(_path_values(with_absolute_paths(job)))
    assert {key for key, _, _ in found} >= {"run.storage_path"}
    for key, kind, value in found:
        if kind == "local":
            assert os.path.isabs(value), (key, value)
        else:
            assert value == dict((k, v) for k, _, v in _path_values(job))[key], key


def test_serve_files_get_their_paths_from_the_one_resolver(tmp_path, monkeypatch):
    from mmrad.serve.config import IMPORT_PATH
    from mmrad.serve.deploy import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = {"applications": [{"import_path": IMPORT_PATH, "args": {
        "model_dir": "runs/export", "engine": {"max_num_seqs": 4}}}]}  # fmt: skip
    args = with_absolute_paths(config)["applications"][0]["args"]
    assert args == {"model_dir": str(tmp_path / "runs/export"), "engine": {"max_num_seqs": 4}}


def test_a_model_cache_folder_must_be_one_every_node_can_have():
    from mmrad.eval.config import EvalJobConfig

    assert load_config(SFTJobConfig, None, ["model.cache_dir=/nvme/models"]).model.cache_dir
    with pytest.raises(ConfigError, match=r"target.cache_dir.*'cache' is relative"):
        load_config(EvalJobConfig, None, ["target.cache_dir=cache"])


# -- extends ------------------------------------------------------------------------------


def write_files(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_extends_deep_merges_the_file_on_the_one_it_extends(tmp_path):
    from mmrad.config import read_yaml

    write_files(tmp_path, {
        "base.yaml": "data:\n  seed: 1\n  synthetic: {image_size: 64, categories: [a, b]}\n",
        "variants/child.yaml": "extends: ../base.yaml\ndata:\n  synthetic: {categories: [c]}\n",
        "variants/null.yaml": "extends: child.yaml\ndata: {synthetic: null}\n",
    })  # fmt: skip
    assert read_yaml(tmp_path / "variants/child.yaml") == {
        "data": {"seed": 1, "synthetic": {"image_size": 64, "categories": ["c"]}},  # list replaced
    }
    config = load_config(DataJobConfig, tmp_path / "variants/child.yaml", ["data.seed=3"])
    assert (config.data.seed, config.data.synthetic.categories) == (3, ["c"])
    # a scalar (null too) replaces a mapping
    assert read_yaml(tmp_path / "variants/null.yaml") == {"data": {"seed": 1, "synthetic": None}}


def test_extends_chains_relative_to_each_file(tmp_path):
    from mmrad.config import read_yaml

    write_files(tmp_path, {
        "a.yaml": "data: {seed: 1, synthetic: {image_size: 64}}\n",
        "b/b.yaml": "extends: ../a.yaml\ndata: {seed: 2}\n",
        "b/c/c.yaml": "extends: ../b.yaml\ndata: {synthetic: {image_size: 96}}\n",
    })  # fmt: skip
    assert read_yaml(tmp_path / "b/c/c.yaml") == {
        "data": {"seed": 2, "synthetic": {"image_size": 96}}
    }


def test_extends_cycle_names_the_chain(tmp_path):
    write_files(tmp_path, {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"})
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(DataJobConfig, a)
    assert f"{a} extends {b} extends {a}" in str(err.value)
    write_files(tmp_path, {"self.yaml": "extends: self.yaml\n"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(DataJobConfig, tmp_path / "self.yaml")


def test_extends_missing_file_names_the_chain(tmp_path):
    write_files(tmp_path, {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: gone.yaml\n"})
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(DataJobConfig, tmp_path / "a.yaml")
    chain = " extends ".join(str(tmp_path / name) for name in ("a.yaml", "b.yaml", "gone.yaml"))
    assert chain in str(err.value)


@pytest.mark.parametrize("value", ["[a.yaml]", "''", "3"])
def test_extends_must_be_a_path(tmp_path, value):
    write_files(tmp_path, {"a.yaml": f"extends: {value}\n"})
    with pytest.raises(ConfigError, match="extends must be a file path"):
        load_config(DataJobConfig, tmp_path / "a.yaml")
