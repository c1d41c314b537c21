"""Small SFT configs for tests: the tiny model, 2 CPU workers, a few steps."""

from mmrad.config import SFTJobConfig, load_config


def sft_config(model: str, manifest: str, storage_path: str, name: str, *overrides: str):
    base = [
        f"model.path={model}",
        f"data.manifest={manifest}",
        f"run.storage_path={storage_path}",
        f"run.name={name}",
        "ray.num_cpus=2",
        "learners.num_workers=2",
        "learners.cpus_per_worker=0.5",
        "learners.micro_batch_size=4",
        "validation.samples=4",
        "schedule.log_every=1",
        "data.pixels.max_pixels=12544",
        "model.pixels.max_pixels=12544",
    ]
    return load_config(SFTJobConfig, "configs/local/sft.yaml", [*base, *overrides])
