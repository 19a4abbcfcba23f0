"""fitprobe: one installed name for the library (`fitprobe.probe`) and the service (`fitprobe.app`).

Installed, a user's own `app` or `probe` module can never collide with ours: site-packages holds
`fitprobe/` (and the client, `fitprobe_client`) and nothing else at the top level. The repository
keeps `probe/` and `app/` at its root, so this package reaches them three ways:

- a wheel: pyproject.toml's package-dir maps `fitprobe.probe` to probe/ and `fitprobe.app` to app/,
  so the files are copied to fitprobe/probe/ and fitprobe/app/;
- the source tree on PYTHONPATH (how engineers and the tests' subprocesses run): fitprobe/probe and
  fitprobe/app are relative links to ../probe and ../app, so plain directory lookup finds them;
- `pip install -e .`: setuptools sees the package-dir mapping and installs an import hook that maps
  `fitprobe.probe` and `fitprobe.app` onto the same directories (and puts nothing else on sys.path).

Links rather than extending `__path__` to the repository root at import time: mypy, ruff and IDEs
resolve `fitprobe.probe.spec` from the file tree without running this file, so the type check keeps
seeing the library (an unresolved import would silently become `Any` under ignore_missing_imports),
and `__path__` never exposes the root's other directories (tests, bench) as `fitprobe.tests`.
"""
