"""The export contract: one resolution of prompt, pixels and knowledge for every job."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mmrad.config import (
    ConfigError,
    EngineConfig,
    PixelBudget,
    PromptConfig,
    PromptOverrides,
    SFTJobConfig,
    validate_config,
)
from mmrad.engine.requests import InspectionInput
from mmrad.eval.config import ModelTarget, PredictorsConfig, SamplingConfig
from mmrad.eval.inference import InferenceSpec, _Predictor
from mmrad.model.contract import (
    TRAINING_LABELS,
    export_knowledge,
    model_info,
    read_knowledge_file,
    resolve_contract,
    training_knowledge,
)
from mmrad.model.export import ExportError
from mmrad.storage import Storage
from mmrad.task.knowledge import CategoryKnowledge, KnowledgeError

STORAGE = Storage()
EXPORTED_PIXELS = {"min_pixels": 3136, "max_pixels": 12544, "factor": 28}
BOTTLE = CategoryKnowledge(("broken", "contamination"), "A glass bottle seen from above.")


def write_export(folder, knowledge=None, origin=TRAINING_LABELS) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "prompt": {"use_reference": False, "domain_knowledge": True, "reasoning": True},
        "pixels": EXPORTED_PIXELS,
        "knowledge": export_knowledge(knowledge or {"bottle": BOTTLE}, origin),
        "lora": "merged",
    }
    (folder / "mmrad.json").write_text(json.dumps(info))
    (folder / "config.json").write_text("{}")
    return str(folder)


def write_knowledge_file(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def contract_of(export: str, overrides: PromptOverrides = PromptOverrides()):  # noqa: B008
    return resolve_contract(export, model_info(export, STORAGE, "path"), overrides, STORAGE, "t")


def test_the_export_decides_everything_without_overrides(tmp_path):
    contract = contract_of(write_export(tmp_path / "export"))
    assert contract.prompt.variant_dict() == {  # exported before box units and wordings
        "use_reference": False, "domain_knowledge": True, "reasoning": True,
        "box_units": "pixels", "wording": "full",
    }  # fmt: skip
    assert contract.answer_unit == 1
    assert contract.pixels == PixelBudget(**EXPORTED_PIXELS)
    assert contract.knowledge == {"bottle": BOTTLE}
    assert contract.knowledge_of("bottle") == BOTTLE
    assert contract.knowledge_of("unseen") is None and contract.knowledge_of(None) is None
    assert contract.from_export and contract.overrides == {}
    assert contract.record()["knowledge_origin"] == TRAINING_LABELS


def test_an_override_wins_is_logged_and_recorded(tmp_path, caplog):
    export = write_export(tmp_path / "export")
    other = {"screw": {"defect_types": ["thread"], "description": "A metal screw."}}
    file = write_knowledge_file(tmp_path / "k.json", other)
    overrides = PromptOverrides(reasoning=False, pixels=PixelBudget(), knowledge_file=file)
    with caplog.at_level(logging.WARNING, logger="mmrad.model.contract"):
        contract = contract_of(export, overrides)
    assert not contract.prompt.reasoning and not contract.prompt.use_reference  # one key only
    assert contract.pixels == PixelBudget()
    assert contract.knowledge == {"screw": CategoryKnowledge(("thread",), "A metal screw.")}
    assert contract.overrides == {
        "prompt.reasoning": {"export": True, "used": False},
        "prompt.pixels": {"export": EXPORTED_PIXELS, "used": PixelBudget().model_dump()},
        "prompt.knowledge": {"export": TRAINING_LABELS, "used": file},
    }
    assert contract.record()["overrides"] == contract.overrides
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for key in contract.overrides:
        assert f"overrides {key} of {export}" in logged


def test_an_export_in_cells_is_read_in_cells_of_its_grid_unless_overridden(tmp_path):
    export = write_export(tmp_path / "export")
    info = json.loads(Path(export, "mmrad.json").read_text())
    info["prompt"]["box_units"] = "cells"
    info["pixels"] = {**info["pixels"], "factor": 32}
    Path(export, "mmrad.json").write_text(json.dumps(info))
    contract = contract_of(export)
    assert contract.variant.box_units == "cells" and contract.answer_unit == 32
    assert contract.record()["prompt"]["box_units"] == "cells"
    overridden = contract_of(export, PromptOverrides(box_units="pixels"))
    assert overridden.answer_unit == 1
    assert overridden.overrides["prompt.box_units"] == {"export": "cells", "used": "pixels"}


def test_unknown_box_units_in_a_config_name_the_key():
    with pytest.raises(
        ConfigError, match=r"sft.yaml: key 'prompt.box_units': Input should be 'pixels' or 'cells'"
    ):
        validate_config(SFTJobConfig, {"prompt": {"box_units": "inches"}}, "sft.yaml")


def test_an_override_equal_to_the_export_changes_nothing(tmp_path, caplog):
    export = write_export(tmp_path / "export")
    with caplog.at_level(logging.WARNING, logger="mmrad.model.contract"):
        contract = contract_of(export, PromptOverrides(use_reference=False))
    assert contract.overrides == {} and not caplog.records


def test_a_model_without_mmrad_json_takes_the_config_and_defaults(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    contract = contract_of(str(plain), PromptOverrides(reasoning=False))
    assert contract.prompt == PromptConfig(reasoning=False)
    assert contract.pixels == PixelBudget()
    assert contract.knowledge == {} and contract.knowledge_origin is None
    assert not contract.from_export and contract.overrides == {}
    with pytest.raises(ExportError, match=r"path .*nothing: no model there"):
        model_info(str(tmp_path / "nothing"), STORAGE, "path")


def test_a_broken_contract_names_the_export(tmp_path):
    export = tmp_path / "export"
    write_export(export)
    (export / "mmrad.json").write_text(json.dumps({"prompt": {"reasoning": "maybe"}}))
    with pytest.raises(ExportError, match=r"export/mmrad.json: not a valid export contract"):
        contract_of(str(export))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected a mapping of category"),
        ({"bottle": ["broken"]}, "bottle: expected"),
        ({"bottle": {"types": ["broken"]}}, r"bottle: unknown field\(s\) \['types'\]"),
        ({"bottle": {"defect_types": "broken"}}, "bottle: defect_types must be a list"),
        ({"bottle": {"description": "two\nlines"}}, "bottle: description must be one line"),
    ],
)
def test_a_bad_knowledge_file_names_file_category_and_field(tmp_path, data, message):
    file = write_knowledge_file(tmp_path / "knowledge.json", data)
    with pytest.raises(KnowledgeError, match=f"knowledge_file {file}: {message}"):
        read_knowledge_file(file, STORAGE)


def test_knowledge_files_may_be_yaml_and_missing_ones_are_config_errors(tmp_path):
    file = tmp_path / "knowledge.yaml"
    file.write_text("bottle:\n  defect_types: [broken]\n  description: A bottle.\n")
    assert read_knowledge_file(str(file), STORAGE) == {
        "bottle": CategoryKnowledge(("broken",), "A bottle.")
    }
    with pytest.raises(ConfigError, match="knowledge_file .*absent.json: cannot be read"):
        read_knowledge_file(str(tmp_path / "absent.json"), STORAGE)


def test_training_knowledge_is_the_file_or_the_given_training_labels_only(tmp_path):
    train = [
        {"category": "bottle", "labels": ["broken"]},
        {"category": "bottle", "labels": []},
    ]
    knowledge, origin = training_knowledge(PromptConfig(), train, STORAGE)
    assert knowledge == {"bottle": CategoryKnowledge(("broken",))} and origin == TRAINING_LABELS
    file = write_knowledge_file(tmp_path / "k.json", {"cable": {"defect_types": ["bent"]}})
    with_file = PromptConfig(domain_knowledge=True, knowledge_file=file)
    knowledge, origin = training_knowledge(with_file, train, STORAGE)
    assert knowledge == {"cable": CategoryKnowledge(("bent",))} and origin == file
    unused = PromptConfig(domain_knowledge=False, knowledge_file=str(tmp_path / "absent.json"))
    assert training_knowledge(unused, train, STORAGE)[1] == TRAINING_LABELS  # file not read


def test_mmads_domain_knowledge_file_reads_as_is(tmp_path):
    mmad = {
        "MVTec-AD": {
            "bottle": {
                "good": "Good\n Description: A clear glass bottle seen from above.\n More.",
                "broken_large": "Broken large\n Description: A large piece is missing.",
                "contamination": "Contamination\n Description: Dirt inside.",
            }
        },
        "VisA": {"pcb1": {"good": "Good\n A green board.", "bent": "Bent\n A bent pin."}},
    }
    file = write_knowledge_file(tmp_path / "domain_knowledge.json", mmad)
    assert read_knowledge_file(file, STORAGE) == {
        "bottle": CategoryKnowledge(("broken_large", "contamination"),
                                    "A clear glass bottle seen from above."),
        "pcb1": CategoryKnowledge(("bent",), "A green board."),
    }  # fmt: skip
    mmad["VisA"]["bottle"] = {"good": "Good\n Description: Another bottle."}
    file = write_knowledge_file(tmp_path / "twice.json", mmad)
    with pytest.raises(KnowledgeError, match="'bottle' is in both 'MVTec-AD' and 'VisA'"):
        read_knowledge_file(file, STORAGE)


def test_the_knowledge_digest_follows_the_content_and_the_export_records_it(tmp_path):
    export = write_export(tmp_path / "export")
    contract = contract_of(export)
    entry = export_knowledge({"bottle": BOTTLE}, TRAINING_LABELS)
    assert contract.record()["knowledge_sha256"] == entry["sha256"]
    changed = export_knowledge({"bottle": CategoryKnowledge(("broken",))}, TRAINING_LABELS)
    assert changed["sha256"] != entry["sha256"]


def test_domain_knowledge_without_any_is_warned(tmp_path, caplog):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="mmrad.model.contract"):
        contract_of(str(plain), PromptOverrides(domain_knowledge=True))
    assert "prompted with domain knowledge but has none" in caplog.text


def test_evaluation_prompts_take_knowledge_from_the_contract_never_the_row(tmp_path):
    """A test record's own labels never reach its prompt: a held-out category the export
    knows nothing of gets no knowledge, whatever the row carries."""
    export = write_export(tmp_path / "export")
    spec = InferenceSpec.build(ModelTarget(path=export), SamplingConfig(), PromptOverrides(),
                               EngineConfig(), PredictorsConfig(), STORAGE)  # fmt: skip
    predictor = _Predictor(spec, to_input=lambda row: row)
    seen = predictor.with_knowledge(InspectionInput(image=None, category="bottle"))
    unseen = InspectionInput(image=None, category="capsule", knowledge=CategoryKnowledge(("x",)))
    assert seen.knowledge == BOTTLE
    assert predictor.with_knowledge(unseen).knowledge is None
    assert spec.variant.domain_knowledge and spec.pixels == PixelBudget(**EXPORTED_PIXELS)


def test_serve_detect_gives_a_named_category_its_knowledge(tmp_path):
    from mmrad.serve.detect import inspection

    contract = contract_of(write_export(tmp_path / "export"))
    assert inspection(None, None, "bottle", contract).knowledge == BOTTLE
    assert inspection(None, None, "", contract).knowledge is None  # no category named
    assert inspection(None, None, "capsule", contract).knowledge is None
