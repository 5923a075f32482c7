from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from runtime.demo import assets
from runtime.demo.model import write_model
from tests.support import container, free_port, otlp_receiver
from tests.support.container import Container
from tests.support.harness import Harness

# The first text strategy drawn in a fresh checkout builds hypothesis's Unicode table (about a
# second, inside that test's first draw), which fails the too_slow health check in whichever
# property test comes first. Every profile here leaves that check out.
settings.register_profile("harness", suppress_health_check=[HealthCheck.too_slow])
# `make test` (what CI runs) draws the same examples on every run, so a pass here is a pass
# there; `make test-fast` and plain pytest draw new ones each time and keep finding cases.
settings.register_profile(
    "repeatable", settings.get_profile("harness"), derandomize=True, print_blob=True
)
settings.load_profile(os.environ.get("HARNESS_HYPOTHESIS_PROFILE") or "harness")


TIERS = ("unit", "integration", "gpu", "e2e")  # the order a whole run takes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A whole run goes tier by tier, fastest first, so the real engine starts only once the
    other tiers are done and does not share the CPUs with their timing. Within e2e, the tests
    that end the session's shared server (those given `own_target`, and those marked
    `ends_server`) run after every test that shares it, whatever the file order: each restart
    of the real engine costs ~50 s."""
    here = Path(__file__).parent

    def order(item: pytest.Item) -> tuple[int, bool]:
        parts = item.path.relative_to(here).parts if item.path.is_relative_to(here) else ()
        rank = TIERS.index(parts[0]) if parts and parts[0] in TIERS else len(TIERS)
        ends = "own_target" in getattr(item, "fixturenames", ())
        return rank, ends or item.get_closest_marker("ends_server") is not None

    items.sort(key=order)


def _open_dir() -> Path:
    """A temporary folder the engine's non-root uid can traverse (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="harness-test-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture()
def open_tmp() -> Iterator[Path]:
    path = _open_dir()
    yield path
    if (path / assets.CONFIG_NAME).is_file():
        shutil.rmtree(assets.secrets_dir(path), ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_dir() -> Iterator[Path]:
    """Demo assets built once per session, exactly as `harness demo init` builds them."""
    root = _open_dir()
    assets.ensure(root)
    yield root
    shutil.rmtree(assets.secrets_dir(root), ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, written once per test module: tests copy it before they change it."""
    return write_model(tmp_path_factory.mktemp("clean") / "model")


@pytest.fixture()
def shm_dir() -> Iterator[Path]:
    """A private (0700) folder on tmpfs, where secrets may live; removed after the test."""
    path = Path("/dev/shm") / f"harness-test-{os.getpid()}-{os.urandom(4).hex()}"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _forget_demo_secrets(tmp_path: Path) -> Iterator[None]:
    """Demo dirs made inside a test keep their server key in /dev/shm: remove it after."""
    yield
    for path in [tmp_path, *(p for p in tmp_path.iterdir() if p.is_dir())]:
        if (path / assets.CONFIG_NAME).is_file():
            shutil.rmtree(assets.secrets_dir(path), ignore_errors=True)


class Servers:
    """The real engine takes ~50 s to start, so one `harness serve` is shared by the session.
    Tests that end a server (`take`) get the shared one and the next `shared()` starts anew."""

    def __init__(self, demo_dir: Path, workdir: Path, otlp_url: str = "") -> None:
        self.demo_dir = demo_dir
        self.workdir = workdir
        self.otlp_url = otlp_url  # every server exports to the session's OTLP receiver
        self._shared: Harness | None = None
        self._all: list[Harness] = []

    def start(self, overrides: list[str] | None = None) -> Harness:
        export = [
            f'telemetry.otlp_endpoint="{self.otlp_url}"',
            "telemetry.export_interval_s=1",
        ]
        harness = Harness(
            self.demo_dir / assets.CONFIG_NAME,
            self.workdir,
            [*(export if self.otlp_url else []), *(overrides or [])],
        )
        self._all.append(harness)
        return harness

    def shared(self) -> Harness:
        if self._shared is None or not self._shared.alive():
            # As a deployment should run: the engine's compute threads on CPUs of their own
            # (engine.cpus), the front on the last one, where there are two or more; the
            # engine's namespaces required, not merely used where they can be.
            # Its metrics endpoint too, so that the launcher's wiring of the gauges is seen.
            metrics_port = free_port()
            self._shared = self.start(
                [
                    'engine.cpus="auto"',
                    f'front.metrics_listen="127.0.0.1:{metrics_port}"',
                    'sandbox.namespaces="required"',
                ]
            )
            self._shared.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            self._shared.wait_ready()
        return self._shared

    def take(self) -> Harness:
        harness = self.shared()
        self._shared = None
        return harness

    def close(self) -> None:
        for harness in self._all:
            harness.kill()


@pytest.fixture(scope="session")
def otlp() -> Iterator[otlp_receiver.Receiver]:
    """An OTLP/HTTP receiver for the session's servers (tests/support/otlp_receiver.py)."""
    server, receiver = otlp_receiver.serve()
    yield receiver
    server.shutdown()


@pytest.fixture(scope="session")
def servers(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory, otlp: otlp_receiver.Receiver
) -> Iterator[Servers]:
    manager = Servers(demo_dir, tmp_path_factory.mktemp("servers"), otlp.url)
    yield manager
    manager.close()


@pytest.fixture()
def harness(servers: Servers) -> Harness:
    return servers.shared()


class Containers:
    """As Servers, for harness inside its image under podman + runc (tests/support/container.py)."""

    def __init__(self, demo_dir: Path, workdir: Path) -> None:
        self.demo_dir = demo_dir
        self.workdir = workdir
        self._shared: Container | None = None
        self._all: list[Container] = []

    def start(self, overrides: list[str]) -> Container:
        """A container of its own, with these `--set` overrides."""
        container = Container(self.demo_dir, self.workdir, overrides)
        self._all.append(container)
        return container

    def shared(self) -> Container:
        if self._shared is None or not self._shared.alive():
            self._shared = Container(self.demo_dir, self.workdir)
            self._all.append(self._shared)
            self._shared.wait_ready()
        return self._shared

    def take(self) -> Container:
        container = self.shared()
        self._shared = None
        return container

    def close(self) -> None:
        for one in self._all:
            one.kill()


@pytest.fixture(scope="session")
def containers(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containers]:
    """Skipped with the reason where podman or the image is missing, except under `make test`
    and `make image-test` (HARNESS_REQUIRE_IMAGE=1), where that is a failure."""
    reason = container.missing()
    if reason:
        if os.environ.get("HARNESS_REQUIRE_IMAGE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("containers")
    workdir.chmod(0o755)  # podman's bind mounts are read by the container's uid
    manager = Containers(demo_dir, workdir)
    yield manager
    manager.close()


@pytest.fixture(params=["host", pytest.param("image", marks=pytest.mark.image)])
def target(request: pytest.FixtureRequest) -> Harness | Container:
    """The shared `harness serve`: a process on this machine (as root), or the image under
    podman + runc as deploy/ runs it (uid 10001, no capabilities, the shipped profiles)."""
    if request.param == "host":
        return request.getfixturevalue("servers").shared()
    return request.getfixturevalue("containers").shared()


@pytest.fixture(params=["host", pytest.param("image", marks=pytest.mark.image)])
def own_target(request: pytest.FixtureRequest) -> Harness | Container:
    """As `target`, but the test ends it: the next test starts another."""
    if request.param == "host":
        return request.getfixturevalue("servers").take()
    return request.getfixturevalue("containers").take()
