"""Repository invariants: dependency lists agree, the README's files exist, notebooks export the package."""
import configparser
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _settings():
    c = configparser.ConfigParser(delimiters=["="])
    c.read(ROOT / "settings.ini")
    return c["DEFAULT"]


def _env_yml_pip():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    out = []
    for l in lines[start + 1:]:
        m = re.match(r'^\s{4,}-\s+"?([^"]+)"?\s*$', l)
        if not m:
            break
        out.append(m.group(1))
    return out


def test_environment_yml_matches_settings_ini():
    d = _settings()
    reqs = shlex.split(d["requirements"]) + shlex.split(d["dev_requirements"])
    for key in d:
        if key.endswith("_extra_requirements"):
            reqs += shlex.split(d[key])
    pip = [r for r in _env_yml_pip() if r != "-e ."]
    assert len(pip) == len(set(pip)), "environment.yml lists a package twice"
    assert set(pip) == set(reqs), set(pip) ^ set(reqs)
    py = re.search(r"-\s*python>=([\d.]+)", (ROOT / "environment.yml").read_text())
    assert py and py.group(1) == d["min_python"]


def test_nbdev_pins():
    reqs = shlex.split(_settings()["requirements"])
    assert "nbdev==2.4.14" in reqs
    assert any(r.startswith("execnb>=0.1.12") for r in reqs)
    assert any(r.startswith("fastcore>=1.12.3") for r in reqs)


def test_every_module_comes_from_a_notebook():
    import json
    exported = set()
    for nb in (ROOT / "nbs").glob("*.ipynb"):
        for cell in json.loads(nb.read_text())["cells"]:
            m = re.match(r"#\|\s*default_exp\s+(\S+)", "".join(cell["source"]))
            if cell["cell_type"] == "code" and m:
                exported.add(m.group(1))
    modules = {p.stem for p in (ROOT / "saferclip").glob("*.py") if not p.stem.startswith("_")}
    assert modules <= exported, modules - exported


def test_no_machine_paths_committed():
    bad = re.compile(r"/(work|root|home/\w+)/")
    for p in list((ROOT / "saferclip").glob("*.py")) + list((ROOT / "nbs").glob("*.ipynb")) + [ROOT / "README.md"]:
        if p.exists():
            assert not bad.search(p.read_text()), p


def test_no_machine_paths_in_results():
    bad = re.compile(r"/(work|root|home/\w+|tmp)/")
    for p in list((ROOT / "results").rglob("*.md")) + list((ROOT / "results").rglob("*.json")) + \
            list((ROOT / "results").rglob("*.csv")):
        assert not bad.search(p.read_text()), p
