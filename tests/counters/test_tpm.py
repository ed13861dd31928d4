"""The TPM 2.0 NV counter, against a software TPM (swtpm) started by these tests.

Each module run starts a fresh ``swtpm`` on free local ports with its state in
a temporary directory, and always stops it and removes the directory. Without
swtpm or tpm2-pytss the tests skip with the reason (``make sysdeps`` installs
both); under CI (``CI`` set) they fail instead, so a missing install step can
never pass as green.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plinius.counters import Counter
from plinius.crypto import MasterKey
from plinius.errors import ConfigError, IntegrityError, RollbackError


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the TPM tests (run 'make sysdeps')")
    pytest.skip(reason)


try:
    import tpm2_pytss as tss
except ImportError:  # pragma: no cover - depends on the install
    tss = None

from plinius.counters.tpm import DEFAULT_NV_INDEX, TPMCounter  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

SWTPM = shutil.which("swtpm")
LOCAL = "127.0.0.1"

# TPM command codes, to let the attacking proxy below pick the answers to forge.
CC_NV_READ = 0x0000014E
CC_NV_READ_PUBLIC = 0x00000169
NV_WRITTEN = 0x20000000  # TPMA_NV_WRITTEN


def _free_port_pair() -> int:
    """A port P with P and P + 1 both free (swtpm's server and control ports)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((LOCAL, 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind((LOCAL, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free TCP ports on 127.0.0.1")


def _wait_listening(port: int, proc: subprocess.Popen[bytes] | None, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"swtpm exited with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((LOCAL, port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {deadline_s} s")


class SwTpm:
    """One swtpm process over TCP, with its NV state in ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host={LOCAL},port={self.port}"

    def start(self) -> None:
        assert SWTPM is not None
        for _ in range(5):  # a port can be taken between the probe and the bind
            self.port = _free_port_pair()
            self.proc = subprocess.Popen(
                [
                    SWTPM, "socket", "--tpm2",
                    "--server", f"type=tcp,port={self.port},bindaddr={LOCAL}",
                    "--ctrl", f"type=tcp,port={self.port + 1},bindaddr={LOCAL}",
                    "--tpmstate", f"dir={self.state_dir}",
                    "--flags", "not-need-init,startup-clear",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                _wait_listening(self.port, self.proc, 10.0)
                return
            except RuntimeError:
                self.stop()
        raise RuntimeError("swtpm did not start")

    def stop(self, *, crash: bool = False) -> None:
        """Stop swtpm; ``crash`` kills it with SIGKILL, like a power cut."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.contextmanager
def _swtpm() -> Iterator[SwTpm]:
    if tss is None:
        _unavailable("tpm2-pytss is not installed (pip install 'plinius[tpm]')")
    if SWTPM is None:
        _unavailable("swtpm is not installed (Debian package swtpm)")
    state = Path(tempfile.mkdtemp(prefix="plinius-swtpm-"))
    tpm = SwTpm(state)
    try:
        tpm.start()
        yield tpm
    finally:
        # Always: a leaked swtpm would hold its ports and its state directory.
        tpm.stop()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def swtpm() -> Iterator[SwTpm]:
    """A fresh software TPM for this module."""
    with _swtpm() as tpm:
        yield tpm


_indices = itertools.count(DEFAULT_NV_INDEX + 0x10)


def _loaded(tcti: str) -> tuple[int, int]:
    """How many sessions and transient objects the TPM holds."""
    assert tss is not None
    with tss.ESAPI(tcti) as esys:
        counts = []
        for kind in (tss.TPM2_HT.LOADED_SESSION, tss.TPM2_HT.TRANSIENT):
            _, data = esys.get_capability(tss.TPM2_CAP.HANDLES, int(kind) << 24, 64)
            counts.append(int(data.data.handles.count))
    return counts[0], counts[1]


@pytest.fixture(autouse=True)
def _no_leaked_tpm_slots(request: pytest.FixtureRequest) -> Iterator[None]:
    """swtpm has no resource manager: a session plinius forgets to flush stays
    loaded, and a few of them make every later command fail."""
    yield
    if "swtpm" in request.fixturenames:
        tpm = request.getfixturevalue("swtpm")
        assert _loaded(tpm.tcti) == (0, 0)


@pytest.fixture
def index() -> int:
    """An NV index no other test in this module uses."""
    return next(_indices)


def _raw_define(tcti: str, index: int, attrs: int, size: int, auth: bytes = b"") -> None:
    """Define an NV index directly, as another TPM user (or the host) would."""
    assert tss is not None
    public = tss.TPM2B_NV_PUBLIC(
        nvPublic=tss.TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=tss.TPM2_ALG.SHA256, attributes=attrs,
            authPolicy=b"", dataSize=size,
        )
    )  # fmt: skip
    with tss.ESAPI(tcti) as esys:
        esys.nv_define_space(auth, public)


def _raw_undefine(tcti: str, index: int) -> None:
    """Delete an NV index with owner authorization, as the host could."""
    assert tss is not None
    with tss.ESAPI(tcti) as esys:
        esys.nv_undefine_space(esys.tr_from_tpmpublic(index))


def _counter_attrs() -> int:
    assert tss is not None
    return int(
        (tss.TPM2_NT.COUNTER << tss.TPMA_NV.TPM2_NT_SHIFT)
        | tss.TPMA_NV.AUTHREAD
        | tss.TPMA_NV.AUTHWRITE
        | tss.TPMA_NV.NO_DA
    )


# -- the counter ---------------------------------------------------------------


def test_is_a_trusted_wearing_counter(swtpm: SwTpm, key: MasterKey, index: int) -> None:
    c = TPMCounter.for_key(key, swtpm.tcti, index=index)
    assert isinstance(c, Counter)
    assert c.trusted is True and c.wears is True
    assert f"{index:#x}" in repr(c)


def test_new_index_reads_zero_and_a_read_defines_nothing(
    swtpm: SwTpm, key: MasterKey, index: int
) -> None:
    c = TPMCounter.for_key(key, swtpm.tcti, index=index)
    assert c.read() == 0
    assert c.read() == 0
    # Still missing: a read never writes to the TPM.
    with pytest.raises(RollbackError, match="does not exist"):
        TPMCounter.for_key(key, swtpm.tcti, index=index, create=False).read()


def test_increment_is_monotonic_by_one(swtpm: SwTpm, key: MasterKey, index: int) -> None:
    c = TPMCounter.for_key(key, swtpm.tcti, index=index)
    values = []
    for _ in range(5):
        values.append(c.increment())
        assert c.read() == values[-1]
    assert values == [1, 2, 3, 4, 5]


def test_defined_but_never_incremented_reads_zero(swtpm: SwTpm, key: MasterKey, index: int) -> None:
    c = TPMCounter.for_key(key, swtpm.tcti, index=index)
    # Another process defined the index and crashed before incrementing it:
    # the TPM calls it uninitialized, the counter reads 0.
    _raw_define(swtpm.tcti, index, _counter_attrs(), 8, c._auth)
    assert c.read() == 0
    assert c.increment() == 1
    assert c.read() == 1


def test_values_persist_across_objects(swtpm: SwTpm, key: MasterKey, index: int) -> None:
    for _ in range(3):
        TPMCounter.for_key(key, swtpm.tcti, index=index).increment()
    again = TPMCounter.for_key(key, swtpm.tcti, index=index, create=False)
    assert again.read() == 3
    assert again.increment() == 4


def test_values_persist_across_a_tpm_crash_and_restart(key: MasterKey) -> None:
    with _swtpm() as tpm:
        c = TPMCounter.for_key(key, tpm.tcti)
        assert [c.increment() for _ in range(3)] == [1, 2, 3]
        tpm.stop(crash=True)  # SIGKILL: no orderly shutdown, like a power cut
        tpm.start()  # same state directory, new ports
        c = TPMCounter.for_key(key, tpm.tcti, create=False)
        assert c.read() == 3
        assert c.increment() == 4
        tpm.stop()
        tpm.start()
        assert TPMCounter.for_key(key, tpm.tcti).read() == 4


def test_concurrent_increments_are_all_distinct(swtpm: SwTpm, key: MasterKey, index: int) -> None:
    results: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        c = TPMCounter.for_key(key, swtpm.tcti, index=index)  # one object per thread
        try:
            for _ in range(5):
                v = c.increment()
                with lock:
                    results.append(v)
        except BaseException as exc:  # report, do not hang the join
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(results) == list(range(1, 21))  # no value returned twice, none skipped
    assert TPMCounter.for_key(key, swtpm.tcti, index=index).read() == 20


def test_interleaved_objects_see_each_others_increments(
    swtpm: SwTpm, key: MasterKey, index: int
) -> None:
    a = TPMCounter.for_key(key, swtpm.tcti, index=index)
    b = TPMCounter.for_key(key, swtpm.tcti, index=index)
    assert [a.increment(), b.increment(), a.increment(), b.read()] == [1, 2, 3, 3]


# -- attacks ---------------------------------------------------------------------


def test_deleted_and_recreated_index_never_goes_back(key: MasterKey) -> None:
    # A TPM of its own: after a deletion, every new counter on that TPM starts
    # high, which would upset the other tests' expectations.
    with _swtpm() as tpm:
        c = TPMCounter.for_key(key, tpm.tcti)
        for _ in range(3):
            c.increment()
        _raw_undefine(tpm.tcti, c.index)  # the host owns the TPM and deletes the counter
        with pytest.raises(RollbackError, match="does not exist"):
            TPMCounter.for_key(key, tpm.tcti, create=False).read()
        assert c.read() == 0  # what a new job would see
        # Re-created, the TPM starts it above every value a counter ever had.
        assert c.increment() == 4
        assert c.read() == 4
        # So does any other new counter on this TPM.
        assert TPMCounter.for_key(key, tpm.tcti, index=c.index + 1).increment() == 4


def test_another_key_is_refused(
    swtpm: SwTpm, key: MasterKey, other_key: MasterKey, index: int
) -> None:
    TPMCounter.for_key(key, swtpm.tcti, index=index).increment()
    thief = TPMCounter.for_key(other_key, swtpm.tcti, index=index)
    with pytest.raises(IntegrityError, match="authorization value"):
        thief.read()
    with pytest.raises(IntegrityError, match="authorization value"):
        thief.increment()
    assert TPMCounter.for_key(key, swtpm.tcti, index=index).read() == 1  # not advanced


@pytest.mark.parametrize("kind", ["ordinary", "orderly"])
def test_an_index_that_is_not_a_plinius_counter_is_refused(
    swtpm: SwTpm, key: MasterKey, index: int, kind: str
) -> None:
    assert tss is not None
    c = TPMCounter.for_key(key, swtpm.tcti, index=index)
    if kind == "ordinary":
        attrs = int(tss.TPMA_NV.AUTHREAD | tss.TPMA_NV.AUTHWRITE | tss.TPMA_NV.NO_DA)
    else:  # a counter that jumps ahead after a power cut
        attrs = _counter_attrs() | int(tss.TPMA_NV.ORDERLY)
    _raw_define(swtpm.tcti, index, attrs, 8, c._auth)
    with pytest.raises(ConfigError, match="not a plinius counter"):
        c.read()
    with pytest.raises(ConfigError, match="not a plinius counter"):
        c.increment()


class _Proxy:
    """A man in the middle between plinius and swtpm, as a hostile host is.

    Forwards both swtpm ports; ``forge`` may rewrite each TPM response, given
    the command code of the command it answers.
    """

    def __init__(self, tpm: SwTpm, forge: Callable[[int, bytes], bytes]) -> None:
        self.tpm = tpm
        self.forge = forge
        self.forged = 0
        self.port = _free_port_pair()
        self._servers = []
        for off in (0, 1):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((LOCAL, self.port + off))
            s.listen(8)
            s.settimeout(0.2)
            self._servers.append(s)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._accept, args=(s, off), daemon=True)
            for off, s in enumerate(self._servers)
        ]
        for t in self._threads:
            t.start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host={LOCAL},port={self.port}"

    def _accept(self, server: socket.socket, off: int) -> None:
        while not self._stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection((LOCAL, self.tpm.port + off))
            target = self._relay_commands if off == 0 else self._pipe
            threading.Thread(target=target, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _recv_exact(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        def one_way(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(4096):
                    b.sendall(data)
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

        threading.Thread(target=one_way, args=(upstream, client), daemon=True).start()
        one_way(client, upstream)

    def _relay_commands(self, client: socket.socket, upstream: socket.socket) -> None:
        # TPM commands and responses are framed: tag (2), size (4), code (4).
        with client, upstream, contextlib.suppress(OSError, ConnectionError):
            while True:
                head = self._recv_exact(client, 10)
                command = head + self._recv_exact(client, int.from_bytes(head[2:6], "big") - 10)
                upstream.sendall(command)
                head = self._recv_exact(upstream, 10)
                rsp = head + self._recv_exact(upstream, int.from_bytes(head[2:6], "big") - 10)
                forged = self.forge(int.from_bytes(command[6:10], "big"), rsp)
                if forged != rsp:
                    self.forged += 1
                client.sendall(forged)

    def close(self) -> None:
        self._stop.set()
        for s in self._servers:
            s.close()
        for t in self._threads:
            t.join(5)


@contextlib.contextmanager
def _proxy(tpm: SwTpm, forge: Callable[[int, bytes], bytes]) -> Iterator[_Proxy]:
    p = _Proxy(tpm, forge)
    try:
        yield p
    finally:
        p.close()


def _rewind_nv_read(cc: int, rsp: bytes) -> bytes:
    """Answer every NV_Read with the value 1: the attacker's rollback."""
    # tag, size, rc (10) | parameterSize (4) | TPM2B: size (2) + 8 bytes | auth area
    if cc != CC_NV_READ or int.from_bytes(rsp[6:10], "big") != 0:
        return rsp
    return rsp[:16] + (1).to_bytes(8, "big") + rsp[24:]


def _unwritten_nv_public(cc: int, rsp: bytes) -> bytes:
    """Clear TPMA_NV_WRITTEN in NV_ReadPublic answers: "never incremented", so 0."""
    if cc != CC_NV_READ_PUBLIC or int.from_bytes(rsp[6:10], "big") != 0:
        return rsp
    # tag, size, rc (10) | parameterSize (4) | TPM2B_NV_PUBLIC: size (2), nvIndex (4),
    # nameAlg (2), attributes (4) | ...
    at = 10 + 4 + 2 + 4 + 2
    attrs = int.from_bytes(rsp[at : at + 4], "big") & ~NV_WRITTEN
    return rsp[:at] + attrs.to_bytes(4, "big") + rsp[at + 4 :]


def test_the_man_in_the_middle_proxy_is_transparent(
    swtpm: SwTpm, key: MasterKey, index: int
) -> None:
    """The proxy itself changes nothing (so the forgery tests below mean something)."""
    with _proxy(swtpm, lambda cc, rsp: rsp) as p:
        c = TPMCounter.for_key(key, p.tcti, index=index)
        assert [c.increment(), c.increment(), c.read()] == [1, 2, 2]


@pytest.mark.parametrize(
    ("forge", "final"),
    [
        (_rewind_nv_read, 6),  # the increment reached the TPM; its read-back was forged
        (_unwritten_nv_public, 5),  # caught before the increment was sent
    ],
)
def test_forged_tpm_answers_are_caught(
    swtpm: SwTpm, key: MasterKey, index: int, forge: Callable[[int, bytes], bytes], final: int
) -> None:
    honest = TPMCounter.for_key(key, swtpm.tcti, index=index)
    for _ in range(5):
        honest.increment()
    with _proxy(swtpm, forge) as p:
        fooled = TPMCounter.for_key(key, p.tcti, index=index)
        with pytest.raises(IntegrityError, match="HMAC"):
            fooled.read()
        with pytest.raises(IntegrityError, match="HMAC"):
            fooled.increment()
        assert p.forged >= 2  # the attack really happened
    assert honest.read() == final


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tcti",
    [
        "nonsense:whatever",
        "device:/dev/plinius-no-such-tpm",
        "swtpm:host=127.0.0.1,port=notaport",
        "swtpm:host=127.0.0.1,port={closed}",
    ],
)
def test_bad_tcti_is_a_clear_config_error(tcti: str) -> None:
    if tss is None:
        _unavailable("tpm2-pytss is not installed (pip install 'plinius[tpm]')")
    tcti = tcti.format(closed=_free_port_pair())  # nothing listens there
    c = TPMCounter(tcti)
    for op in (c.read, c.increment):
        with pytest.raises(ConfigError, match="TCTI") as info:
            op()
        assert tcti in str(info.value)
        assert "swtpm:host=" in str(info.value) or "running" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"index": 0x81000001}, "not an NV index"),
        ({"index": 0x00FFFFFF}, "not an NV index"),
        ({"index": True}, "integer"),
        ({"auth": b"x" * 33}, "at most 32"),
        ({"owner_auth": "secret"}, "bytes"),
        ({"tcti": ""}, "TCTI"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, Any], match: str) -> None:
    if tss is None:
        _unavailable("tpm2-pytss is not installed (pip install 'plinius[tpm]')")
    with pytest.raises(ConfigError, match=match):
        TPMCounter(**kwargs)


def test_wrong_owner_password_is_a_clear_error(swtpm: SwTpm, key: MasterKey, index: int) -> None:
    c = TPMCounter.for_key(key, swtpm.tcti, index=index, owner_auth=b"not the owner password")
    with pytest.raises(ConfigError, match="owner"):
        c.increment()
    assert c.read() == 0  # nothing was defined


# -- with the mirror -------------------------------------------------------------


def _mirror_with_counter() -> Any:
    try:
        from plinius.mirror import Mirror
    except ImportError:
        return None
    if "counter" not in inspect.signature(Mirror).parameters:
        return None
    return Mirror


def test_mirror_with_tpm_counter_refuses_a_rolled_back_file(
    swtpm: SwTpm, key: MasterKey, index: int, shm_dir: Path
) -> None:
    mirror_cls = _mirror_with_counter()
    if mirror_cls is None:
        pytest.skip("plinius.mirror.Mirror does not take counter= yet")
    import torch

    path = shm_dir / "job.plm"
    old = shm_dir / "old-copy.plm"
    counter = TPMCounter.for_key(key, swtpm.tcti, index=index)
    w = torch.zeros(16)
    # K = 2: the TPM is advanced on every second commit (wear).
    with mirror_cls(path, key, counter=counter, counter_every=2) as m:
        for step in range(1, 4):
            w += 1
            m.save({"w": w}, step=step)
    # 2: one advance when the mirror was created (it learns where a new index
    # starts, see tests/mirror/test_counter.py), one on the second commit.
    assert counter.read() == 2
    shutil.copyfile(path, old)  # the host keeps a copy
    with mirror_cls(path, key, counter=counter, counter_every=2) as m:
        for step in range(4, 8):
            w += 1
            m.save({"w": w}, step=step)
    assert counter.read() == 4
    shutil.copyfile(old, path)  # ... and puts it back
    with pytest.raises(RollbackError, match="older copy"):
        mirror_cls(path, key, counter=counter, counter_every=2, readonly=True)
    with pytest.raises(RollbackError, match="older copy"):
        mirror_cls(path, key, counter=counter, counter_every=2)
    path.unlink()  # deleting the mirror does not restart the job either
    with pytest.raises(RollbackError):
        mirror_cls(path, key, counter=counter, counter_every=2)
    assert counter.read() == 4  # refusing never advanced the counter


def test_plinius_train_with_a_tpm_counter(swtpm: SwTpm, shm_dir: Path) -> None:
    """The CLI wiring: `--counter tpm:TCTI` uses the key-derived (HMAC-protected) index,
    advances it, and refuses a deleted mirror afterwards."""
    import numpy as np

    from plinius.data import seal_dataset

    key = MasterKey.generate()
    key.save(shm_dir / "k.key")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(64, 8, 8), dtype=np.uint8)
    seal_dataset(shm_dir / "d.pld", key, {"image": x, "label": (x[:, 0, 0] > 127).astype(np.int64)})
    args = [
        "train", "--key", str(shm_dir / "k.key"), "--data", str(shm_dir / "d.pld"),
        "--mirror", str(shm_dir / "m.plm"), "--model", "cnn-tiny", "--steps", "4",
        "--batch-size", "16", "--counter", f"tpm:{swtpm.tcti}", "--counter-every", "2",
    ]  # fmt: skip
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    assert TPMCounter.for_key(key, swtpm.tcti).read() >= 1
    (shm_dir / "m.plm").unlink()
    r = run_cli(*args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
