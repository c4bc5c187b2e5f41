"""The README cites only what ships: every repository path it names in backticks (examples/,
tests/, bench/, .ci/, or one that climbs out with ../) is a file or folder of this repository."""

from __future__ import annotations

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
REPOSITORY_PATH = re.compile(r"`((?:\.\./|\./)?(?:examples|tests|bench|\.ci|\.\.)/[^`\s]*)`")


def test_readme_names_only_files_that_ship():
    named = {m.group(1) for m in REPOSITORY_PATH.finditer(README)}
    assert "examples/load-balancer.service" in named, "the scan is broken"
    outside = sorted(path for path in named if ".." in path.split("/"))
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not outside and not missing, f"outside the repository: {outside}; missing: {missing}"
