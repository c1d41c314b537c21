"""``mmrad data build``: run a builder, copy its images, assign splits, write the manifest.

The manifest is written last and atomically, so an interrupted or failed build never
leaves a manifest that points at missing images. A folder that already holds a manifest
is refused before anything is written (:func:`check_out_is_free`): a new build would
overwrite images the old manifest still points at. A folder with images but no manifest
(a build cut short) is built into again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from rich.progress import Progress

import mmrad.data.builders  # noqa: F401  (registers the builders)
from mmrad.config import DataBuildConfig
from mmrad.data.builders.base import BUILDERS, BuildLog, DataBuildError, Draft
from mmrad.data.builders.synthetic import SOURCE as SYNTHETIC
from mmrad.data.manifest import manifest_uri, write_manifest
from mmrad.data.schema import validate_records
from mmrad.data.splits import assign_splits, category_key, is_unused, unmatched_held_out
from mmrad.storage import ObjectMissing, Storage, join

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    manifest_uri: str
    records: int
    skipped: dict[str, str] = field(default_factory=dict)
    unused: int = 0
    """Published training images of held-out categories, left out of every split."""


def build_dataset(config: DataBuildConfig, storage: Storage, progress: bool = True) -> BuildResult:
    check_out_is_free(config.out, storage)
    build_log = BuildLog(policy=config.on_bad_image)
    written: set[str] = set()
    ids: set[str] = set()
    published: dict[str, str | None] = {}
    records = []
    unused = 0
    with Progress(disable=not progress, transient=True) as bar:
        drafts = drafts_to_write(config, build_log, bar)
        storage.ensure_bucket(config.out)
        task = bar.add_task(f"building {config.source}", total=None)
        for draft in drafts:
            record = {**draft.record, "split": "train"}
            if record["id"] in ids:
                build_log.bad(record["id"], "duplicate id (two input files map to it)")
                continue
            ids.add(record["id"])
            validate_records([record], f"{config.source} builder output")
            if is_unused(record, draft.published_split, config.split):
                unused += 1
                continue
            for relative, load in draft.files.items():
                if relative not in written:
                    storage.write_bytes(join(config.out, relative), load())
                    written.add(relative)
            published[record["id"]] = draft.published_split
            records.append(record)
            bar.advance(task)
    if not records:
        raise DataBuildError(f"{config.source} builder found no usable images in {config.input}")
    assign_splits(records, config.split, config.seed, mode=config.split_mode, published=published)
    records.sort(key=lambda r: r["id"])
    uri = write_manifest(storage, records, config.out, split_info(config))
    if build_log.skipped:
        log.warning("skipped %d bad images (see the log above)", len(build_log.skipped))
    if unused:
        log.info("left out %d training images of held-out categories", unused)
    return BuildResult(uri, len(records), dict(build_log.skipped), unused)


def holds_data_set(out: str, storage: Storage) -> bool:
    """Whether ``out`` holds a manifest (a data set built there)."""
    try:
        return storage.exists(manifest_uri(out))
    except ObjectMissing:  # no bucket yet: nothing built there
        return False


def check_out_is_free(out: str, storage: Storage) -> None:
    """Refuse ``out`` when it already holds a manifest (a data set built before): the new
    images would overwrite the ones it points at, mixing two data sets under it."""
    target = manifest_uri(out)
    if holds_data_set(out, storage):
        raise DataBuildError(
            f"data.out {out}: this folder already holds a data set ({target}); building "
            "into it would overwrite images that manifest points at. Build into a new "
            "folder (data.out), or delete this one first"
        )


def drafts_to_write(config: DataBuildConfig, build_log: BuildLog, bar: Progress) -> Iterable[Draft]:
    """The builder's drafts, with the held-out names checked before anything is written:
    synthetic categories are known from the config; an importer's drafts are read in full
    first (they hold file loaders, not image bytes)."""
    drafts = BUILDERS[config.source](config, build_log)
    if config.source == SYNTHETIC:
        check_held_out_names(
            config, {SYNTHETIC}, {f"{SYNTHETIC}/{c}" for c in config.synthetic.categories}
        )
        return drafts
    task = bar.add_task(f"reading {config.source}", total=None)
    listed = []
    for draft in drafts:
        listed.append(draft)
        bar.advance(task)
    sources = {draft.record["source"] for draft in listed}
    check_held_out_names(config, sources, {category_key(draft.record) for draft in listed})
    return listed


def check_held_out_names(config: DataBuildConfig, sources: set[str], categories: set[str]) -> None:
    """A held-out name that matches nothing would leave its category in training."""
    problems = unmatched_held_out(config.split, sources, categories)
    if problems:
        raise DataBuildError(
            f"data.split.{'; '.join(problems)} names nothing in {config.input or config.source}"
            f" (sources: {', '.join(sorted(sources)) or 'none'}; categories: "
            f"{', '.join(sorted(categories)) or 'none'})"
        )


def split_info(config: DataBuildConfig) -> dict[str, object]:
    """What the manifest records about how its splits were made."""
    return {"mode": config.split_mode, **config.split.model_dump(exclude={"mode"})}
