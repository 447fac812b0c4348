"""Packaging: the licence, the GPL JPEG decoder as an option, JPEG instances
stored and hashed by a gateway installed without it, and the systemd unit's readiness check."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
import venv
from importlib import metadata
from pathlib import Path

import pydicom
import pytest
from packaging.requirements import Requirement

from dicomledger.dicom.pixelhash import hash_instance_file
from tests.conftest import DCMTK_ENV, ROOT, GatewayProcess, dcmtk
from tests.test_forwarding import entries_of_kind

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

WHEEL = Path(pydicom.__file__).parent / "data" / "test_files"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_distributions() -> dict[str, metadata.Distribution]:
    """Every distribution a default install pulls in (pyproject's dependencies, recursively,
    as installed here; extras left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in found or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        found[name] = metadata.distribution(req.name)
        todo += [Requirement(r) for r in found[name].requires or []]
    return found


CLASSIFIER_SPDX = {
    "MIT License": "MIT",
    "Apache Software License": "Apache-2.0",
    "Python Software Foundation License": "PSF-2.0",
    "BSD License": "BSD",
}


def licence_of(dist: metadata.Distribution) -> str:
    """The SPDX expression of its metadata, else its licence classifiers (as SPDX ids where
    the classifier says which), else its License field."""
    expression = dist.metadata.get("License-Expression")
    if expression:
        return expression
    classifiers = [
        c.split(" :: ")[-1]
        for c in dist.metadata.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    return " OR ".join(CLASSIFIER_SPDX.get(c, c) for c in classifiers) or (
        dist.metadata.get("License") or ""
    )


def test_licence_is_apache_2_and_declared():
    text = (ROOT / "LICENSE").read_text()
    assert (
        "Apache License" in text
        and "Version 2.0, January 2004" in text
        and "END OF TERMS AND CONDITIONS" in text
    )
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"][
        "license-files"
    ] == ["LICENSE"]


def test_a_default_install_pulls_in_no_gpl_package():
    """pylibjpeg-libjpeg (GPLv3) is the jpeg-gpl extra, not a dependency, and nothing else a
    default install brings is under the GPL."""
    assert PYPROJECT["project"]["optional-dependencies"]["jpeg-gpl"] == ["pylibjpeg-libjpeg>=2.1"]
    dists = runtime_distributions()
    assert "pylibjpeg-libjpeg" not in dists
    gpl = {
        name: licence_of(d)
        for name, d in dists.items()
        if re.search(r"(?<![AL])GPL|General Public", licence_of(d))
        and "Lesser" not in licence_of(d)
    }
    assert not gpl, gpl


def test_the_readme_names_the_licence_of_every_runtime_dependency():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Licences", 1)[1].split("**JPEG codecs.**", 1)[0]  # the licence table
    rows = {line for line in section.splitlines() if line.startswith("| ")}
    for name, dist in runtime_distributions().items():
        row = next((r for r in rows if re.search(rf"[| ,]{re.escape(name)}[ ,|]", r)), None)
        assert row is not None, f"README's Licences table does not list {name}"
        words = re.split(r" OR | AND ", licence_of(dist))
        assert any(w.replace(" ", "-") in row for w in words if w), (name, licence_of(dist), row)


# -- a gateway installed without the GPL decoder --------------------------------------------------


def environment_without(distribution: str, where: Path) -> Path:
    """A Python environment like this one without ``distribution`` (its modules and its
    metadata, as if never installed): a venv whose site directory links every entry of this
    one's except that distribution's files. Returns its python."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    try:
        excluded = {Path(str(f)).parts[0] for f in metadata.distribution(distribution).files or []}
    except metadata.PackageNotFoundError:
        excluded = set()
    farm = where / "site-packages"
    farm.mkdir(parents=True)
    for entry in site_packages.iterdir():
        # (an editable install of dicomledger may point at another checkout: the tests run
        # it from this one, the working directory)
        if (
            entry.name in excluded
            or entry.name.startswith("__editable__")
            or entry.name == "__pycache__"
        ):
            continue
        (farm / entry.name).symlink_to(entry)
    venv.create(where / "venv", with_pip=False)
    purelib = subprocess.run(
        [
            where / "venv" / "bin" / "python",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "farm.pth").write_text(f"import site; site.addsitedir({str(farm)!r})\n")
    return where / "venv" / "bin" / "python"


JPEG_FILES = {  # storescu option: pydicom wheel files of that process
    "-xy": ["SC_rgb_jpeg_dcmtk.dcm", "SC_jpeg_no_color_transform.dcm"],  # Baseline (Process 1)
    "-xx": ["JPEG-lossy.dcm"],  # Extended (Process 2 & 4), 12 bits
    "-xs": ["SC_rgb_jpeg_gdcm.dcm"],  # Lossless, Selection Value 1
    "-xt": ["MR_small_jpeg_ls_lossless.dcm"],  # JPEG-LS lossless (pyjpegls, MIT)
}


def test_jpeg_instances_are_stored_and_hashed_without_the_gpl_decoder(tmp_path):
    python = environment_without("pylibjpeg-libjpeg", tmp_path / "env")
    probe = subprocess.run(
        [
            python,
            "-c",
            (
                "import importlib.util, importlib.metadata as md\n"
                "assert importlib.util.find_spec('libjpeg') is None\n"
                "try:\n    md.distribution('pylibjpeg-libjpeg')\nexcept md.PackageNotFoundError:\n    print('absent')\n"
                "import dicomledger, os; print(os.path.dirname(dicomledger.__file__))"
            ),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert probe.stdout.split() == ["absent", str(ROOT / "dicomledger")], (
        probe.stdout + probe.stderr
    )

    gw = GatewayProcess(tmp_path / "gw")
    gw.python = str(python)
    gw.start()
    try:
        for option, names in JPEG_FILES.items():
            sent = gw.storescu(*(WHEEL / n for n in names), options=(option,))
            assert sent.returncode == 0 and (sent.stdout + sent.stderr).count(
                "Received Store Response (Success)"
            ) == len(names), sent.stderr
        anchors = {p["instance"]: p for p in entries_of_kind(gw, "image-anchored")}
        assert len(anchors) == sum(map(len, JPEG_FILES.values()))
        log = gw.log()
    finally:
        gw.stop()
    assert (
        "no decoder installed for these lossless transfer syntaxes" in log
        and "JPEG Lossless" in log
    )
    from dicomledger.ledger.pseudonym import pseudonym

    secret = (gw.dir / "keys" / "consortium.secret").read_bytes().strip()
    for option, names in JPEG_FILES.items():
        for name in names:
            here = hash_instance_file(WHEEL / name)  # the raw pixel hash needs no decoder
            uid = str(pydicom.dcmread(WHEEL / name, stop_before_pixels=True).SOPInstanceUID)
            anchored = anchors[pseudonym(secret, "instance", uid)]
            assert anchored["sha256"] == here.sha256.hex(), name
            if option == "-xt":  # lossless, decoded by pyjpegls: the same canonical hash
                assert anchored["decoded_sha256"] == here.decoded_sha256.hex(), name
            else:  # lossy (never decoded), or JPEG Lossless without a decoder
                assert anchored["decoded_sha256"] is None, name
            verdict = subprocess.run(
                [
                    python,
                    "-m",
                    "dicomledger.cli",
                    "verify-file",
                    "--config",
                    str(gw.config),
                    str(WHEEL / name),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            assert verdict.returncode == 0 and verdict.stdout.startswith("ANCHORED"), (
                name,
                verdict.stdout,
                verdict.stderr,
            )


# -- the systemd unit --------------------------------------------------------------------------


UNIT = ROOT / "deploy" / "dicomledger.service"


def test_the_systemd_unit_is_a_notify_service_for_an_unprivileged_user(tmp_path):
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Za-z]+=", line)
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["User"] not in ("root", "0") and settings["UMask"] == "0077"
    assert " serve --config " in settings["ExecStart"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed: the unit's syntax is not checked here")
    runnable = (
        tmp_path / "dicomledger.service"
    )  # (verify wants an executable ExecStart: this Python)
    runnable.write_text(
        text.replace(settings["ExecStart"].split()[0], f"{sys.executable} -m dicomledger.cli")
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(runnable)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "Ignoring" not in result.stderr, result.stderr


def test_the_gateway_tells_the_service_manager_when_it_is_ready(tmp_path, monkeypatch):
    """As systemd does for Type=notify: a datagram socket in NOTIFY_SOCKET. READY=1 comes only
    once the DICOM port answers; STOPPING=1 when it is told to stop."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = tmp_path / "notify.sock"
    manager.bind(str(address))
    manager.settimeout(30)
    gw = GatewayProcess(tmp_path / "gw")
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))  # inherited by the gateway process
    gw.start()
    monkeypatch.delenv("NOTIFY_SOCKET")
    try:
        assert manager.recv(100) == b"READY=1"
        echo = dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", gw.ae_title, "127.0.0.1", str(gw.port))
        assert echo.returncode == 0, echo.stderr
    finally:
        gw.stop()
    assert manager.recv(100) == b"STOPPING=1"
    manager.close()
    # and a gateway that cannot start (its port taken) never says READY
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    second = GatewayProcess(tmp_path / "gw2")
    second.set(f"port = {second.port}", f"port = {blocker.getsockname()[1]}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify2.sock"))
    listener.settimeout(0.5)
    result = subprocess.run(
        [sys.executable, "-m", "dicomledger.cli", "serve", "--config", str(second.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**DCMTK_ENV, "NOTIFY_SOCKET": str(tmp_path / "notify2.sock")},
    )
    blocker.close()
    assert result.returncode == 1 and "gateway cannot start" in result.stderr, result.stderr
    messages = []
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            messages.append(listener.recv(100))
        except TimeoutError:
            break
    listener.close()
    assert b"READY=1" not in messages
