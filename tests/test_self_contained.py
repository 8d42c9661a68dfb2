"""The repository needs nothing beside it: no tracked file refers to a sibling folder."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A path that climbs out of the repository into a sibling folder, e.g. ../shared/fixtures.
OUTSIDE = re.compile(r"\.\./shared|\"\.\.\", \"\.\.\", \"shared\"|'\.\.', '\.\.', 'shared'")


def test_no_tracked_file_reads_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    offenders = []
    for name in files:
        if name.endswith((".npz", ".nc", ".npy")) or name == "tests/test_self_contained.py":
            continue
        with open(os.path.join(ROOT, name), errors="replace") as f:
            for number, line in enumerate(f, 1):
                if OUTSIDE.search(line):
                    offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_fixtures_are_in_the_repository():
    from conftest import FIXTURE_DIR
    if "GRAPHCAST_FIXTURE_DIR" not in os.environ:
        assert os.path.realpath(FIXTURE_DIR).startswith(os.path.realpath(ROOT) + os.sep)
    assert os.path.exists(os.path.join(FIXTURE_DIR, "checkpoint.npz"))
