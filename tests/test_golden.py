"""Files written before the package was split (issue 12) still open, byte for byte the same format.

``tests/fixtures/golden/`` holds a mirror (three generations, with a file
counter) and a sealed dataset written by ``tests/fixtures/make_golden.py``
with the code as it was before the split. These tests read them with the code
as it is now, and re-encode their plaintext structures to the same bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from plinius import FileCounter, MasterKey, Mirror, RNGState, SealedDataset
from plinius.errors import RollbackError, WrongKeyError

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
KEY = MasterKey(bytes(range(32)))


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    """A private copy: the committed fixtures are never opened for writing."""
    dst = tmp_path / "golden"
    shutil.copytree(GOLDEN, dst)
    return dst


def _fresh_state() -> dict[str, object]:
    # The fixture generator's state, built with another seed so that a restore must overwrite it.
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN.parent / "make_golden.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    state: dict[str, object] = mod.golden_state(seed=123)
    state["plain"] = {}
    return state


def test_golden_mirror_restores_every_value(golden: Path) -> None:
    state = _fresh_state()
    with Mirror(golden / "mirror.plm", KEY, readonly=True) as mirror:
        info = mirror.verify()
        assert (info.generation, info.step, info.verified) == (3, 2, True)
        assert mirror.restore(state) == 2
    expected = np.load(golden / "mirror_expected.npz")
    model = state["model"]
    optim = state["optim"]
    assert isinstance(model, torch.nn.Module) and isinstance(optim, torch.optim.Optimizer)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), expected[f"model.{k}"])
    for i, s in optim.state_dict()["state"].items():
        np.testing.assert_array_equal(
            s["momentum_buffer"].numpy(), expected[f"optim.{i}.momentum_buffer"]
        )
    extra = state["extra"]
    assert isinstance(extra, torch.Tensor) and extra.dtype == torch.int16
    np.testing.assert_array_equal(extra.numpy(), expected["extra"])
    assert state["plain"] == {
        "epoch": 1,
        "ratio": 0.25,
        "name": "golden",
        "flags": (True, None),
        7: b"\x00\x01",
    }
    assert isinstance(state["rng"], RNGState)
    sched = state["sched"]
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert sched.last_epoch == 3


def test_golden_mirror_keeps_its_counter_and_goes_on(golden: Path) -> None:
    counter = FileCounter(golden / "counter")
    assert counter.read() == 3
    state = _fresh_state()
    with Mirror(golden / "mirror.plm", KEY, counter=counter) as mirror:
        assert mirror.restore(state) == 2
        mirror.save(state, step=3)
    assert counter.read() == 4
    with Mirror(golden / "mirror.plm", KEY, readonly=True, counter=counter) as mirror:
        assert mirror.verify().step == 3
    # The old counter value put back is a rollback, as before.
    (golden / "counter").write_text("9\n")
    with pytest.raises(RollbackError):
        Mirror(golden / "mirror.plm", KEY, readonly=True, counter=counter)


def test_golden_mirror_names_a_wrong_key(golden: Path) -> None:
    with pytest.raises(WrongKeyError):
        Mirror(golden / "mirror.plm", MasterKey(bytes(32)), readonly=True)


def test_golden_dataset_reads_every_record(golden: Path) -> None:
    ds_id = (golden / "data_id.txt").read_text().strip()
    expected = np.load(golden / "data_expected.npz")
    ds = SealedDataset(golden / "data.pld", KEY, expect_id=ds_id)
    assert len(ds) == 40
    for i in range(40):
        image, label = ds[i]
        np.testing.assert_array_equal(np.asarray(image), expected["image"][i])
        assert int(label) == int(expected["label"][i])


def test_golden_mirror_structures_reencode_to_the_same_bytes() -> None:
    # Read the committed generation with the primitives FORMAT.md names, then
    # re-encode each plaintext structure with today's code: the bytes must match.
    from plinius.crypto import TAG_SIZE, Aead, aad, counter_nonce, hkdf
    from plinius.mirror import _format as fmt

    raw = (GOLDEN / "mirror.plm").read_bytes()
    sb = fmt.unpack_superblock(raw[: fmt.DATA_START], "golden")
    mkey = KEY.derive("mirror", sb.region_id)
    fmt.check_superblock_mac(raw[: fmt.DATA_START], sb, mkey, "golden")
    assert (
        fmt.pack_superblock(sb.region_id, sb.fingerprint, sb.created_at, mkey)
        == raw[: fmt.HEADER_LEN]
    )

    word = int.from_bytes(raw[fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8], "little")
    gen, slot = fmt.unpack_commit(word)
    assert fmt.pack_commit(gen, slot) == word
    off = fmt.ROOT_OFFSETS[slot]
    salt = raw[off : off + fmt.ROOT_SALT]
    n = int.from_bytes(raw[off + 16 : off + 20], "little")
    aead = Aead(hkdf(mkey, salt=salt, info="plinius/v1/mirror/save"))
    root_plain = aead.decrypt(
        counter_nonce(0, 1),
        raw[off + 20 : off + 20 + n],
        aad("plinius/v1/mirror/root", sb.region_id, slot, gen),
    )
    root = fmt.unpack_root(root_plain)
    assert fmt.pack_root(root) == root_plain
    body = raw[root.body_off : root.body_off + root.body_len]
    assert body[-TAG_SIZE:] == root.body_tag
    text = aead.decrypt(counter_nonce(1, 1), body, aad("plinius/v1/mirror/body", sb.region_id, gen))
    skeleton, entries = fmt.decode_body(text, root)
    assert fmt.encode_body(skeleton, entries) == text


def test_golden_dataset_header_reencodes_to_the_same_bytes() -> None:
    from plinius.data import _format as dfmt

    raw = (GOLDEN / "data.pld").read_bytes()
    hdr = dfmt.read_prefix(memoryview(raw), GOLDEN / "data.pld")
    header_key = KEY.derive(dfmt.HEADER_PURPOSE, hdr.dataset_id)
    layout = dfmt.authenticate_header(memoryview(raw), hdr, header_key, GOLDEN / "data.pld")
    assert dfmt.header_json(layout) == raw[hdr.json_slice]
