"""Fuzz the dataset-to-index path: :meth:`Ingestor.ingest` with generated datasets and bytes.

Whatever comes in, ingest either keeps the instance or raises :class:`InvalidInstance` /
:class:`StorageFailure`, and a refused input leaves no file behind.  Both entry forms are driven:
bytes (DIMSE and STOW) and a spooled file path (chunked receive).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scp_node.audit import AuditTrail
from scp_node.store.db import Database
from scp_node.store.ingest import Ingestor, InvalidInstance, Origin, StorageFailure

uids = st.one_of(
    st.from_regex(r"1\.2\.826\.0\.1\.[1-9][0-9]{0,20}(\.[0-9]{1,8}){0,4}", fullmatch=True),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    st.sampled_from(["", "../../etc", "/abs/path", "1.2.3/../x", "1" * 65, "1..2", ".1", "1.2.", "\x00"]),
)


@st.composite
def part10(draw: st.DrawFn) -> bytes:
    ds = Dataset()
    meta = FileMetaDataset()
    sop = draw(uids)
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = draw(st.one_of(st.just(sop), uids)) or "1.2.3"
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if draw(st.booleans()) or kw == "SOPInstanceUID":
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            setattr(ds, kw, sop if kw == "SOPInstanceUID" else draw(uids))
    ds.PatientID = draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=70))
    ds.Modality = draw(st.sampled_from(["CT", "DX", "", "XXXXXXXXXXXXXXXXXXXX"]))
    ds.InstanceNumber = draw(st.one_of(st.integers(-(2**31), 2**31 - 1), st.none()))
    if draw(st.booleans()):
        ds.add_new(0x7FE00010, "OB", draw(st.binary(max_size=512)))
    fh = BytesIO()
    from pydicom import config

    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.save_as(fh, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
                   enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = mode
    data = bytearray(fh.getvalue())
    # Mutations: cut short, flip bytes, splice junk.
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["cut", "flip", "junk"]))
        if op == "cut":
            del data[i:]
        elif op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


#: Inputs tried: hypothesis' budget (it may stop early only when it runs out of distinct inputs).
EXAMPLES = 1000


def test_ingest_never_raises_anything_else_and_leaves_nothing_on_refusal(tmp_path: Path, counts: dict) -> None:
    """The fuzz run and its counts in one test: whatever order the tests run in, the counts are
    those of this run, and they must add up -- every input stored or refused, both seen."""
    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    storage = tmp_path / "storage"
    ingestor = Ingestor(db, storage, AuditTrail(db, b"k" * 32))
    stats = {"examples": 0, "stored": 0, "refused": 0}

    def files() -> set[Path]:
        return {p for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.one_of(part10(), st.binary(max_size=2048),
                          st.builds(lambda b: b"\x00" * 128 + b"DICM" + b, st.binary(max_size=1024))),
           as_file=st.booleans())
    def ingest_once(data: bytes, as_file: bool) -> None:
        before = files()
        arg: bytes | Path = data
        if as_file:
            arg = tmp_path / "spool.dcm"
            arg.write_bytes(data)
        stats["examples"] += 1
        try:
            ingestor.ingest(arg, Origin("FUZZ", "127.0.0.1"))
        except (InvalidInstance, StorageFailure):
            stats["refused"] += 1
            assert files() == before
            return
        stats["stored"] += 1
        after = files()
        assert len(after) - len(before) in (0, 1)  # a duplicate keeps the first copy
        assert not [p for p in after if p.name.endswith(".tmp")]
        for p in after - before:
            assert p.resolve().is_relative_to(storage.resolve())

    try:
        ingest_once()
    finally:
        db.dispose()
    counts.update(stats)
    assert stats["refused"] + stats["stored"] == stats["examples"], stats
    assert stats["examples"] >= EXAMPLES // 2, stats  # hypothesis really ran the inputs
    assert stats["refused"] > 0 and stats["stored"] > 0, stats  # both outcomes were reached
