"""Accepting one instance: durable file + index rows + audit row, all or nothing.

This is the one entry for every receive path (C-STORE now, STOW-RS later).  The order is
dcm4chee's: write the file durably, commit the index rows (and the audit row) in one
transaction, and in ``finally`` remove any file the index did not accept.  Only when
:meth:`Ingestor.ingest` returns has the instance been kept; the caller may then answer success.

An instance comes either as bytes or as the path of a file a receiver already spooled (pynetdicom's
chunked receive): a file is checked, hashed and copied in blocks, so a very large dataset is never
held in memory.  Before anything is written the disk guard checks the free space left on the
storage file system; below the watermark the store fails with :class:`StorageFailure` (the
sender sees Out of Resources and keeps its copy).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, UID_dictionary
from pynetdicom import ALL_TRANSFER_SYNTAXES
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from ..audit import AuditTrail, Event
from ..ops import stats
from .db import Database
from .errors import IdentityConflict, InvalidInstance, SOPClassMismatch, StorageFailure  # noqa: F401 (callers import them here)
from .files import (UnsafeUID, check_uid, fsync_dir, instance_path, link_new, remove_quietly,
                    sha256_hex, stage_bytes, stage_file, temp_name)
from .group_commit import GroupCommit
from .driver import IndexTransaction
from .index import InstanceRow, add_audit, find_instance, index_instance
from .integrity import IncompleteDataset, check_complete, check_complete_file
from .scan import scan_instance
from .models import Instance, Report

log = logging.getLogger(__name__)


class IngestOutcome(str, enum.Enum):
    STORED = "stored"
    DUPLICATE_IDENTICAL = "duplicate-identical"  #: same bytes as the stored copy: nothing to do
    DUPLICATE_KEPT_FIRST = "duplicate-kept-first"  #: different bytes, policy keep_first
    REPLACED = "replaced"  #: different bytes, policy replace


@dataclass(frozen=True)
class Origin:
    """Who sent an instance."""

    ae_title: str = ""
    address: str = ""
    via: str = "dimse"


def parse_header(data: bytes) -> Dataset:
    """Parse the file meta and the header of a Part 10 byte string, refusing a cut-short one.

    The whole byte string is checked for truncation (:func:`check_complete`): reading only the
    header would accept an instance whose pixel data was cut off.
    """
    try:
        # The quick scan covers what modalities send; pydicom's whole parse decides the rest.
        ds = scan_instance(data)
        if ds is None:
            ds = check_complete(data)  # one parse: values stay raw until the lines below read them
        # Touch the attributes we index so that a broken element fails here, not later.
        for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
            ds.get(kw)
    except IncompleteDataset as exc:
        raise InvalidInstance(f"incomplete dataset: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: whatever the parser raises means "cannot understand"
        # (the fuzz test found pydicom's BytesLengthException; struct.error, RecursionError and
        # friends are just as possible). The type name only: the message may quote patient data.
        raise InvalidInstance(f"cannot parse dataset: {type(exc).__name__}") from None
    return ds


def parse_header_file(path: Path) -> Dataset:
    """:func:`parse_header` for a spooled file: large values are skipped, never loaded."""
    try:
        ds = check_complete_file(path)  # one parse: large values deferred, the rest stays raw until read
        for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
            ds.get(kw)
    except IncompleteDataset as exc:
        raise InvalidInstance(f"incomplete dataset: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - see parse_header
        raise InvalidInstance(f"cannot parse dataset: {type(exc).__name__}") from None
    return ds


#: Every transfer syntax pydicom's UID dictionary names (retired ones included) and every one the
#: DIMSE port negotiates (pynetdicom's list, which has a few that pydicom's dictionary may lack).
#: A kept instance's file meta must name one of them: the value goes to the index and from there
#: into DICOMweb headers, and a syntax nobody knows (a private one) could not be decoded or served.
KNOWN_TRANSFER_SYNTAXES = frozenset(
    [uid for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax"]
    + [str(uid) for uid in (*AllTransferSyntaxes, *ALL_TRANSFER_SYNTAXES)])


def check_file_meta(ds: Any, sop_uid: str, sop_class: str) -> str:
    """Check every UID the file meta brings; return the Transfer Syntax UID as it is indexed.

    Transfer Syntax UID is required and must be a known transfer syntax; Media Storage SOP Class
    and Instance UID, where present, must be UIDs too (:func:`check_uid`: digits and dots, at most
    64 characters, after the padding and surrounding whitespace that pydicom's own UID reading
    removes).  A value with anything else in it -- a line break followed by text, say -- is
    refused, never trimmed into shape.  Raises :class:`InvalidInstance` (Cannot Understand).

    ``sop_uid`` and ``sop_class`` are the data set's own, already checked: the usual case -- a
    known syntax, the meta naming the data set's own UIDs -- costs set and string look-ups only,
    no pattern match (this runs for every received instance).
    """
    meta = ds.file_meta
    try:
        syntax = meta.get("TransferSyntaxUID") if meta else None
        if not (isinstance(syntax, str) and syntax in KNOWN_TRANSFER_SYNTAXES):  # (a UID, if found there)
            syntax = check_uid(syntax, "TransferSyntaxUID")
            if syntax not in KNOWN_TRANSFER_SYNTAXES:
                raise InvalidInstance("TransferSyntaxUID is not a transfer syntax this node knows")
        for keyword, own in (("MediaStorageSOPClassUID", sop_class), ("MediaStorageSOPInstanceUID", sop_uid)):
            value = meta.get(keyword)
            if value is not None and value != own:
                check_uid(value, keyword)
    except UnsafeUID as exc:
        raise InvalidInstance(str(exc)) from None
    except InvalidInstance:
        raise
    except Exception as exc:  # noqa: BLE001 - a meta element pydicom cannot even read
        raise InvalidInstance(f"cannot parse file meta: {type(exc).__name__}") from None
    return str(syntax)


_BLOCK = 1024 * 1024
#: Spooled datasets up to this size are read into memory once to be checked, parsed and hashed;
#: larger ones are parsed from the file with their large values skipped.
IN_MEMORY_PARSE_LIMIT = 16 * 1024 * 1024


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


#: SQLSTATEs of a transaction the server rolled back to resolve a conflict: worth another try.
_TRANSIENT = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected


def _transient(exc: OperationalError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _TRANSIENT


def _discard(path: Path) -> None:
    """Remove a file this store made; never raises (it runs in ``finally``, on a failing disk too)."""
    try:
        path.unlink()
    except OSError:
        pass


@dataclass(eq=False)
class _Unit:
    """One store on its way into the index: its rows, its file's names and what became of it."""

    row: InstanceRow
    origin: Origin
    audit_ids: dict[str, Any]
    staged: Path | None  # the temporary name (None once the file has its plain name instead)
    linked: Path | None = None  # the plain name, given before the transaction; not indexed yet
    outcome: IngestOutcome | None = None
    old_rel: str | None = None
    placed: Path | None = None  # the name the new index row gives the file (decided in the transaction)
    committed: bool = False

    def leftovers(self) -> set[Path]:
        """The names of this store's file that no committed index row refers to."""
        kept = self.placed if self.committed else None
        return {name for name in (self.staged, self.linked, self.placed) if name is not None and name != kept}


@dataclass
class Ingestor:
    """Keeps instances in ``storage_dir`` and indexes them in ``db``."""

    db: Database
    storage_dir: Path
    audit: AuditTrail
    duplicate_policy: str = "keep_first"
    #: Disk guard watermark (see ``[store] min_free_bytes`` / ``min_free_percent``); 0 switches it off.
    min_free_bytes: int = 0
    min_free_percent: float = 0.0

    def __post_init__(self) -> None:
        # Same-UID races (two associations sending one instance) are serialised per process. A
        # store waits under its lock until its commit is done (possibly in a shared batch), so
        # there are enough of them that unrelated instances rarely share one.
        self._locks = [threading.Lock() for _ in range(1024)]
        #: Concurrent stores of this process share a transaction (see scp_node.store.group_commit).
        self._group: GroupCommit[_Unit] = GroupCommit(self._commit, self._commit_one)

    def recover(self) -> tuple[int, int]:
        """At start: clear what a crash left half-done; return (tmp files removed, files quarantined).

        A ``kill -9`` between the write and the commit leaves a temporary file (never reachable:
        removed), or a whole file the index never accepted (the sender got no success, so it
        resends).  Such unindexed files are **moved** to ``<storage>/../quarantine``, never
        deleted: if the index is not the one that belongs to this storage (restored from a backup,
        a changed ``database_url``), deleting "unknown" files would destroy the archive.  For the
        same reason nothing is touched when the index is empty but the storage folder is not.
        """
        if not self.storage_dir.exists():
            return 0, 0
        with self.db.session() as session:
            indexed = set(session.scalars(select(Instance.path)).all())
            indexed |= set(session.scalars(select(Report.path)).all())  # the SRs we wrote live here too
        quarantine = self.storage_dir.parent / "quarantine"
        tmp = moved = 0
        unindexed: list[tuple[Path, str]] = []
        for folder, _dirs, files in os.walk(self.storage_dir):
            for name in files:
                path = Path(folder) / name
                rel = path.relative_to(self.storage_dir).as_posix()
                if name.startswith(".") and name.endswith(".tmp") or name.endswith(".dcm.new"):
                    remove_quietly(path)
                    tmp += 1
                elif name.endswith(".dcm") and rel.count("/") == 2 and rel not in indexed:
                    unindexed.append((path, rel))
        if unindexed and not indexed:
            log.error("the index is empty but the storage folder holds %d instances: is database_url the "
                      "index of this storage? Nothing was moved.", len(unindexed))
            unindexed = []
        for path, rel in unindexed:
            target = quarantine / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved += 1
        if tmp or moved:
            log.warning("removed %d temporary files; moved %d unindexed files to %s", tmp, moved, quarantine)
        return tmp, moved

    def check_free_space(self, incoming: int) -> None:
        """Raise :class:`StorageFailure` if keeping ``incoming`` more bytes would cross the watermark."""
        if not self.min_free_bytes and not self.min_free_percent:
            return
        folder = self.storage_dir
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            usage = shutil.disk_usage(folder)
        except OSError as exc:
            raise StorageFailure(f"cannot read free disk space: {exc.strerror or exc}") from None
        floor = max(self.min_free_bytes, int(usage.total * self.min_free_percent / 100))
        if usage.free - incoming < floor:
            raise StorageFailure(f"disk guard: {usage.free // 2**20} MiB free, watermark {floor // 2**20} MiB")

    def ingest(self, data: bytes | Path, origin: Origin, expected_sop_class: str | None = None) -> IngestOutcome:
        """Keep one Part 10 instance (see :meth:`_ingest`); its outcome, time and size go to the
        metrics ([ops], :mod:`scp_node.ops.stats`; nothing when off)."""
        started = time.monotonic()
        outcome = "error"
        try:
            result = self._ingest(data, origin, expected_sop_class)
            outcome = result.value
            return result
        except InvalidInstance:
            outcome = "refused"
            raise
        except StorageFailure:
            outcome = "failed"
            raise
        finally:
            if stats.folder() is not None:
                try:
                    size = data.stat().st_size if isinstance(data, Path) else len(data)
                except OSError:
                    size = 0
                stats.stored(origin.via, outcome, time.monotonic() - started, size)

    def _ingest(self, data: bytes | Path, origin: Origin, expected_sop_class: str | None = None) -> IngestOutcome:
        """Keep one Part 10 instance (preamble + meta + dataset, exactly as received).

        ``data`` is the bytes, or the path of a spooled Part 10 file (read in blocks, copied, left
        in place for the caller to remove).
        """
        digest = ""
        if isinstance(data, Path):
            try:
                size = data.stat().st_size
                # A dataset of ordinary size is parsed and hashed from memory: reading a file
                # element by element costs a system call (and a GIL hand-over) per element.
                blob = data.read_bytes() if size <= IN_MEMORY_PARSE_LIMIT else None
            except OSError as exc:
                raise StorageFailure(f"spooled dataset is unreadable: {exc.strerror or exc}") from None
            self.check_free_space(size)
            if blob is None:
                ds = parse_header_file(data)
            else:
                ds, digest = parse_header(blob), sha256_hex(blob)
                del blob
        else:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidInstance(f"not a byte string: {type(data).__name__}")
            data = bytes(data)
            self.check_free_space(len(data))
            ds = parse_header(data)
        try:
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            sop_class = check_uid(ds.get("SOPClassUID"), "SOPClassUID")
            study_uid = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        except UnsafeUID as exc:
            raise InvalidInstance(str(exc)) from None
        syntax = check_file_meta(ds, sop_uid, sop_class)
        if expected_sop_class and sop_class != expected_sop_class:
            # (STOW-RS has no presentation context: its caller passes the file meta's SOP class)
            raise SOPClassMismatch("SOP Class UID differs from MediaStorageSOPClassUID" if origin.via == "stow"
                                   else "SOP Class UID of the dataset does not match the presentation context")
        meta_sop = ds.file_meta.get("MediaStorageSOPInstanceUID") if ds.file_meta else None
        if meta_sop and str(meta_sop) != sop_uid:
            raise InvalidInstance("MediaStorageSOPInstanceUID does not match SOPInstanceUID")
        rel = instance_path(study_uid, series_uid, sop_uid)
        if isinstance(data, Path) and not digest:
            digest = _sha256_file(data)
        # (bytes are hashed while they are written: see stage_bytes)
        with self._locks[hash(sop_uid) % len(self._locks)]:
            return self._keep(ds, data, digest, rel, origin, sop_uid, sop_class, study_uid, series_uid, syntax)

    def _keep(self, ds: Dataset, data: bytes | Path, digest: str, rel: Path, origin: Origin, sop_uid: str,
              sop_class: str, study_uid: str, series_uid: str, syntax: str) -> IngestOutcome:
        """Stage the file durably, then decide and index in one transaction.

        One write-locked transaction, shared with concurrent stores (:mod:`.group_commit`), holds
        only the index work and the commit.  Before it, the staged and fsynced file is hard-linked
        to its plain name ``<sop>.dcm`` and the folder fsynced.  The link never replaces a file:
        if the name is taken (a duplicate's stored copy, or the same instance from another
        receiver process not committed yet), a kept instance is renamed inside the transaction to
        a name of its own (``<sop>.<random>.dcm``, as a replacement gets).  A crash before the
        commit leaves an unindexed file for :meth:`recover`; names the index does not take, and a
        replaced copy, are removed after the commit: the index never points at a missing file.
        """
        path = self.storage_dir / rel
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        staged = temp_name(path)
        try:
            if isinstance(data, Path):
                stage_file(staged, data)
            else:
                digest = stage_bytes(staged, data)
        except OSError as exc:
            _discard(staged)
            raise StorageFailure(f"cannot write file: {exc.strerror or exc}") from None
        try:
            row = InstanceRow.from_header(ds, rel.as_posix(), size, digest, origin.ae_title, origin.address,
                                          sop_uid, sop_class, study_uid, series_uid, syntax)
        except BaseException:
            _discard(staged)
            raise
        audit_ids = dict(ae_title=origin.ae_title, peer=origin.address, study_uid=study_uid,
                         series_uid=series_uid, sop_uid=sop_uid, patient_id=row.patient["patient_id"])
        unit = _Unit(row, origin, audit_ids, staged)
        try:
            self._link_plain_name(unit, path)
            self._group.run(unit)  # alone, or in one transaction with concurrent stores
            assert unit.outcome is not None
            if unit.outcome is IngestOutcome.REPLACED and unit.old_rel is not None:
                # The index points at the new file now; the old one is no longer referred to. (A
                # crash before this line leaves it unindexed: recover() quarantines it.)
                remove_quietly(self.storage_dir / unit.old_rel)
            return unit.outcome
        except SQLAlchemyError as exc:
            raise StorageFailure(f"index write failed: {type(exc).__name__}") from None
        except OSError as exc:
            raise StorageFailure(f"cannot place file: {exc.strerror or exc}") from None
        finally:
            for name in unit.leftovers():  # a duplicate's bytes, or whatever a failure left
                _discard(name)

    @staticmethod
    def _link_plain_name(unit: _Unit, path: Path) -> None:
        """Before the transaction: give the staged file its plain name, if no file has it, and
        make that durable (outside the index lock, so concurrent stores' folder fsyncs overlap)."""
        assert unit.staged is not None
        if link_new(unit.staged, path):
            unit.linked = path
            _discard(unit.staged)
            unit.staged = None
            fsync_dir(path.parent)

    def _commit(self, units: list[_Unit]) -> None:
        """One transaction for ``units``: decide and index each, rename the files that could not
        take their plain name to names of their own (fsyncing each such folder once), commit.  On
        failure every renamed file is back under its staged name (and nothing is committed)
        before the exception propagates."""
        try:
            with self.db.index_transaction() as tx:
                folders: dict[Path, None] = {}
                for unit in units:
                    unit.outcome, unit.old_rel, new_rel = self._decide_and_index(tx, unit)
                    if new_rel is not None:
                        unit.placed = self.storage_dir / new_rel
                        if unit.placed != unit.linked:
                            assert unit.staged is not None
                            os.replace(unit.staged, unit.placed)  # a fresh random name: replaces nothing
                            folders[unit.placed.parent] = None
                for folder in folders:
                    fsync_dir(folder)
        except BaseException:
            for unit in units:
                if unit.placed is not None and unit.placed != unit.linked and unit.staged is not None:
                    try:
                        os.replace(unit.placed, unit.staged)
                    except OSError:
                        pass
                unit.placed = None
                unit.outcome = unit.old_rel = None
            raise
        for unit in units:
            unit.committed = True

    def _commit_one(self, unit: _Unit) -> None:
        """:meth:`_commit` for one store, retried when another process created the same
        patient, study or series row first (an IntegrityError on the insert), or -- on
        PostgreSQL -- when the server chose this transaction as a deadlock's victim.  Each try is
        a new transaction: on PostgreSQL a failed statement aborts the one it ran in."""
        for attempt in range(3):
            try:
                self._commit([unit])
                return
            except (IntegrityError, OperationalError) as exc:
                if attempt == 2 or not (isinstance(exc, IntegrityError) or _transient(exc)):
                    raise

    def _decide_and_index(self, tx: IndexTransaction,
                          unit: _Unit) -> tuple[IngestOutcome, str | None, str | None]:
        """Inside the transaction: a duplicate is audited (the duplicate policy decides), anything
        else gets its index rows and an audit row.  Returns the outcome, the replaced copy's path
        and the path the new file must get (None: keep no file)."""
        row, origin, audit_ids = unit.row, unit.origin, unit.audit_ids
        existing = find_instance(tx, row.sop_instance_uid)
        if existing is not None:
            if existing.sha256 == row.sha256:
                add_audit(tx, self.audit.values(Event.INSTANCE_DUPLICATE, detail="identical bytes; ignored",
                                                  **audit_ids))
                return IngestOutcome.DUPLICATE_IDENTICAL, None, None
            if self.duplicate_policy == "keep_first":
                add_audit(tx, self.audit.values(
                    Event.INSTANCE_DUPLICATE, outcome="warning",
                    detail="different bytes; first copy kept (policy keep_first)", **audit_ids))
                return IngestOutcome.DUPLICATE_KEPT_FIRST, None, None
        if unit.linked is None:  # the plain name is taken (or no hard links here): a name of its own
            name = f"{row.sop_instance_uid}.{uuid.uuid4().hex[:16]}.dcm"
            row = dataclasses.replace(row, path=str(PurePosixPath(row.path).with_name(name)))
        index_instance(tx, row, existing)
        detail = f"{row.size} bytes via {origin.via}"
        if existing is not None:
            detail += "; replaced a different copy (policy replace)"
        add_audit(tx, self.audit.values(Event.INSTANCE_STORED, detail=detail, **audit_ids))
        if existing is None:
            return IngestOutcome.STORED, None, row.path
        # (the replaced copy's name is never the new file's: if that name was free for the link,
        # the old file was already gone)
        return IngestOutcome.REPLACED, existing.path if existing.path != row.path else None, row.path
