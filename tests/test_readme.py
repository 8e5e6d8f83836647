"""The README's test command is what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = readme.split("```bash\n")
    assert len(blocks) >= 3, "README must start with the quickstart and the test command"
    test_cmd = blocks[2].split("\n```")[0].strip()
    assert "pytest" in test_cmd
    assert test_cmd in ci.splitlines(), f"{test_cmd!r} is not a line of .ci/run"
