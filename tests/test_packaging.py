"""The wheel as a user installs it: one top-level name, `fitprobe`, so a user's own `app` or `probe` stays theirs.

The checkout keeps probe/ and app/ at its root; pyproject's package-dir installs them as fitprobe/probe/ and
fitprobe/app/. What the wheel must hold is read from the source tree here (every .py file, the dashboard's
static files, the migrations), not from the build's own configuration.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a wheel build, a venv and an import of every module: about half a minute

# not build inputs: caches, an earlier in-tree build (a stale build/lib would end up in the wheel), data
NOT_SOURCES = shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info", "data", "fitprobe-data")
# importing these runs something: alembic's env.py configures a migration context, the revisions need one
RUN_NOT_IMPORTED = ("fitprobe.app.migrations.env", "fitprobe.app.migrations.versions.")


def _outside_the_repo() -> dict[str, str]:
    # PYTHONPATH would put the checkout's fitprobe (and probe/, app/) in front of what pip installed
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _expected_files() -> set[str]:
    """The source tree's files under the names the wheel must give them."""
    expected = {"fitprobe/__init__.py"}
    for directory, installed in (("probe", "fitprobe/probe"), ("app", "fitprobe/app"),
                                 ("client/fitprobe_client", "fitprobe_client")):
        for path in (ROOT / directory).rglob("*"):
            relative = path.relative_to(ROOT / directory)
            if path.is_file() and "__pycache__" not in relative.parts and (
                    path.suffix == ".py" or relative.parts[0] == "static" or path.name == "script.py.mako"
                    or path.name == "spec_options.json"):  # pre-flight's options, read by the client at start
                expected.add(f"{installed}/{relative.as_posix()}")
    return expected


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` offline, from a copy of the checkout: the build writes nothing into the working tree."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCES)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(work / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300, env=_outside_the_repo())
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = (work / "dist").glob("fitprobe-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv that sees the running interpreter's torch, fastapi... (no internet) and the wheel, nothing of
    the checkout.

    Not `venv --system-site-packages`: made from inside a virtualenv, that sees the *base* interpreter's packages,
    not the virtualenv's the suite runs in. A .pth line in the fresh venv adds the running interpreter's site
    directories instead (after the venv's own, .pth files processed, as --system-site-packages would).
    """
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True, env=_outside_the_repo()).stdout.strip()
    Path(purelib, "running-interpreter.pth").write_text(
        "".join(f"import site; site.addsitedir({directory!r})\n" for directory in site.getsitepackages()))
    # --ignore-installed: this machine may have fitprobe installed (editable, elsewhere); the venv gets its own
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                              "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                             capture_output=True, text=True, timeout=300, env=_outside_the_repo())
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


@pytest.fixture
def users_project(tmp_path: Path) -> Path:
    """A user's directory with modules of their own named `app` and `probe`, first on sys.path as the cwd."""
    (tmp_path / "app.py").write_text("OWNER = 'user'\n")
    (tmp_path / "probe.py").write_text("OWNER = 'user'\n")
    return tmp_path


def test_the_wheel_holds_everything_under_fitprobe_and_no_top_level_app_or_probe(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = {name for name in archive.namelist() if ".dist-info/" not in name}
        entry_points = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("entry_points.txt"))
    assert {name.split("/")[0] for name in names} == {"fitprobe", "fitprobe_client"}
    assert names == _expected_files()
    assert "fitprobe = fitprobe.app.cli:main" in entry_points


def test_the_installed_package_imports_beside_a_users_own_app_and_probe(venv: Path, users_project: Path):
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True, env=_outside_the_repo()).stdout.strip()
    modules = sorted(name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                     for name in _expected_files() if name.endswith(".py") and name.startswith("fitprobe/"))
    imported = [m for m in modules if not m.startswith(RUN_NOT_IMPORTED)]
    assert "fitprobe.probe.spec" in imported and "fitprobe.app.main" in imported
    script = (
        "import importlib, sys\n"
        f"for name in {imported!r}:\n"
        "    importlib.import_module(name)\n"
        "import app, probe\n"
        "print(app.OWNER, probe.OWNER)\n"
        "print(sys.modules['fitprobe.probe.spec'].__file__)\n"
        "print(sys.modules['fitprobe.app.main'].__file__)\n"
        # a module of ours that imported `probe.x` or `app.x` would show up here (or fail above)
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('probe', 'app') and m not in ('probe', 'app')))\n"
    )
    run = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=users_project, env={**_outside_the_repo(), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    owners, spec_file, main_file, strays = run.stdout.splitlines()[-4:]
    assert owners == "user user"
    assert spec_file == f"{site}/fitprobe/probe/spec.py"
    assert main_file == f"{site}/fitprobe/app/main.py"
    assert strays == "[]"


def test_the_console_script_runs_and_migrates_from_the_installed_tree(venv: Path, users_project: Path):
    """`fitprobe` is the wheel's entry point; the schema's revisions ship in it (the service migrates at start-up)."""
    helped = subprocess.run([str(venv / "bin" / "fitprobe"), "--help"], capture_output=True, text=True, timeout=300,
                            cwd=users_project, env=_outside_the_repo())
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stdout + helped.stderr

    database = users_project / "jobs.db"
    migrate = ("import sqlalchemy as sa\n"
               "from fitprobe.app import migrate\n"
               f"engine = sa.create_engine('sqlite:///{database}')\n"
               "migrate.upgrade(engine)\n"
               "with engine.connect() as c:\n"
               "    print(c.execute(sa.text('SELECT version_num FROM alembic_version')).scalar_one())\n")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", migrate], capture_output=True, text=True, timeout=300,
                         cwd=users_project, env=_outside_the_repo())
    assert run.returncode == 0, run.stdout + run.stderr
    newest = max(path.name.split("_")[0] for path in (ROOT / "app" / "migrations" / "versions").glob("[0-9]*.py"))
    assert run.stdout.strip() == newest
