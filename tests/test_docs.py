"""What users read points at what they have: no README line, docstring, error message, config comment or
``rayq codecs`` row refers to the project's internal notes (their file names or their section numbers)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTERNAL = re.compile(r"ALGORITHMS\.md|RAY_NOTES|DESIGN\.md|STYLE\.md|§\s?\d")


def _files() -> list[Path]:
    roots = ["README.md", "pyproject.toml", "compressors", "rayq", "trainers", "tests", "tune_spaces", "clusters"]
    out = []
    for r in roots:
        p = REPO / r
        out += [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.suffix in
                                        (".py", ".md", ".yaml", ".yml", ".sh", ".json", ".toml", "")]
    return [f for f in out if "__pycache__" not in f.parts]


def test_nothing_users_read_points_at_internal_notes():
    hits = []
    for f in _files():
        if f == Path(__file__):
            continue
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if INTERNAL.search(line):
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert hits == []


def test_every_codec_row_cites_its_source_or_says_it_is_a_baseline():
    import compressors

    for name, cls in compressors.REGISTRY.items():
        assert not INTERNAL.search(cls.summary), name
        if name not in ("none", "bf16"):
            assert cls.source, f"codec {name!r} does not say where it comes from"


def test_pyproject_lists_every_package_folder():
    """Every folder under rayq/, compressors/ and trainers/ that holds code or shipped data is a package in
    pyproject.toml (an unlisted one is left out of the wheel, and setuptools warns at every install)."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {REPO / path: name for name, path in config.get("package-dir", {}).items()}
    found = set()
    for top in ("rayq", "compressors", "trainers"):
        for folder in [REPO / top, *(REPO / top).rglob("*")]:
            if not folder.is_dir() or folder.name == "__pycache__":
                continue
            if any(f.suffix in (".py", ".json", ".yaml", ".md") for f in folder.iterdir() if f.is_file()):
                found.add(".".join(folder.relative_to(REPO).parts))
    assert found - listed == set(), "folders missing from [tool.setuptools] packages"
    assert all((REPO / p.replace(".", "/")).is_dir() or p in mapped.values() or p == "rayq.resources"
               for p in listed)


def test_the_readmes_codec_distortions_are_what_the_codecs_measure():
    """The figures behind "error feedback needs a contractive codec" are each codec's measured Gaussian
    distortion (the same one the config error quotes), to the digits the README gives."""
    from compressors import make_codec

    text = (REPO / "README.md").read_text()
    found = re.search(r"QSGD at its default 7 levels leaves ([\d.]+)× the input's energy as error, vqSGD ([\d.]+)×, "
                      r"rescaled random-k ([\d.]+)×.*?QSGD at 15 levels leaves ([\d.]+)×", text, re.S)
    assert found, "the README's distortion sentence moved: update this test"
    codecs = [make_codec("qsgd"), make_codec("vqsgd"), make_codec("randomk"), make_codec("qsgd", {"levels": 15})]
    for written, codec in zip(found.groups(), codecs):
        digits = len(written.split(".")[1])
        assert float(written) == round(codec.gaussian_distortion(), digits), (codec.spec, written)
