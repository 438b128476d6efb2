"""The README and the project's files: the generated flag table is current, no development history."""

import os
import re
import subprocess

from conftest import ROOT

HISTORY = re.compile(r"\bissue \d|\bno gpu was lent\b|\blent to\b|other engineers", re.IGNORECASE)
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def project_files():
    listed = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout
        return []
    return [os.path.join(ROOT, p) for p in listed.stdout.split()
            if p.endswith((".py", ".sh", ".md", ".cfg", ".toml", ".txt")) and not p.startswith("bench/traces/")]


def test_flag_table_is_generated_from_the_parser(capsys):
    from tools import flag_table

    code = flag_table.main(["--check", os.path.join(ROOT, "README.md")])
    assert code == 0, capsys.readouterr().err


def test_no_development_history_in_the_project_files():
    found = []
    for path in project_files():
        if path == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if HISTORY.search(line) or (path.endswith(".md") and COMMIT_HASH.search(line)):
                    found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_readme_starts_with_the_two_command_quickstart():
    readme = open(os.path.join(ROOT, "README.md")).read()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = quickstart.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert commands == ['pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install ".[all]"',
                        "bash bench/quickstart.sh"]
    assert readme.index("## Quickstart") < readme.index("## Common tasks") < readme.index("## Flags")
    assert 'python -m pytest -q -m "not slow" tests' in readme
