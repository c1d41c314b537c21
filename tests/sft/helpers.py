"""Small SFT configs for tests: the tiny model, 2 CPU workers, a few steps."""

from mmrad.config import SFTJobConfig, load_config


def sft_config(model: str, manifest: str, storage_path: str, name: str, *overrides: str):
    base = [
        f"model.path={model}",
        f"data.manifest={manifest}",
        f"run.storage_path={storage_path}",
        f"run.name={name}",
        "ray.num_cpus=2",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        "train.batch_size_per_worker=4",
        "train.val_samples=4",
        "train.log_every=1",
        "data.pixels.max_pixels=12544",
        "model.pixels.max_pixels=12544",
    ]
    return load_config(SFTJobConfig, "configs/local/sft.yaml", [*base, *overrides])
