"""requirements.lock is the tested set: it pins every requirement of pyproject.toml (every extra's too) at a
version the requirement allows, leaves torch and a CUDA build's wheels to TORCH_SPEC, and is what this
environment was installed from (``make install`` installs with it as pip constraints; ``make lock`` writes it)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from scripts.lock import UNLOCKED, canonical, extras, header, pins

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
RELOCK = "the lock is stale: run `make lock` (it re-resolves pyproject.toml, writes requirements.lock, runs the suite)"


def locked() -> dict[str, str]:
    versions = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            versions[name] = version
    return versions


def declared() -> list[tuple[str, Requirement]]:
    """(group, requirement) for every dependency pyproject.toml declares: the main ones, then each extra's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project.get("optional-dependencies", {})}
    return [(group, Requirement(line)) for group, lines in groups.items() for line in lines]


def test_every_line_is_an_exact_pin_of_a_normalised_name():
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and name == canonical(name) and Version(version), line
    assert sorted(locked()) == list(locked()), "sorted by name"


def test_every_requirement_of_every_extra_is_pinned_within_its_specifier():
    pinned = locked()
    for group, requirement in declared():
        name = canonical(requirement.name)
        if UNLOCKED.match(name):
            continue
        assert name in pinned, f"{requirement} ({group}) is not in requirements.lock: {RELOCK}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"requirements.lock pins {name}=={pinned[name]}, outside {requirement} ({group}): {RELOCK}")
    groups = [g for g in dict.fromkeys(g for g, _ in declared()) if g != "dependencies"]
    assert extras(ROOT / "pyproject.toml") == groups  # what make lock installs


def test_torch_and_a_cuda_builds_wheels_are_left_to_torch_spec():
    """A CPU torch here, a CUDA one on a GPU machine: the lock must force neither (nor nvidia-* / triton)."""
    names = set(locked())
    assert not {n for n in names if UNLOCKED.match(n)}
    assert "torch" in {canonical(r.name) for _, r in declared()}  # still a dependency: TORCH_SPEC installs it
    assert "pip" in names  # pip itself is pinned


def _installed_closure(root: str, wanted: set[str]) -> dict[str, str]:
    """Every installed distribution ``root[wanted]`` needs, transitively (markers evaluated), with its version."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [(root, frozenset(wanted))]
    while stack:
        name, with_extras = stack.pop()
        if (canonical(name), with_extras) in seen:
            continue
        seen.add((canonical(name), with_extras))
        dist = metadata.distribution(name)
        found[canonical(name)] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in with_extras | {""}):
                stack.append((requirement.name, frozenset(requirement.extras)))
    return found


def test_this_environment_was_installed_from_the_lock():
    """What ``make install`` put here for proxy-serve[test] is exactly the locked set (else: the lock is stale, or
    this environment was installed without it: ``make install`` does it)."""
    pinned = locked()
    installed = _installed_closure("proxy-serve", {"test"})
    assert "transformers" in installed and "pytest" in installed
    for name, version in sorted(installed.items()):
        if UNLOCKED.match(name):
            continue
        assert name in pinned, f"{name} {version} is installed but not locked: {RELOCK}"
        assert Version(version) == Version(pinned[name]), (
            f"{name} {version} is installed, requirements.lock says {pinned[name]}: run `make install`")


def test_the_lock_script_keeps_exact_pins_and_names_what_it_leaves_out():
    freeze = "\n".join([
        "# Editable install with no version control (proxy-serve==0.1.0)", "-e /src/proxy-serve",
        "Jinja2==3.1.6", "typing_extensions==4.16.0", "torch==2.13.0+cpu", "nvidia-cublas-cu12==12.8.4.1",
        "triton==3.5.0", "setuptools==80.9.0", "pip==26.3", "zope.interface==7.0",
    ])
    lines, left_out = pins(freeze)
    assert lines == ["jinja2==3.1.6", "pip==26.3", "typing-extensions==4.16.0", "zope-interface==7.0"]
    assert left_out == {"torch": "2.13.0+cpu", "nvidia-cublas-cu12": "12.8.4.1", "triton": "3.5.0",
                        "setuptools": "80.9.0"}
    text = header(["test", "scale"], left_out, "torch==2.13.0")
    assert "extras: test, scale" in text and "tested with 2.13.0+cpu" in text
    assert all(line.startswith("#") for line in text.splitlines() if line)
