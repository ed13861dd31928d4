"""The Gramine SGX deployment in deploy/gramine: rendered and checked, not run.

Gramine cannot be installed here, so these tests render the manifest template
as ``gramine-manifest`` does (Jinja2, with stand-ins for its ``gramine.*``
helpers), parse the result as TOML, and check the properties the security of
the deployment rests on.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

jinja2 = pytest.importorskip("jinja2")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "gramine"
TEMPLATE = DEPLOY / "plinius.manifest.template"

LIBOS = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"
RUNTIME = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"
URL = "https://keys.example.org:8470"
PUBKEY = "ab" * 32


class _Gramine:
    """Stands in for gramine-manifest's ``gramine`` template global."""

    libos = LIBOS

    @staticmethod
    def runtimedir() -> str:
        return RUNTIME


BASE: dict[str, str] = {
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "python_exe": "/usr/local/bin/python3.11",
    "python_stdlib": "/usr/local/lib/python3.11",
    "python_libdir": "/usr/local/lib",
    "site_packages": "/opt/plinius/.venv/lib/python3.11/site-packages",
    "plinius_src": "/opt/plinius/src",
    "pm_dir": "/dev/shm/plinius",
    "data_dir": "/var/lib/plinius",
    "tpm_device": "",
    "threads": "8",
    "enclave_size": "16G",
    "max_threads": "64",
    "key_server_url": URL,
    "key_server_pubkey": PUBKEY,
    "train_args": "--data /var/lib/plinius/train.sealed --mirror /dev/shm/plinius/job.plm "
    "--model mnist-cnn --steps 500",
    "log_level": "error",
}


def render(**overrides: str) -> dict[str, Any]:
    """Render the template the way ``make`` does and parse it as TOML."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.from_string(TEMPLATE.read_text(encoding="utf-8")).render(
        gramine=_Gramine(), **{**BASE, **overrides}
    )
    return tomllib.loads(text)


def _covered(path: str, entries: list[str], scheme: str = "file:") -> bool:
    """Whether ``path`` is one of ``entries`` or under one of its directories."""
    for e in entries:
        if not e.startswith(scheme):
            continue
        e = e[len(scheme) :]
        if path == e.rstrip("/") or (e.endswith("/") and path.startswith(e)):
            return True
    return False


def test_entrypoints_run_python_under_the_libos() -> None:
    m = render()
    assert m["loader"]["entrypoint"] == f"file:{LIBOS}"
    assert m["libos"]["entrypoint"] == BASE["python_exe"]


def test_remote_attestation_is_dcap_and_debug_is_off_by_default() -> None:
    m = render()
    assert m["sgx"]["remote_attestation"] == "dcap"
    assert m["sgx"]["debug"] is False
    assert m["loader"]["log_level"] == "error"
    assert render(debug="1")["sgx"]["debug"] is True


def test_enclave_size_and_threads_are_set() -> None:
    sgx = render()["sgx"]
    assert sgx["enclave_size"] == "16G"
    assert isinstance(sgx["max_threads"], int) and sgx["max_threads"] >= 16
    assert sgx["edmm_enable"] is False


def test_command_line_is_measured_not_taken_from_the_host() -> None:
    loader = render()["loader"]
    assert "insecure__use_cmdline_argv" not in loader
    assert "insecure__use_host_env" not in loader
    argv = loader["argv"]
    assert argv[1:4] == ["-m", "plinius", "train"]
    assert argv[argv.index("--key-server") + 1] == URL
    assert argv[argv.index("--key-server-pubkey") + 1] == PUBKEY
    assert argv[argv.index("--sealed-key") + 1].startswith(BASE["data_dir"] + "/")
    assert argv[-8:] == BASE["train_args"].split()


def test_host_command_line_only_when_asked_for_and_then_exclusive() -> None:
    loader = render(insecure_cmdline_argv="1")["loader"]
    assert loader["insecure__use_cmdline_argv"] is True
    assert "argv" not in loader  # Gramine refuses both at once
    text = TEMPLATE.read_text(encoding="utf-8")
    assert "DEVELOPMENT ONLY" in text  # and the template says why it is off


def test_key_server_settings_are_literal_environment_values() -> None:
    env = render()["loader"]["env"]
    assert env["PLINIUS_KEY_SERVER"] == URL
    assert env["PLINIUS_KEY_SERVER_PUBKEY"] == PUBKEY
    for name, value in env.items():
        # A passthrough would let the host point the enclave at its own server.
        assert isinstance(value, str), f"loader.env.{name} is not a literal value: {value!r}"


def test_hostile_values_cannot_inject_manifest_keys() -> None:
    url = 'https://x"\nloader.insecure__use_cmdline_argv = true\n#'
    m = render(key_server_url=url, train_args='--data "a --mirror b\\')
    assert m["loader"]["env"]["PLINIUS_KEY_SERVER"] == url
    assert "insecure__use_cmdline_argv" not in m["loader"]
    assert m["loader"]["argv"][-4:] == ["--data", '"a', "--mirror", "b\\"]


def test_pm_directory_is_untrusted_shared_memory_and_nothing_else() -> None:
    m = render()
    pm = BASE["pm_dir"]
    mounts = [x for x in m["fs"]["mounts"] if x["path"] == pm]
    assert len(mounts) == 1
    assert mounts[0]["type"] == "untrusted_shm"
    assert mounts[0]["uri"] == f"dev:{pm}"
    sgx = m["sgx"]
    # Never trusted (its hash would be fixed at signing) nor Gramine-encrypted
    # (plinius encrypts and authenticates the mirror itself).
    assert not _covered(pm + "/job.plm", sgx["trusted_files"])
    assert not any(x.get("type") == "encrypted" for x in m["fs"]["mounts"])
    assert _covered(pm + "/job.plm", sgx["allowed_files"], "dev:")


def test_code_is_trusted_and_data_is_only_allowed() -> None:
    m = render()
    trusted = m["sgx"]["trusted_files"]
    for path in (
        LIBOS,
        RUNTIME + "/libc.so.6",
        BASE["python_exe"],
        BASE["python_stdlib"] + "/os.py",
        BASE["python_libdir"] + "/libpython3.11.so.1.0",
        BASE["site_packages"] + "/torch/__init__.py",
        BASE["plinius_src"] + "/plinius/mirror.py",
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
    ):
        assert _covered(path, trusted), f"{path} is not a trusted file"
    data = BASE["data_dir"] + "/train.sealed"
    assert not _covered(data, trusted)
    assert _covered(data, m["sgx"]["allowed_files"])
    # Every allowed file holds only ciphertext: the data directory and PM.
    assert m["sgx"]["allowed_files"] == [f"file:{BASE['data_dir']}/", f"dev:{BASE['pm_dir']}/"]


def test_every_mount_with_code_is_covered_by_trusted_files() -> None:
    m = render()
    trusted = m["sgx"]["trusted_files"]
    data_or_scratch = {BASE["data_dir"], BASE["pm_dir"], "/tmp"}
    for mount in m["fs"]["mounts"]:
        if mount["path"] in data_or_scratch:
            continue
        assert _covered(mount["uri"][len("file:") :], trusted), mount


def test_python_finds_plinius_and_site_packages() -> None:
    env = render()["loader"]["env"]
    assert env["PYTHONPATH"].split(":") == [BASE["plinius_src"], BASE["site_packages"]]
    assert BASE["python_libdir"] in env["LD_LIBRARY_PATH"].split(":")


def test_python_in_the_system_libdir_is_not_mounted_twice() -> None:
    m = render(python_libdir="/usr/lib/x86_64-linux-gnu")
    paths = [x["path"] for x in m["fs"]["mounts"]]
    assert len(paths) == len(set(paths))


def test_tpm_device_is_allowed_only_when_configured() -> None:
    assert not any("tpm" in f for f in render()["sgx"]["allowed_files"])
    allowed = render(tpm_device="/dev/tpmrm0")["sgx"]["allowed_files"]
    assert "dev:/dev/tpmrm0" in allowed


def test_makefile_uses_the_gramine_tools_and_readme_says_what_ran() -> None:
    mk = (DEPLOY / "Makefile").read_text(encoding="utf-8")
    for tool in ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx-sigstruct-view"):
        assert tool in mk
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "gramine-sgx plinius" in readme
    assert "cannot be installed" in readme and "not run" in readme
