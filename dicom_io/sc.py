"""Secondary Capture images a radiologist sees beside the SR: heatmaps and one key image.

- :func:`encode_heatmap_sc`: the source image, windowed for display, with the
  Grad-CAM heatmap blended in, the level and finding burned in, and a legend band
  below the image ("AI heatmap - not for diagnosis", model name and version, a
  colour bar).
- :func:`encode_key_image`: the mid-sagittal slice with every located level
  labelled and a colour-coded badge of each level's worst grade, and a legend.
- :func:`encode_all`: the SR plus every SC of a :class:`StudyResult`;
  :func:`iter_outputs` the same one object at a time, :func:`count_outputs` how many.

Colour map: matplotlib ``inferno``. It is perceptually uniform with monotonically
increasing lightness, so "more heat" always reads as "brighter" (also in
grey-scale print and for colour-vision deficiencies), unlike ``jet``, whose
lightness peaks mid-scale and invents edges. The heatmap is blended with an
opacity proportional to its value, so cold regions leave the anatomy untouched.

Geometry: the image is enlarged by an integer factor (for legible text on small
MR matrices) and the legend sits in a band *below* the image, so the image part
keeps the source's geometry scaled by that factor; Pixel Spacing is written as the
source's divided by the factor, so a viewer can still measure.

Badge colours (Okabe-Ito palette, distinguishable with colour-vision deficiencies)
also carry a letter, so the colour is never the only cue.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.errors import EncodingError
from dicom_io.results import LEVELS, ConditionValues, Finding, StatusValues, StudyResult
from dicom_io.sr import (
    character_set,
    condition_label,
    content_datetime,
    contributing_equipment,
    encode_not_performed_sr,
    encode_sr,
    finding_sort_key,
    grade_label,
    model_versions,
    stamp_datetime,
)
from dicom_io.uids import SERIES_NUMBERS, output_uids

HEATMAP_SERIES_DESCRIPTION = "Discus AI heatmaps - not for diagnosis"
KEY_IMAGE_SERIES_DESCRIPTION = "Discus AI key image - not for diagnosis"
HEATMAP_LEGEND = "AI heatmap - not for diagnosis"
KEY_IMAGE_LEGEND = "AI key image - not for diagnosis"
COLORMAP = "inferno"
#: Images are enlarged until their shorter side reaches this (integer factors, at most 4).
TARGET_SHORT_SIDE = 512
#: Height of the legend band below the image, in output pixels.
LEGEND_HEIGHT = 64
#: Maximum heatmap opacity (at heat 1.0).
MAX_ALPHA = 0.6

#: Badge colour per severity index (0 none, 1 moderate/bulging, 2 severe/herniation).
SEVERITY_COLOURS: dict[int, tuple[int, int, int]] = {
    0: (0, 158, 115),  # Okabe-Ito bluish green
    1: (230, 159, 0),  # Okabe-Ito orange
    2: (213, 94, 0),  # Okabe-Ito vermillion
}
#: Badge letter and legend text per grade, one scale per line of the legend: the
#: stenosis grades (RSNA) and the disc categories are different things.
GRADE_KEYS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("Stenosis", (("normal_mild", "N", "normal/mild"), ("moderate", "M", "moderate"), ("severe", "S", "severe"))),
    ("Disc", (("normal", "N", "normal"), ("bulging", "B", "bulging"), ("herniation", "H", "herniation"))),
)
#: Conditions whose grades the key image's badges show.
KEY_IMAGE_CONDITIONS = frozenset({
    ConditionValues.DISC, ConditionValues.SPINAL_CANAL_STENOSIS, ConditionValues.NEURAL_FORAMINAL_NARROWING,
    ConditionValues.SUBARTICULAR_STENOSIS,
})
_BADGE: dict[str, str] = {grade: letter for _, keys in GRADE_KEYS for grade, letter, _ in keys}
_LEGEND_BG = (24, 24, 24)
_TEXT = (255, 255, 255)
#: Colour of the measured lines on the key image (and of their legend line).
MEASUREMENT_COLOUR = (120, 255, 120)

_REQUIRED_PIXEL_ATTRIBUTES = ("Rows", "Columns", "PixelData", "PhotometricInterpretation")


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font: no system font needed on the worker. Loading it
    # parses the font each time, so each size is loaded once per process.
    return ImageFont.load_default(size=size)


def _check_pixel_source(source: Dataset, name: str) -> None:
    if not isinstance(source, Dataset):
        raise TypeError(f"{name}: expected pydicom Dataset, got {type(source).__name__}")
    for keyword in _REQUIRED_PIXEL_ATTRIBUTES:
        if keyword not in source:
            raise EncodingError(f"{name}.{keyword}: missing (the SC needs the source pixels)")
    if int(source.get("SamplesPerPixel", 1)) != 1:
        raise EncodingError(f"{name}.SamplesPerPixel: only grey-scale sources are supported")


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        value = list(value)[0]
    return float(value)


def window_image(source: Dataset, frame: int = 1) -> np.ndarray:
    """Source pixels as display grey levels (uint8), windowed.

    Uses Rescale Slope/Intercept, then the first Window Center/Width when present,
    else the 1st-99th percentile range; MONOCHROME1 is inverted.

    Raises
    ------
    EncodingError
        If the pixel data cannot be decoded or ``frame`` does not exist.
    """
    try:
        pixels = source.pixel_array
    except Exception as exc:  # decoder missing or corrupt data
        raise EncodingError(f"source.PixelData: cannot decode ({type(exc).__name__}: {exc})") from exc
    frames = int(source.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        if not 1 <= frame <= frames:
            raise EncodingError(f"image.frame: {frame} not in 1..{frames}")
        pixels = pixels[frame - 1]
    img = pixels.astype(np.float64) * float(source.get("RescaleSlope", 1) or 1)
    img += float(source.get("RescaleIntercept", 0) or 0)
    if "WindowCenter" in source and "WindowWidth" in source:
        center, width = _first(source.WindowCenter), max(_first(source.WindowWidth), 1.0)
        low, high = center - width / 2.0, center + width / 2.0
    else:
        low, high = np.percentile(img, [1.0, 99.0])
    if high <= low:
        high = low + 1.0
    out = np.clip((img - low) / (high - low), 0.0, 1.0)
    if str(source.PhotometricInterpretation) == "MONOCHROME1":
        out = 1.0 - out
    return np.round(out * 255.0).astype(np.uint8)


def _scale_factor(rows: int, columns: int) -> int:
    return int(min(4, max(1, math.ceil(TARGET_SHORT_SIDE / max(1, min(rows, columns))))))


def _enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of rows and columns (grey or RGB) by ``factor``."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def blend_heatmap(grey: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """RGB uint8: grey image with the heatmap in :data:`COLORMAP`, opacity ~ heat."""
    heat = np.nan_to_num(heatmap.astype(np.float64), nan=0.0).clip(0.0, 1.0)
    colours = colormaps[COLORMAP](heat)[..., :3]
    alpha = (MAX_ALPHA * heat)[..., None]
    base = np.repeat(grey[..., None].astype(np.float64) / 255.0, 3, axis=2)
    return np.round((base * (1 - alpha) + colours * alpha) * 255.0).astype(np.uint8)


def _text_box(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any,
              fill: tuple[int, int, int] = _TEXT) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 4, top - 3, right + 4, bottom + 3), fill=(0, 0, 0))
    draw.text(xy, text, font=font, fill=fill)


def _with_legend(rgb: np.ndarray, legend_height: int = LEGEND_HEIGHT) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    height, width = rgb.shape[:2]
    canvas = Image.new("RGB", (width, height + legend_height), _LEGEND_BG)
    canvas.paste(Image.fromarray(rgb, "RGB"), (0, 0))
    return canvas, ImageDraw.Draw(canvas), height


def _patient_orientation(source: Dataset) -> tuple[str, str]:
    """Row and column direction letters (PS3.3 C.7.6.1.1.1) from Image Orientation (Patient).

    Falls back to the source's own Patient Orientation (projection radiographs),
    else ``("", "")`` for unknown.
    """
    if "ImageOrientationPatient" not in source:
        given = [str(v) for v in (source.get("PatientOrientation") or [])]
        return (given[0], given[1]) if len(given) == 2 else ("", "")

    def letters(vector: Sequence[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))  # +x left, +y posterior, +z head
        parts = []
        for axis in np.argsort(-np.abs(np.asarray(vector, dtype=float))):
            component = float(vector[axis])
            if abs(component) < 0.25:  # ignore small obliquity
                break
            parts.append(names[axis][0] if component > 0 else names[axis][1])
        return "".join(parts[:3])

    iop = [float(v) for v in source.ImageOrientationPatient]
    return (letters(iop[:3]), letters(iop[3:]))


def _source_image_item(source: Dataset, frame: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        item.ReferencedFrameNumber = frame
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"  # PS3.16 CID 7202
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _sc_dataset(
    result: StudyResult,
    source: Dataset,
    rgb: np.ndarray,
    *,
    kind: str,
    index: int,
    factor: int,
    frame: int,
    description: str,
    comment: str,
    manufacturer: str,
    institution: str | None,
    when: tuple[str, str],
) -> Dataset:
    series_uid, sop_uid = output_uids(
        result.study_instance_uid, result.revision, model_versions(result), kind, index
    )
    pixel_spacing = None
    if "PixelSpacing" in source:
        row_mm, col_mm = (float(v) for v in source.PixelSpacing)
        pixel_spacing = (row_mm / factor, col_mm / factor)
    orientation = _patient_orientation(source)
    known = all(orientation)
    date, time = when
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS[kind],
        sop_instance_uid=sop_uid,
        instance_number=index + 1,
        manufacturer=manufacturer,
        pixel_spacing=pixel_spacing,
        # highdicom insists on an orientation for patient images and takes single
        # letters only; the full oblique value (e.g. "PH") and an unknown one (type 2:
        # empty) are set below.
        patient_orientation=(orientation[0][0], orientation[1][0]) if known else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(result, manufacturer, institution, date + time),
        series_description=description,
        institution_name=institution,
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
        specific_character_set=character_set(source),
    )
    sc.PatientOrientation = list(orientation) if known else ""
    # The images Discus analyses show the lumbar spine, an unpaired body part, so
    # General Series Laterality (type 2C, paired parts only) stays absent.
    sc.BodyPartExamined = str(source.get("BodyPartExamined") or "") or "LSPINE"
    stamp_datetime(sc, date, time)
    sc.DateOfSecondaryCapture = date
    sc.TimeOfSecondaryCapture = time
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = comment[:10240]
    sc.DerivationDescription = comment[:1024]
    sc.SourceImageSequence = [_source_image_item(source, frame)]
    return sc


def encode_heatmap_sc(
    finding: Finding,
    source: Dataset,
    result: StudyResult,
    index: int,
    *,
    manufacturer: str = "Discus",
    institution: str | None = None,
) -> Dataset:
    """One Grad-CAM overlay SC for one finding.

    Parameters
    ----------
    finding : Finding
        The finding; its ``heatmap`` must have the source image's Rows x Columns.
    source : pydicom.Dataset
        The image the finding was read on (``finding.image``), with pixels.
    result : StudyResult
        The analysis the finding belongs to (UIDs, models, study).
    index : int
        Position of this SC in the heatmap series (0-based); part of its UID.
    manufacturer, institution : str, optional
        Written into the SC and its Contributing Equipment.

    Returns
    -------
    pydicom.Dataset
        An RGB :class:`highdicom.sc.SCImage` in the study, in the heatmap series.

    Raises
    ------
    EncodingError
        Missing or mis-shaped heatmap, a source without the attributes an SC
        needs, or a source that is not the finding's image (message names the field).
    """
    _check_pixel_source(source, "source")
    if str(source.SOPInstanceUID) != finding.image.sop_instance_uid:
        raise EncodingError(
            f"source.SOPInstanceUID: {source.SOPInstanceUID} is not the finding's image "
            f"{finding.image.sop_instance_uid}"
        )
    if str(source.StudyInstanceUID) != result.study_instance_uid:
        raise EncodingError("source.StudyInstanceUID: not the result's study")
    if finding.heatmap is None:
        raise EncodingError("heatmap: the finding has no heatmap")
    shape = (int(source.Rows), int(source.Columns))
    heatmap = np.asarray(finding.heatmap)
    if heatmap.shape != shape:
        raise EncodingError(
            f"heatmap: shape {heatmap.shape} does not match the source image Rows x Columns {shape}"
        )
    grey = window_image(source, finding.image.frame)
    factor = _scale_factor(*shape)
    # Blending is per pixel and the enlargement repeats pixels, so blending at the source's
    # size and enlarging the result gives the same image for factor**2 less work.
    rgb = _enlarge(blend_heatmap(grey, heatmap.astype(np.float32)), factor)
    canvas, draw, height = _with_legend(rgb)
    width = rgb.shape[1]
    big, small = _font(max(14, width // 28)), _font(max(12, width // 40))

    row, col = (finding.image.row + 0.5) * factor, (finding.image.column + 0.5) * factor
    r = max(6, factor * 4)
    draw.ellipse((col - r, row - r, col + r, row + r), outline=(0, 255, 255), width=2)
    title = f"{finding.level}  {condition_label(finding)}"
    detail = f"{grade_label(finding.grade)}  (p = {finding.probability:.2f})"
    _text_box(draw, (8, 8), title, big)
    _text_box(draw, (8, 8 + big.size + 10), detail, small)

    _text_box(draw, (8, height + 8), HEATMAP_LEGEND, big, fill=(255, 220, 0))
    _text_box(draw, (8, height + 16 + big.size), f"{finding.model} {finding.model_version}", small)
    bar_w, bar_h = min(160, width // 3), 12
    x0, y0 = width - bar_w - 12, height + 14
    ramp = (colormaps[COLORMAP](np.linspace(0, 1, bar_w))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0), "RGB"), (x0, y0))
    draw.text((x0, y0 + bar_h + 4), "low", font=small, fill=_TEXT)
    draw.text((x0 + bar_w - draw.textlength("high", font=small), y0 + bar_h + 4), "high",
              font=small, fill=_TEXT)

    comment = (f"{HEATMAP_LEGEND}. AI-generated Grad-CAM overlay: {title}: {detail}; "
               f"model {finding.model} {finding.model_version}.")
    return _sc_dataset(
        result, source, np.asarray(canvas), kind="heatmap", index=index, factor=factor,
        frame=finding.image.frame, description=HEATMAP_SERIES_DESCRIPTION, comment=comment,
        manufacturer=manufacturer, institution=institution, when=content_datetime([source]),
    )


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width`` pixels in ``font``."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and measure.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    if current:
        lines.append(current)
    return lines


def _key_legend_lines(result: StudyResult, font: Any, width: int) -> list[tuple[str, Any]]:
    """The key image's legend, line by line: title, one line per grade scale, then what to check.

    Nothing is cut: long lines (models, warnings) wrap onto more lines.
    """
    lines: list[tuple[str, Any]] = [("title", KEY_IMAGE_LEGEND)]
    conditions = {f.condition for f in result.findings}
    for name, keys in GRADE_KEYS:
        if name == "Disc" and ConditionValues.DISC in conditions or name == "Stenosis" and conditions - {
                ConditionValues.DISC, ConditionValues.SPINE_XRAY}:
            lines.append(("keys", (name, keys)))
    for w in result.warnings:
        lines += [("warning", t) for t in _wrap(f"CHECK: {w}", font, width)]
    if result.not_run:
        withheld = ", ".join(sorted(result.not_run))
        lines += [("warning", t) for t in _wrap(f"Not reported (reasons in the SR): {withheld}", font, width)]
    if result.measurements:
        lines.append(("measure", "Green lines: measured heights, slip and canal diameter (values in the SR)"))
        abnormal = [f"{c.level} {c.name} {c.value}" for c in result.categories
                    if c.value not in ("0", "normal")]
        if abnormal:
            lines += [("warning", t) for t in _wrap("Measured: " + "; ".join(abnormal), font, width)]
    models = ", ".join(f"{m.name} {m.version}" for m in sorted(result.models, key=lambda m: m.name))
    if models:
        lines += [("models", t) for t in _wrap(f"Models: {models}", font, width)]
    return lines


def worst_grades(result: StudyResult) -> dict[str, Finding]:
    """Per level, the finding with the highest severity (ties: highest probability)."""
    worst: dict[str, Finding] = {}
    for f in sorted(result.findings, key=finding_sort_key):
        if f.condition not in KEY_IMAGE_CONDITIONS:  # the badges show the stenosis and disc scales only
            continue
        best = worst.get(f.level)
        if best is None or (f.severity, f.probability) > (best.severity, best.probability):
            worst[f.level] = f
    return worst


def encode_key_image(
    result: StudyResult,
    mid_sagittal: Dataset,
    *,
    manufacturer: str = "Discus",
    institution: str | None = None,
) -> Dataset:
    """The key image: mid-sagittal slice, every level labelled, worst grade as a badge.

    Levels located on another series than ``mid_sagittal`` are not drawn (their
    row/column mean nothing on this image).

    Raises
    ------
    EncodingError
        If the image lacks pixel attributes, belongs to another study, or no level
        of the result lies on its series.
    """
    _check_pixel_source(mid_sagittal, "mid_sagittal")
    if str(mid_sagittal.StudyInstanceUID) != result.study_instance_uid:
        raise EncodingError("mid_sagittal.StudyInstanceUID: not the result's study")
    series = str(mid_sagittal.SeriesInstanceUID)
    levels = [lv for lv in result.levels if lv.image.series_instance_uid == series]
    if not levels:
        raise EncodingError(f"levels: none of the result's levels lies on series {series}")
    grey = window_image(mid_sagittal)
    factor = _scale_factor(int(mid_sagittal.Rows), int(mid_sagittal.Columns))
    big = _enlarge(grey, factor)
    width = big.shape[1]
    label_font, legend_font = _font(max(13, width // 34)), _font(max(12, width // 42))
    lines = _key_legend_lines(result, legend_font, width - 16)
    line_h = legend_font.size + 8
    canvas, draw, height = _with_legend(np.repeat(big[..., None], 3, axis=2), 8 + line_h * len(lines))
    worst = worst_grades(result)
    here = str(mid_sagittal.SOPInstanceUID)
    for m in result.measurements:  # the lines each number was measured along
        if m.image.sop_instance_uid != here:
            continue
        for (r0, c0), (r1, c1) in zip(m.points[::2], m.points[1::2]):
            draw.line((((c0 + 0.5) * factor, (r0 + 0.5) * factor), ((c1 + 0.5) * factor, (r1 + 0.5) * factor)),
                      fill=MEASUREMENT_COLOUR, width=max(1, factor))
    for lv in sorted(levels, key=lambda lv: LEVELS.index(lv.level)):
        y, x = (lv.image.row + 0.5) * factor, (lv.image.column + 0.5) * factor
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(0, 255, 255))
        finding = worst.get(lv.level)
        text_x = min(x + 14, width - 120)
        if finding is not None:
            colour, letter = SEVERITY_COLOURS[min(finding.severity, 2)], _BADGE.get(finding.grade, "?")
            radius = label_font.size // 2 + 4
            cx, cy = text_x + radius, y
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour,
                         outline=(255, 255, 255))
            draw.text((cx, cy), letter, font=label_font, fill=(0, 0, 0), anchor="mm")
            text_x = cx + radius + 6
        _text_box(draw, (text_x, y - label_font.size / 2 - 1), lv.level, label_font)

    y = height + 6
    for kind, content in lines:
        if kind == "title":
            _text_box(draw, (8, y), str(content), legend_font, fill=(255, 220, 0))
        elif kind == "keys":
            name, keys = content  # type: ignore[misc]
            x = 8
            draw.text((x, y), f"{name}:", font=legend_font, fill=_TEXT)
            x += int(draw.textlength(f"{name}: ", font=legend_font)) + 4
            for i, (_, letter, text) in enumerate(keys):
                rad = legend_font.size // 2 + 2
                draw.ellipse((x, y, x + 2 * rad, y + 2 * rad), fill=SEVERITY_COLOURS[i])
                draw.text((x + rad, y + rad), letter, font=legend_font, fill=(0, 0, 0), anchor="mm")
                draw.text((x + 2 * rad + 4, y), text, font=legend_font, fill=_TEXT)
                x += 2 * rad + 14 + int(draw.textlength(text, font=legend_font))
        elif kind == "warning":
            draw.text((8, y), str(content), font=legend_font, fill=(255, 180, 0))
        elif kind == "measure":
            draw.text((8, y), str(content), font=legend_font, fill=MEASUREMENT_COLOUR)
        else:
            draw.text((8, y), str(content), font=legend_font, fill=(200, 200, 200))
        y += line_h
    graded = ", ".join(f"{lv}: {grade_label(f.grade)}" for lv, f in worst.items())
    comment = f"{KEY_IMAGE_LEGEND}. Levels with worst AI grade: {graded or 'none graded'}."
    return _sc_dataset(
        result, mid_sagittal, np.asarray(canvas), kind="key_image", index=0, factor=factor,
        frame=1, description=KEY_IMAGE_SERIES_DESCRIPTION, comment=comment,
        manufacturer=manufacturer, institution=institution,
        when=content_datetime([mid_sagittal]),
    )


def _mid_sagittal_uid(result: StudyResult, sources: Mapping[str, Dataset]) -> str | None:
    """The image the spine was measured on, else the one most levels were located on (the mid slice)."""
    measured = [m.image.sop_instance_uid for m in result.measurements if m.image.sop_instance_uid in sources]
    if measured and any(lv.image.series_instance_uid == sources[measured[0]].SeriesInstanceUID
                        for lv in result.levels):
        return measured[0]
    counts = Counter(lv.image.sop_instance_uid for lv in result.levels
                     if lv.image.sop_instance_uid in sources)
    if not counts:
        return None
    top = max(counts.values())
    return min(uid for uid, n in counts.items() if n == top)


def _plan(result: StudyResult, sources: Mapping[str, Dataset],
          min_severity: int) -> tuple[list[Finding], str | None]:
    """The findings that get a heatmap SC, and the key image's source (None: no key image)."""
    for uid, ds in sources.items():
        if str(ds.get("SOPInstanceUID", "")) != uid:
            raise EncodingError(f"sources[{uid!r}]: keyed by a UID that is not its SOPInstanceUID")
    if result.status is StatusValues.NOT_PERFORMED:
        return [], None
    findings = [f for f in sorted(result.findings, key=finding_sort_key)
                if f.heatmap is not None and f.severity >= min_severity]
    return findings, _mid_sagittal_uid(result, sources)


def _segmentation_sources(result: StudyResult, sources: Mapping[str, Dataset]) -> list[Dataset] | None:
    """The images of the segmented series when the result has masks for a SEG (else None)."""
    seg = result.segmentation
    if result.status is StatusValues.NOT_PERFORMED or seg is None or not seg.masks:
        return None
    if not all(uid in sources for uid in seg.masks):
        return None
    return [ds for _, ds in sorted(sources.items()) if str(ds.SeriesInstanceUID) == seg.series_instance_uid]


def encode_segmentation(result: StudyResult, series: Sequence[Dataset], *, manufacturer: str = "Discus",
                        institution: str | None = None) -> Dataset:
    """The DICOM Segmentation of the result's masks (vertebral bodies, discs, canal), in its own series.

    Raises
    ------
    EncodingError
        If the result has no masks or the segmentation model is not among its models.
    """
    from dicom_io.seg import build_segmentation

    seg = result.segmentation
    if seg is None:
        raise EncodingError("segmentation: the result has no masks")
    model = next((m for m in result.models if m.name == seg.model and m.version == seg.model_version), None)
    if model is None:
        raise EncodingError(f"segmentation.model: {seg.model} {seg.model_version} is not among the result's models")
    series_uid, sop_uid = output_uids(result.study_instance_uid, result.revision, model_versions(result), "seg")
    return build_segmentation(series, seg.masks, seg.labels, model=model, series_instance_uid=series_uid,
                              sop_instance_uid=sop_uid, series_number=SERIES_NUMBERS["seg"],
                              instance_number=result.revision, manufacturer=manufacturer, institution=institution)


def count_outputs(result: StudyResult, sources: Mapping[str, Dataset], *, min_severity: int = 0) -> int:
    """How many objects :func:`iter_outputs` (and :func:`encode_all`) make for these arguments."""
    findings, mid = _plan(result, sources, min_severity)
    return 1 + len(findings) + (mid is not None) + (_segmentation_sources(result, sources) is not None)


def iter_outputs(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    predecessor: Dataset | None = None,
    *,
    manufacturer: str = "Discus",
    institution: str | None = None,
    min_severity: int = 0,
) -> Iterator[Dataset]:
    """:func:`encode_all`, one object at a time: each is yielded as soon as it is encoded.

    A caller can send the SR on its way while the heatmaps are still being made.
    """
    findings, mid = _plan(result, sources, min_severity)
    ordered = [sources[k] for k in sorted(sources)]
    kwargs: dict[str, Any] = {"manufacturer": manufacturer, "institution": institution}
    if result.status is StatusValues.NOT_PERFORMED:
        yield encode_not_performed_sr(result, ordered, predecessor=predecessor, **kwargs)
        return
    yield encode_sr(result, ordered, predecessor=predecessor, **kwargs)
    seg_sources = _segmentation_sources(result, sources)
    if seg_sources is not None:
        yield encode_segmentation(result, seg_sources, **kwargs)
    for i, f in enumerate(findings):
        yield encode_heatmap_sc(f, sources[f.image.sop_instance_uid], result, i, **kwargs)
    if mid is not None:
        yield encode_key_image(result, sources[mid], **kwargs)


def encode_all(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    predecessor: Dataset | None = None,
    *,
    manufacturer: str = "Discus",
    institution: str | None = None,
    min_severity: int = 0,
) -> list[Dataset]:
    """Every output object of a result: SR, one heatmap SC per finding, the key image.

    Parameters
    ----------
    result : StudyResult
        The analysis. ``not_performed`` gives only the "not performed" SR.
    sources : mapping of str to pydicom.Dataset
        Source datasets by SOP Instance UID (pixels needed for SC images).
    predecessor : pydicom.Dataset, optional
        The previous revision's SR.
    manufacturer, institution : str, optional
        Written into every object.
    min_severity : int, optional
        Heatmaps only for findings of at least this severity (0 = every finding
        with a heatmap; 1 = only findings above normal).

    Returns
    -------
    list of pydicom.Dataset
        SR first, then heatmaps in SR order, then the key image (when levels exist);
        :func:`count_outputs` of them.

    Raises
    ------
    EncodingError
        On bad input (see the encoders).
    """
    return list(iter_outputs(result, sources, predecessor, manufacturer=manufacturer,
                             institution=institution, min_severity=min_severity))


def to_png(ds: Dataset, path: Any) -> None:
    """Write an RGB SC's pixels as a PNG (docs, tests, quick looks)."""
    Image.fromarray(ds.pixel_array.astype(np.uint8), "RGB").save(path, optimize=True)
