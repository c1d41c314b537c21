from pathlib import Path

from mmrad.config_docs import replace_section

README = Path(__file__).parents[1] / "README.md"


def test_readme_config_reference_is_generated_from_the_models():
    text = README.read_text()
    assert replace_section(text) == text, "run: python -m mmrad.config_docs --write README.md"


def test_readme_starts_with_the_two_setup_commands():
    first_block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_fault_table_is_generated_from_the_last_fault_run():
    from tests.helpers.fault_table import read_figures, replace_table

    text = README.read_text()
    assert replace_table(text, read_figures()) == text, (
        "run: python -m tests.helpers.fault_table --write README.md"
    )
