"""The maps a newcomer follows name files that exist: docs/config-map.md (each Envoy field to the
file that reads it and the files that act on it) and the README's layout table."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_file_the_config_map_names_exists():
    text = (ROOT / "docs" / "config-map.md").read_text()
    named = set(re.findall(r"[A-Za-z][\w+-]*/[\w+/.-]*\.swift", text))
    assert len(named) > 20, "the map names the files"
    missing = sorted(p for p in named if not (ROOT / "Sources" / p).is_file())
    assert missing == [], f"docs/config-map.md names files that are not under Sources/: {missing}"


def test_every_path_the_readme_layout_names_exists():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 1)]
    named = set(re.findall(r"`((?:Sources|Tests|tests|scripts|docs|Protos|web-demo|deploy|envoy-compat)[^`\s]*)`", layout))
    assert len(named) > 10
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert missing == [], f"README's layout names paths that do not exist: {missing}"
