"""What the project's files point a reader at exists in the repository."""

import re
from pathlib import Path

from conftest import run

import prepare


def test_help_and_docstrings_point_at_files_the_project_has():
    """No file sends a reader outside the repository (a user's clone has no ../shared), and every docs/ page that a
    file names exists."""
    code, output = run(prepare.app, "--help")
    assert code == 0 and "docs/datasets.md" in " ".join(output.split())
    project = Path(__file__).resolve().parent.parent
    files = [*project.glob("*.py"), *project.glob("*.md"), *project.glob("docs/*.md"), *project.glob("tests/*.py")]
    for path in files:
        text = path.read_text() if path.name != Path(__file__).name else ""  # this file names what it looks for
        assert "../shared" not in text and "STOP_SPEC" not in text and "DATASETS.md" not in text, path
        for page in re.findall(r"docs/[\w-]+\.(?:md|png)", text):
            assert (project / page).is_file(), (path, page)
