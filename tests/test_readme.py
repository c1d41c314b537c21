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


def test_readme_commands_are_read_whole_and_templates_named():
    """What the after-the-demo check of tests/test_job_submit.py walks through."""
    from tests.helpers.readme_commands import readme_commands

    commands = {c.line: c for c in readme_commands()}
    serve = [c for c in commands.values() if c.argv[:2] == ["mmrad", "serve"]]
    assert serve and serve[0].argv[-2:] == ["--config", "configs/local/serve.yaml"]
    joined = [c for c in commands.values() if "schedule.max_steps=40" in c.argv]
    assert joined and joined[0].argv[1] == "sft"  # the loopback-netns wrapper dropped
    own_data = [c for c in commands.values() if "/data/mvtec_ad" in c.argv]
    assert own_data and all(c.template_reason() == "the reader's own data" for c in own_data)
    assert sum(c.template_reason() is None for c in commands.values()) >= 15
