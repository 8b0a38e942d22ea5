"""The wheel ships the product and its migrations, and no test double.

Builds the wheel offline from a copy of the sources (no index, no build isolation: setuptools
comes from the test extra), so stale `build/` output in the checkout cannot leak into it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "backfill", "migrations"]


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("backfill-*.whl")
    return wheel


def test_the_wheel_holds_the_package_and_its_migrations_and_no_test_double(tmp_path: Path) -> None:
    major = int(version("setuptools").split(".")[0])
    assert major >= 77, "setuptools>=77 is needed to build offline: pip install -e '.[test]'"
    names = zipfile.ZipFile(_build_wheel(tmp_path)).namelist()

    assert not [n for n in names if n.startswith(("support/", "tests/", "backfill/testing/"))], names
    assert not [n for n in names if "fake_openai" in n or "libsql_server" in n], names
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"backfill"}, top

    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("backfill/_migrations/versions/"))
    expected = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))
    assert expected and shipped == expected
    assert {"backfill/cli.py", "backfill/_migrations/env.py", "backfill/_migrations/script.py.mako"} <= set(names)


def test_the_backfill_command_of_the_wheel_and_of_this_install_starts(tmp_path: Path) -> None:
    """The console script the wheel declares resolves to a function, and the installed command runs."""
    wheel = zipfile.ZipFile(_build_wheel(tmp_path))
    (entry_file,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entries = wheel.read(entry_file).decode()
    target = next(line.split("=", 1)[1].strip() for line in entries.splitlines() if line.startswith("backfill ="))
    module, func = target.split(":")
    loaded = subprocess.run([sys.executable, "-c", f"import {module}; assert callable({module}.{func})"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    command = Path(sys.executable).parent / "backfill"
    assert command.exists(), "the backfill command is not installed: pip install -e '.[test]'"
    ran = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == f"backfill {version('backfill')}", ran.stdout + ran.stderr
