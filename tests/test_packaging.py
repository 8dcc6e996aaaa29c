"""The package as users get it: the locks pin the whole tree with hashes, and a wheel installed into a fresh venv
outside the checkout serves a whole login from another folder (templates and static files inside the package)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import log_in
from tests.support.ports import free_port
from tests.support.processes import wait_until_answers
from tests.support.settings import TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
LOCK_LINE = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, str]:
    """name -> version of every package a requirements file pins; each must carry at least one hash."""
    pins: dict[str, str] = {}
    entries = re.split(r"\n(?=[A-Za-z0-9])", path.read_text())
    for entry in entries:
        match = LOCK_LINE.match(entry)
        if not match:
            continue
        assert "--hash=sha256:" in entry, f"{path.name}: {match.group(1)} has no hash"
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def pinned(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for text in requirements:
        requirement = Requirement(text)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{text} is not pinned"
        pins[canonical(requirement.name)] = specifier.version
    return pins


def test_the_locks_pin_what_pyproject_pins_with_hashes() -> None:
    everything, deployment = locked(ROOT / "requirements.lock"), locked(ROOT / "requirements.txt")
    extras = PYPROJECT["project"]["optional-dependencies"]
    core = pinned(PYPROJECT["project"]["dependencies"])
    for name, version in {**core, **pinned(extras["postgres"]), **pinned(extras["redis"])}.items():
        assert deployment.get(name) == version, (name, version, deployment.get(name))
    for name, version in {**core, **pinned([pin for pins in extras.values() for pin in pins])}.items():
        assert everything.get(name) == version, (name, version, everything.get(name))
    # One resolution: what a deployment installs is exactly what the tests ran against.
    assert {name: everything.get(name) for name in deployment} == deployment
    # A deployment gets neither the tests' tools nor the demo's MCP SDK.
    for name in ("pytest", "playwright", "hypothesis", "ruff", "mcp", "uv"):
        assert name not in deployment and name in everything, name
    # The private urllib3 and http.client behaviour the proxy relies on cannot drift under a deploy.
    assert deployment["urllib3"] == core["urllib3"]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_every_package_the_proxy_imports_is_declared() -> None:
    sources = [*sorted((ROOT / "oauthproxy").rglob("*.py")), ROOT / "wsgi.py", ROOT / "gunicorn.conf.py"]
    modules = set().union(*map(_imports, sources)) - set(sys.stdlib_module_names) - {"oauthproxy", "__future__"}
    distributions = importlib.metadata.packages_distributions()
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = {*pinned(PYPROJECT["project"]["dependencies"]), *pinned(extras["postgres"]), *pinned(extras["redis"])}
    undeclared = {
        module: distributions.get(module)
        for module in modules
        if not {canonical(name) for name in distributions.get(module, [module])} & declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


# -- a wheel installed elsewhere ---------------------------------------------------------------------------------


def uv(*args: str | Path, cwd: Path = ROOT, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(BIN / "uv"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "UV_NATIVE_TLS": "1"},
    )
    assert done.returncode == 0, f"uv {' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@dataclass
class InstalledWheel:
    wheel: Path
    venv: Path
    #: Where it runs: only wsgi.py and gunicorn.conf.py, as in the container image.
    site: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    """The wheel built from the checkout (pinned setuptools, isolated), installed with the deployment lock into a
    fresh venv in a temporary folder: nothing of the checkout is importable from there."""
    folder = tmp_path_factory.mktemp("wheel")
    uv("build", "--wheel", "--out-dir", folder / "dist", ROOT)
    (wheel,) = (folder / "dist").glob("oauthproxy-*.whl")
    venv = folder / "venv"
    uv("venv", "--python", sys.executable, venv)
    uv("pip", "install", "--python", venv / "bin" / "python", "--require-hashes", "-r", ROOT / "requirements.txt")
    uv("pip", "install", "--python", venv / "bin" / "python", "--no-deps", wheel)
    site = folder / "site"
    site.mkdir()
    for name in ("wsgi.py", "gunicorn.conf.py"):
        shutil.copy(ROOT / name, site / name)
    return InstalledWheel(wheel, venv, site)


def test_the_wheel_carries_templates_static_files_and_migrations(installed_wheel: InstalledWheel) -> None:
    names = set(zipfile.ZipFile(installed_wheel.wheel).namelist())
    for template in (ROOT / "templates").iterdir():
        assert f"oauthproxy/templates/{template.name}" in names, template.name
    assert "oauthproxy/static/oauthproxy.css" in names
    assert any(name.startswith("oauthproxy/migrations/versions/") for name in names)
    assert "oauthproxy/migrations/env.py" in names and "oauthproxy/migrations/alembic.ini" in names


def test_the_installed_command_says_its_version_and_lists_its_own_commands(installed_wheel: InstalledWheel) -> None:
    env = {"PATH": f"{installed_wheel.bin}:/usr/bin:/bin", "OAUTHPROXY_ENV_FILE": os.devnull}
    version = subprocess.run(
        [installed_wheel.bin / "oauthproxy", "--version"],
        cwd=installed_wheel.site,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert version.returncode == 0 and version.stdout.strip() == f"oauthproxy {VERSION}", version
    shown = subprocess.run(
        [installed_wheel.bin / "oauthproxy", "--help"],
        cwd=installed_wheel.site,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert shown.returncode == 0 and not shown.stderr, shown.stderr  # no settings needed to list the commands
    commands = set(re.findall(r"^  ([a-z-]+)  ", shown.stdout.split("Commands:")[1], re.MULTILINE))
    assert commands == {
        "audit",
        "check",
        "clients",
        "db",
        "gen-key",
        "grants",
        "identity-keys",
        "purge",
        "rotate-key",
    }, shown.stdout
    assert "--app" not in shown.stdout and "--debug" not in shown.stdout  # Flask's development options


@pytest.fixture
def wheel_proxy(installed_wheel: InstalledWheel, oidc_provider: OidcProvider) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "PATH": f"{installed_wheel.bin}:/usr/bin:/bin",
        "HOME": str(installed_wheel.site),
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "OAUTHPROXY_ENV_FILE": os.devnull,
        "OAUTH_CLIENT_ID": f"wheel-{port}",
        "OAUTH_CLIENT_SECRET": "wheel-secret",
        "OAUTH_AUTHORIZE_URL": oidc_provider.issuer,
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "SCOPES_SUPPORTED": "openid,email,profile",
        "ENCRYPTION_KEY": TEST_KEY,
    }
    oidc_provider.register_client(env["OAUTH_CLIENT_ID"], env["OAUTH_CLIENT_SECRET"], [f"{url}/callback"])
    log_path = installed_wheel.site / f"gunicorn-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(installed_wheel.bin / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=installed_wheel.site,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_answers(url + "/readyz", process, 40, logs=log_path.read_text)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def test_a_wheel_installed_outside_the_checkout_serves_a_whole_login(
    installed_wheel: InstalledWheel, wheel_proxy: str
) -> None:
    where = subprocess.run(
        [installed_wheel.bin / "python", "-c", "import oauthproxy; print(oauthproxy.__file__)"],
        cwd=installed_wheel.site,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert Path(where.stdout.strip()).is_relative_to(installed_wheel.venv), where  # not the checkout's package
    login = log_in(wheel_proxy, wheel_proxy + "/mcp")  # the consent page is a template of the package
    assert login.access_token and login.refresh_token
    stylesheet = requests.get(wheel_proxy + "/static/oauthproxy.css", timeout=10)
    assert stylesheet.status_code == 200 and stylesheet.text == (ROOT / "oauthproxy/static/oauthproxy.css").read_text()
    # The default SQLite database: instance/ in the folder it runs from (the image's /app), not <venv>/var/.
    assert (installed_wheel.site / "instance" / "oauthproxy.sqlite3").is_file()


def test_make_run_for_real_installs_only_the_deployment_and_needs_no_node(
    installed_wheel: InstalledWheel, oidc_provider: OidcProvider, tmp_path: Path
) -> None:
    """`make run` with a provider configured: the runtime lock only (its venv stamped as installed here, as make
    leaves it), no test extras, and no Node or npm on PATH."""
    venv = installed_wheel.venv
    (venv / ".installed-runtime").touch()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "PATH": str(tmp_path),
        "HOME": str(tmp_path),
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "OAUTHPROXY_ENV_FILE": os.devnull,
        "OAUTH_CLIENT_ID": f"make-run-{port}",
        "OAUTH_CLIENT_SECRET": "s",
        "OAUTH_AUTHORIZE_URL": oidc_provider.issuer,
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "ENCRYPTION_KEY": TEST_KEY,
        "DATABASE_DSN": str(tmp_path / "run.db"),
    }
    make = shutil.which("make")
    assert make, "GNU make is needed"
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [make, "--no-print-directory", f"VENV={venv}", "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 40
        answered = False
        while time.monotonic() < deadline and process.poll() is None and not answered:
            try:
                answered = requests.get(url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                time.sleep(0.1)
        assert answered, log_path.read_text()
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=20)
    assert not (venv / ".installed").exists()
    site_packages = next((venv / "lib").glob("python3.*/site-packages"))
    for test_only in ("playwright", "pytest", "mcp", "hypothesis"):
        assert not (site_packages / test_only).exists(), f"make run installed {test_only}"
