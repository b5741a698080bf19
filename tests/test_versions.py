"""The suite runs on versions inside the ranges pyproject.toml declares, so what the package declares
is what was tested (an open `triton>=3.2` once let pip take a Triton whose interpreter the kernel
tests failed under). The Makefile's pins must lie inside the same ranges."""
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirements():
    """Every requirement pyproject declares: dependencies and all extras."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def _canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(name):
    reqs = [r for r in _requirements() if _canon(r.name) == _canon(name)]
    assert reqs, f"pyproject.toml declares no {name}"
    return reqs


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_installed_torch_and_triton_inside_declared_ranges(name):
    from packaging.version import Version

    try:
        installed = Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        if name == "torch":
            raise
        pytest.skip(f"{name} is not installed (an optional extra)")
    for r in _declared(name):
        assert r.specifier.contains(installed, prereleases=True), (
            f"{name} {installed} is outside pyproject's {r}: the suite would test what the package "
            f"does not declare; install a version in range (make install pins one) or widen the range "
            f"after the tests pass on it")


def test_every_installed_declared_dependency_inside_its_range():
    from packaging.version import Version

    bad = []
    for r in _requirements():
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = Version(metadata.version(r.name))
        except metadata.PackageNotFoundError:
            continue  # an extra that is not installed: nothing was tested with it
        if not r.specifier.contains(installed, prereleases=True):
            bad.append(f"{r.name} {installed} not in {r.specifier}")
    assert not bad, bad


def test_makefile_pins_inside_declared_ranges():
    from packaging.version import Version

    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    for name in ("torch", "triton"):
        m = re.search(rf"^\w+\s*\?=\s*{name}==([\w.+]+)\s*$", text, re.MULTILINE)
        assert m, f"the Makefile pins no {name}==VERSION"
        for r in _declared(name):
            assert r.specifier.contains(Version(m.group(1))), f"Makefile pins {name}=={m.group(1)} outside {r}"


def test_manifests_record_every_library_that_moves_a_figure():
    """The versions a manifest records include the data and tokenizer stack, not just torch and transformers,
    and each is the installed one."""
    from llmprune import runinfo
    from llmprune.runinfo import versions

    v = versions()
    for name in ("torch", "transformers", "tokenizers", "datasets", "accelerate", "safetensors", "numpy"):
        assert name in v, name
    assert v["tokenizers"] == metadata.version("tokenizers") and v["datasets"] == metadata.version("datasets")
    assert v["cpu"] and v["cpu"] == runinfo.cpu_name()  # the processor moves figures too (runinfo.versions)
    assert "gpu" not in v  # CUDA was not used here: not started just to name it


def test_make_test_oldest_pins_the_declared_lower_bounds():
    """`make test-oldest` is what makes a lower bound in pyproject a tested one: it pins each declared `>=X` at X
    (torch excepted: one CPU wheel here), so a bound moved in one place and not the other fails here."""
    from packaging.version import Version

    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    oldest = re.search(r"^OLDEST\s*=(.*)$", text, re.MULTILINE)
    target = re.search(r"^test-oldest:.*\n\t.*TRITON=triton==([\w.]+)", text, re.MULTILINE)
    assert oldest and target, "the Makefile has no OLDEST pins or no test-oldest target pinning Triton"
    pins = {_canon(m[1]): m[2] for m in re.finditer(r"([\w.-]+)==([\w.]+)", oldest[1])}
    pins["triton"] = target[1]
    project = _requirements()
    for r in project:
        low = [s.version for s in r.specifier if s.operator == ">="]
        if not low or _canon(r.name) in ("torch", "pytest"):
            continue
        assert _canon(r.name) in pins, f"{r.name}: pyproject declares {r.specifier}, the Makefile's OLDEST pins none"
        assert Version(pins[_canon(r.name)]) == Version(low[0]), (
            f"{r.name}: pyproject's lower bound {low[0]}, OLDEST pins {pins[_canon(r.name)]}")


def test_the_makefile_refuses_the_pythons_pyproject_does():
    """The quick start's check of `PY` (a one-line error naming the fix, before a venv is made) and pyproject's
    requires-python name one minimum, the one the suite runs under or above."""
    import sys
    import tomllib

    low = re.fullmatch(r">=\s*3\.(\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    check = re.search(r"sys\.version_info < \(3, (\d+)\)", (ROOT / "Makefile").read_text())
    assert low and check and low[1] == check[1], "pyproject's requires-python and the Makefile's check of PY differ"
    assert sys.version_info >= (3, int(low[1]))
