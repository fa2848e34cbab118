"""Scan data folders into arrays, apply the site layout, split by patient.

About 500 lines: the scan, the layout and labels.csv rules, and the patient split are one
path from a folder to arrays, and the skip reasons travel along all of it.

A `Scan` is everything one folder gave: the images at model size, where each
came from, which patient it belongs to, and every file that was left out with
the reason. Nothing is ever written into the scanned folder.

Site layout (README: A site's data folder)::

    SITE/train/            healthy training images
    SITE/test/             optional evaluation images
    SITE/test/labels.csv   optional: path,label[,mask] relative to test/

If ``train/`` is absent the whole site folder except ``test/`` is training data.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from medae_core.config import DataConfig
from medae_core.data import cache as image_cache
from medae_core.data.readers import MIB, Slice, UnusableFile, file_format, read_file, read_mask, to_square
from medae_core.errors import ConfigError, DataError, NoUsableImagesError
from medae_core.fileio import ensure_outside

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
LABELS_FILE = "labels.csv"
LABEL_COLUMNS = ("path", "label", "mask")
IN_LABELS = "listed in labels.csv but unusable"
PARALLEL_MIN_FILES = 300  # fewer files are read in this process (see `_read_many`)
MAX_WORKERS = 8


@dataclass
class ImageEntry:
    path: str  # relative to the scanned root, POSIX style
    frame: int | None  # frame / slice / page index; None for single images
    patient: str
    format: str = ""  # "dicom", "nifti" or "raster"
    modality: str = ""  # DICOM Modality; "" for other formats
    photometric: str = ""  # DICOM PhotometricInterpretation; "" for other formats
    contrast: str = ""  # one of data.contrasts (see `contrast_of`); "" when the run reads every image
    position: float | None = None  # DICOM slice position along its normal (mm), for pairing series


@dataclass
class Skipped:
    path: str  # relative to the scanned root, POSIX style
    reason: str


@dataclass
class Scan:
    root: Path
    images: np.ndarray  # [N, S, S] float32 in [0, 1]
    entries: list[ImageEntry]
    skipped: list[Skipped]
    labels: np.ndarray | None  # int8 [N]: 1 anomalous, 0 healthy, -1 unknown; None without labels.csv
    masks: np.ndarray | None  # bool [N, S, S]; all-False where no mask given; None if no mask at all
    has_mask: np.ndarray | None  # bool [N]
    # int64 [N]: each image's contrast as its position in data.contrasts (a CVAE's label
    # index); None when the run reads every image (data.contrasts empty)
    contrast_index: np.ndarray | None = None

    @property
    def patients(self) -> list[str]:
        """Sorted unique patient keys."""
        return sorted({e.patient for e in self.entries})

    @property
    def patient_index(self) -> np.ndarray:
        """int [N]: position of each image's patient in `patients`."""
        position = {p: i for i, p in enumerate(self.patients)}
        return np.array([position[e.patient] for e in self.entries], dtype=np.int64)

    def skipped_by_reason(self) -> dict[str, int]:
        return count_reasons(self.skipped)

    def input_kinds(self) -> dict[str, list[str]]:
        """What kinds of image the scan holds: file formats, DICOM modalities and photometric interpretations.

        Categories only (no counts, no values from the pixels): a bundle keeps them so that `medae score`
        can say when its input is of another kind (`input_warnings`).
        """
        return {
            "format": sorted({e.format for e in self.entries if e.format}),
            "modality": sorted({e.modality for e in self.entries if e.modality}),
            "photometric": sorted({e.photometric for e in self.entries if e.photometric}),
        }


@dataclass
class Site:
    root: Path
    train: Scan
    test: Scan | None


@dataclass(frozen=True)
class LabelRow:
    label: int
    mask: str | None  # relative to the scanned root
    line: int


def count_reasons(skipped: Iterable[Skipped]) -> dict[str, int]:
    """Skip reasons grouped on the part before the first ': ', most frequent first."""
    counts = Counter(s.reason.split(": ", 1)[0] for s in skipped)
    return dict(counts.most_common())


# -- listing ---------------------------------------------------------------------
def list_files(root: Path, exclude: Iterable[str] = ()) -> tuple[list[str], list[Skipped]]:
    """Relative POSIX paths of all files under ``root``, sorted, plus folders left out.

    Symbolic links are followed (read-only); each real folder is visited once,
    so link cycles end. Hidden folders (``.git``, ``.cache``) are not entered.
    """
    files, skipped, seen = [], [], set()
    excluded = {root / e for e in exclude}

    def unreadable(err: OSError) -> None:
        skipped.append(Skipped(_rel(Path(err.filename or root), root) + "/", "folder not readable"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if here in excluded or real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        for name in [d for d in dirnames if d.startswith(".")]:
            skipped.append(Skipped(_rel(here / name, root) + "/", "hidden folder, not scanned"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(_rel(here / f, root) for f in filenames)
    return sorted(files), skipped


def _rel(path: Path, root: Path) -> str:
    return PurePosixPath(*path.relative_to(root).parts).as_posix()


# -- labels.csv ------------------------------------------------------------------
def read_labels(csv_path: Path, root: Path) -> dict[str, LabelRow]:
    """Parse ``labels.csv`` (``path,label[,mask]``) into rows keyed by path relative to ``root``.

    Paths in the file are relative to the folder holding it. Any malformed
    header or row raises DataError naming the file and line.
    """
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            lines = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot be read as CSV ({exc})") from None
    header = [h.strip().lower() for h in lines[0]] if lines else []
    if header not in (list(LABEL_COLUMNS[:2]), list(LABEL_COLUMNS)):
        found = ",".join(header)
        raise DataError(f"{csv_path}, line 1: header must be 'path,label' or 'path,label,mask'; found {found!r}")
    rows: dict[str, LabelRow] = {}
    for number, values in enumerate(lines[1:], start=2):
        if not any(v.strip() for v in values):
            continue
        path, row = _label_row(values, len(header), csv_path, root, number)
        if path in rows:
            raise DataError(f"{csv_path}, line {number}: {path!r} is listed twice (first on line {rows[path].line})")
        rows[path] = row
    return rows


def _label_row(values: list[str], width: int, csv_path: Path, root: Path, number: int) -> tuple[str, LabelRow]:
    where = f"{csv_path}, line {number}"
    values = [v.strip() for v in values] + [""] * (width - len(values))
    if len(values) > width:
        raise DataError(f"{where}: expected {width} columns, found {len(values)}")
    if values[1] not in ("0", "1"):
        raise DataError(f"{where}: label must be 0 (healthy) or 1 (anomalous); found {values[1]!r}")
    path = _label_path(values[0], csv_path, root, where)
    mask = _label_path(values[2], csv_path, root, where) if width == 3 and values[2] else None
    return path, LabelRow(int(values[1]), mask, number)


def _label_path(value: str, csv_path: Path, root: Path, where: str) -> str:
    """A path from labels.csv as a POSIX path relative to ``root``; must stay inside it."""
    if not value:
        raise DataError(f"{where}: empty path")
    relative = PurePosixPath(value.replace("\\", "/"))
    full = Path(os.path.normpath(csv_path.parent / relative))
    if relative.is_absolute() or not full.is_relative_to(root):
        raise DataError(f"{where}: {value!r} must be a path inside {csv_path.parent}")
    return _rel(full, root)


# -- scanning --------------------------------------------------------------------
def scan_folder(
    root: str | Path,
    data: DataConfig,
    image_size: int,
    *,
    labels_csv: Path | None = None,
    exclude: Iterable[str] = (),
    progress: Progress | None = None,
) -> Scan:
    """Read every file under ``root`` (sorted, so the result is deterministic).

    ``labels_csv`` attaches labels and masks (see `read_labels`); the CSV and
    the masks it names are not images. ``exclude`` names subfolders to leave out.
    Unusable files end up in ``Scan.skipped``; only a malformed labels.csv
    (DataError) or an invalid intensity setting (ConfigError) raise.
    ``progress(done, total)`` is called after each file.
    """
    root = Path(os.path.normpath(Path(root).absolute()))
    labels_csv = None if labels_csv is None else Path(os.path.normpath(Path(labels_csv).absolute()))
    check_cache_location(data, root)
    files, skipped = list_files(root, exclude)
    return _scan_files(root, files, skipped, data, image_size, labels_csv, progress)


def _scan_files(
    root: Path,
    files: list[str],
    skipped: list[Skipped],
    data: DataConfig,
    image_size: int,
    labels_csv: Path | None,
    progress: Progress | None,
) -> Scan:
    labels = read_labels(labels_csv, root) if labels_csv is not None else None
    owned = _owned_files(root, labels_csv, labels)
    builder = _ScanBuilder(root, data, image_size, labels)
    results = _read_many(root, [rel for rel in files if rel not in owned], data, image_size)
    for done, rel in enumerate(files, start=1):
        if rel not in owned:
            builder.add(rel, next(results))
        if progress is not None:
            progress(done, len(files))
    builder.add_missing_labelled(set(files))
    return builder.build(skipped)


@dataclass
class _FileRead:
    """One file's outcome, small enough to send back from a worker process."""

    reason: str | None = None  # why the file is unusable; None when it gave slices
    slices: list[Slice] = field(default_factory=list)  # images already at model size
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # each slice's size in the file
    format: str = ""


def _read_sized(path: Path, rel: str, data: DataConfig, size: int, cache_root: Path | None = None,
                key: str | None = None) -> _FileRead:
    """One file at model size, decoded; kept in the image cache under ``key`` when one is given."""
    try:
        slices = read_checked(path, rel, data)
        result = _FileRead(
            slices=[replace(s, image=to_square(s.image, size)) for s in slices],
            shapes=[s.image.shape for s in slices],
            format=file_format(path),
        )
    except UnusableFile as exc:
        result = _FileRead(reason=exc.reason)
    if cache_root is not None and key is not None:
        image_cache.store(cache_root, key, *_to_cache(result, size))
    return result


def _to_cache(result: _FileRead, size: int) -> tuple[np.ndarray, dict]:
    """A file's outcome as the image cache stores it: its slices' pixels, and everything else as JSON."""
    images = np.stack([s.image for s in result.slices]) if result.slices else np.zeros((0, size, size), np.float32)
    meta = {"reason": result.reason, "format": result.format, "shapes": [list(x) for x in result.shapes],
            "slices": [{"frame": s.frame, "patient": s.patient, "modality": s.modality,
                        "photometric": s.photometric, "series": s.series, "position": s.position}
                       for s in result.slices]}
    return images, meta


def _from_cache(images: np.ndarray, meta: dict) -> _FileRead:
    return _FileRead(
        reason=meta["reason"],
        slices=[Slice(image=image, **s) for image, s in zip(images, meta["slices"], strict=True)],
        shapes=[tuple(x) for x in meta["shapes"]],
        format=meta["format"],
    )


def _read_many(root: Path, rels: list[str], data: DataConfig, size: int) -> Iterator[_FileRead]:
    """Read files in order: from the image cache here, the rest decoded, in worker processes when many.

    pydicom parses a few ms per file, so thousands of files take one core tens
    of seconds. Workers are spawned (not forked: the caller may hold torch
    threads) and cost about a second to start, hence only for many files to
    decode. Cache hits (a hash and one read each) are cheaper than sending them
    to a worker, so they never go there.
    """
    cache_root = image_cache.cache_dir() if data.cache else None  # its location checked by the caller
    hits: dict[int, _FileRead] = {}
    keys: list[str | None] = [None] * len(rels)
    if cache_root is not None:
        prep = image_cache.preprocessing_key(data, size)
        for i, rel in enumerate(rels):
            keys[i] = image_cache.file_key(root / rel, rel, prep, data.max_image_mb * MIB)
            cached = image_cache.load(cache_root, keys[i]) if keys[i] is not None else None
            if cached is not None:
                hits[i] = _from_cache(*cached)
    args = [(root / rel, rel, data, size, cache_root, keys[i]) for i, rel in enumerate(rels) if i not in hits]
    decoded = _decode_many(args)
    return (hits.pop(i) if i in hits else next(decoded) for i in range(len(rels)))


def _decode_many(args: list[tuple]) -> Iterator[_FileRead]:
    workers = min(usable_cpus(), MAX_WORKERS)
    if len(args) < PARALLEL_MIN_FILES or workers < 2:
        return (_read_sized(*a) for a in args)
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    except (OSError, NotImplementedError) as exc:
        log.debug("reading without worker processes: %s", exc)
        return (_read_sized(*a) for a in args)
    return _pooled(pool, args)


def _pooled(pool: ProcessPoolExecutor, args: list[tuple]) -> Iterator[_FileRead]:
    try:
        yield from pool.map(_read_sized, *zip(*args), chunksize=16)
    finally:  # on an error (e.g. a ConfigError from a worker) do not read the rest
        pool.shutdown(cancel_futures=True)


def check_cache_location(data: DataConfig, data_root: Path) -> None:
    """With ``data.cache``, the image cache may not be in (or hold) the data folder: nothing is written into one."""
    if not data.cache:
        return
    cache_root = image_cache.cache_dir()
    try:
        ensure_outside(cache_root, data_root)
        ensure_outside(data_root, cache_root)
    except DataError:
        raise ConfigError(
            f"data.cache: the image cache {cache_root} is inside the data folder {data_root} (or holds it); medae "
            f"never writes into a data folder. Set {image_cache.CACHE_ENV} to a folder outside it."
        ) from None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _owned_files(root: Path, labels_csv: Path | None, labels: dict[str, LabelRow] | None) -> set[str]:
    """Files that belong to the layout: labels.csv itself and the masks it names."""
    if labels_csv is None or labels is None:
        return set()
    owned = {row.mask for row in labels.values() if row.mask}
    if labels_csv.absolute().is_relative_to(root):
        owned.add(_rel(labels_csv.absolute(), root))
    return owned


class _ScanBuilder:
    """Collects slices, entries, labels and masks while files are read."""

    def __init__(self, root: Path, data: DataConfig, image_size: int, labels: dict[str, LabelRow] | None):
        self.root, self.data, self.size, self.labels = root, data, image_size, labels
        self.images: list[np.ndarray] = []
        self.entries: list[ImageEntry] = []
        self.label_values: list[int] = []
        self.masks: list[np.ndarray | None] = []
        self.skipped: list[Skipped] = []

    def add(self, rel: str, read: _FileRead) -> None:
        row = self.labels.get(rel) if self.labels else None
        if read.reason is not None:
            self.skipped.append(Skipped(rel, f"{IN_LABELS}: {read.reason}" if row else read.reason))
            return
        contrast = ""
        if self.data.contrasts:
            try:
                contrast = contrast_of(read.slices[0].series, rel, self.data)
            except UnusableFile as exc:
                self.skipped.append(Skipped(rel, f"{IN_LABELS}: {exc.reason}" if row else exc.reason))
                return
        masks = self._masks_for(row, read) if row and row.mask else None
        for i, s in enumerate(read.slices):
            self.images.append(s.image)
            self.entries.append(ImageEntry(rel, s.frame, s.patient, read.format, s.modality, s.photometric,
                                           contrast, s.position))
            self.label_values.append(row.label if row else -1)
            self.masks.append(to_square(masks[i], self.size) if masks else None)

    def _masks_for(self, row: LabelRow, read: _FileRead) -> list[np.ndarray] | None:
        """The mask frame for each slice, or None (and a skip entry) when unusable.

        A mask file that does not exist is reported by `add_missing_labelled`.
        """
        if not (self.root / row.mask).is_file():
            return None
        try:
            frames = read_mask(self.root / row.mask, self.data)
            if any((s.frame or 0) >= len(frames) for s in read.slices):
                raise UnusableFile(f"mask has {len(frames)} frame(s), fewer than the image")
            masks = [frames[s.frame or 0] for s in read.slices]
            for m, shape in zip(masks, read.shapes):
                if m.shape != shape:
                    raise UnusableFile(f"mask size {m.shape} differs from image size {shape}")
        except UnusableFile as exc:
            self.skipped.append(Skipped(row.mask, f"{IN_LABELS}: mask: {exc.reason}"))
            return None
        return masks

    def add_missing_labelled(self, present: set[str]) -> None:
        for path, row in (self.labels or {}).items():
            if path not in present:
                self.skipped.append(Skipped(path, f"{IN_LABELS}: file not found (line {row.line})"))
            if row.mask and row.mask not in present:
                self.skipped.append(Skipped(row.mask, f"{IN_LABELS}: mask file not found (line {row.line})"))

    def build(self, listing_skips: list[Skipped]) -> Scan:
        n, s = len(self.images), self.size
        images = np.stack(self.images) if n else np.zeros((0, s, s), np.float32)
        labels = np.array(self.label_values, dtype=np.int8) if self.labels is not None else None
        masks = has_mask = None
        if any(m is not None for m in self.masks):
            has_mask = np.array([m is not None for m in self.masks], dtype=bool)
            masks = np.stack([m if m is not None else np.zeros((s, s), bool) for m in self.masks])
        skipped = sorted(listing_skips + self.skipped, key=lambda k: k.path)
        contrast_index = None
        if self.data.contrasts:
            position = {c: i for i, c in enumerate(self.data.contrasts)}
            contrast_index = np.array([position[e.contrast] for e in self.entries], dtype=np.int64)
        return Scan(self.root, images, self.entries, skipped, labels, masks, has_mask, contrast_index)


def contrast_of(series: str, rel: str, data: DataConfig) -> str:
    """The image's contrast, one of ``data.contrasts``; `UnusableFile` when it has another or none.

    The first that applies: a ``data.contrast_map`` entry ``"TEXT=label"`` whose TEXT is in
    the DICOM SeriesDescription (case-insensitive); a label that is a word of the
    SeriesDescription ("AX T2 FSE" is t2; of several, the longest: "AX T2 FLAIR" is flair);
    a label that names one of the file's folders (``P001/flair/001.dcm`` is flair).
    """
    wanted = data.contrasts
    text = series.lower()
    words = set(re.split(r"[^a-z0-9]+", text))
    found = next((label.strip() for entry in data.contrast_map
                  for pattern, _, label in [entry.rpartition("=")] if pattern.strip().lower() in text), None)
    if found is None:  # of several, the longest is the most specific: "AX T2 FLAIR" is FLAIR
        found = max((c for c in wanted if c in words), key=len, default=None)
    if found is None:
        folders = [part.lower() for part in PurePosixPath(rel).parts[:-1]]
        found = next((c for c in wanted if c in folders), None)
    if found is None:
        shown = f"SeriesDescription {series!r}" if series else "no SeriesDescription"
        raise UnusableFile(f"no contrast label: {shown} and its folders name none of {', '.join(wanted)} "
                           "(map it with data.contrast_map)")
    if found not in wanted:
        raise UnusableFile(f"contrast {found} is not read by this run (data.contrasts = {', '.join(wanted)})")
    return found


def read_checked(path: Path, rel: str, data: DataConfig) -> list[Slice]:
    """`read_file` for plain files only; links that lead nowhere, FIFOs or empty files are reasons."""
    if not path.exists():
        raise UnusableFile("broken link" if path.is_symlink() else "file vanished during the scan")
    if not path.is_file():
        raise UnusableFile("not a regular file")
    if path.stat().st_size == 0:
        raise UnusableFile("empty file")
    try:
        return read_file(path, rel, data)
    except (UnusableFile, ConfigError):
        raise
    except PermissionError:
        raise UnusableFile("file not readable (permission denied)") from None
    except Exception as exc:  # a reader bug or an exotic file must not stop the scan
        log.warning("%s: unexpected error while reading", rel, exc_info=True)
        raise UnusableFile(f"unexpected error: {type(exc).__name__}: {exc}") from None


# -- site layout -----------------------------------------------------------------
def load_site(root: str | Path, data: DataConfig, image_size: int, progress: Progress | None = None, *,
              with_test: bool = True) -> Site:
    """Scan a site folder (train/ and optional test/); raise if training has no usable image.

    ``with_test=False`` leaves test/ unread (``Site.test`` is None), for work that only
    trains; test/ is still kept out of the training images when the site has no train/.
    """
    site = _read_site(Path(root), data, image_size, progress, with_test)
    if len(site.train.entries) == 0:
        raise NoUsableImagesError(_no_images_message(site.train))
    return site


def site_folders(root: str | Path) -> list[Path]:
    """The site folders of a federation root (one subfolder per site), sorted by name.

    The single rule for simulation and the ClientApp alike: node partition k is
    folder k. Hidden folders (``.ipynb_checkpoints``) are not sites, and a root
    that is itself one site's folder (it holds ``train/`` or ``test/``) is an
    error rather than two sites called "train" and "test".
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"federation data folder {root} does not exist or is not a folder")
    sites = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    layout = [p.name for p in sites if p.name in ("train", "test")]
    if layout:
        raise DataError(
            f"{root} looks like one site's folder (it holds {' and '.join(f'{n}/' for n in layout)}), not a "
            "federation root; a federation root holds one folder per site, e.g. ROOT/site-a/train, ROOT/site-b/train"
        )
    if not sites:
        raise DataError(f"{root} has no site subfolders; a federation root holds one folder per site")
    return sites


def _read_site(root: Path, data: DataConfig, image_size: int, progress: Progress | None,
               with_test: bool = True) -> Site:
    """Both parts of a site (test/ only ``with_test``), listed first so that progress counts over all files."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    root = Path(os.path.normpath(root.absolute()))
    check_cache_location(data, root)  # the site folder, train/ and test/ included
    train_dir, test_dir = root / "train", root / "test"
    has_test = test_dir.is_dir()
    if train_dir.is_dir():
        _warn_ignored(root)
        train_root, train_listing = train_dir, list_files(train_dir)
    else:
        train_root, train_listing = root, list_files(root, exclude=["test"] if has_test else [])
    read_test = has_test and with_test
    test_listing = list_files(test_dir) if read_test else ([], [])
    total = len(train_listing[0]) + len(test_listing[0])
    train = _scan_files(train_root, *train_listing, data, image_size, None, _offset(progress, 0, total))
    test = None
    if read_test:
        labels = test_dir / LABELS_FILE
        labels_csv = labels if labels.is_file() else None
        test_progress = _offset(progress, len(train_listing[0]), total)
        test = _scan_files(test_dir, *test_listing, data, image_size, labels_csv, test_progress)
    return Site(root, train, test)


def _offset(progress: Progress | None, offset: int, total: int) -> Progress | None:
    if progress is None:
        return None
    return lambda done, _: progress(offset + done, total)


def _warn_ignored(root: Path) -> None:
    ignored = sorted(p.name for p in root.iterdir() if p.name not in ("train", "test") and not p.name.startswith("."))
    if ignored:
        log.warning("%s has a train/ folder; these entries beside it are not used: %s", root, ", ".join(ignored))


def _no_images_message(scan: Scan) -> str:
    if not scan.skipped:
        return f"No usable image in {scan.root}: the folder holds no files."
    reasons = "; ".join(f"{reason} ({n})" for reason, n in list(scan.skipped_by_reason().items())[:3])
    return (
        f"No usable image in {scan.root}: all {len(scan.skipped)} file(s) were skipped. "
        f"Most common reasons: {reasons}. Run `medae check-data {scan.root}` for the full list."
    )


# -- splitting ---------------------------------------------------------------------
def input_warnings(trained: dict | None, found: dict) -> list[str]:
    """Why an input looks unlike what a model was trained on (DICOM modality, photometric interpretation)."""
    if not trained:
        return []
    out = []
    for key, what in (("modality", "modality"), ("photometric", "photometric interpretation")):
        known, seen = set(trained.get(key) or ()), set(found.get(key) or ())
        if known and seen - known:
            out.append(f"the input holds {what} {', '.join(sorted(seen - known))}; the model was trained on "
                       f"{', '.join(sorted(known))}: its scores there mean little")
    return out


def split_patients(scan: Scan, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image indices (train, validation), split by patient so no patient is on both sides.

    With two or more patients at least one (and at most all but one) is held
    out; the same seed and scan always give the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1); got {val_fraction}")
    n = len(scan.patients)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 else 0
    if n < 2:
        log.warning("%s has %d patient(s); no validation split is possible", scan.root, n)
    val_patients = np.random.default_rng(seed).permutation(n)[:n_val]
    is_val = np.isin(scan.patient_index, val_patients)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# -- check-data --------------------------------------------------------------------
def check_data(root: str | Path, data: DataConfig, image_size: int = 64, progress: Progress | None = None) -> dict:
    """What `medae check-data` reports: usable images, patients and every skipped file.

    JSON-ready. Skipped paths are relative to ``root``. Does not raise when
    nothing is usable (``usable_images`` is then 0); raises DataError only for
    a missing folder or a malformed labels.csv.
    """
    root = Path(root)
    site = _read_site(root, data, image_size, progress)
    is_site = (site.root / "train").is_dir() or (site.root / "test").is_dir()
    parts = {"train": site.train} | ({"test": site.test} if site.test is not None else {})
    skipped = [
        {"path": _under(_rel(scan.root, site.root), s.path), "reason": s.reason}
        for scan in parts.values()
        for s in scan.skipped
    ]
    entries = [e for scan in parts.values() for e in scan.entries]
    return {
        "root": str(site.root),
        "layout": "site" if is_site else "flat",
        "usable_images": len(entries),
        "patients": len({p for scan in parts.values() for p in scan.patients}),
        "by_format": _by_format(entries),
        **({"by_contrast": dict(sorted(Counter(e.contrast for e in entries).items()))} if data.contrasts else {}),
        "skipped_by_reason": count_reasons(Skipped(**s) for s in skipped),
        "skipped": skipped,
        "parts": {name: _part_summary(scan) for name, scan in parts.items()},
    }


def _under(folder: str, path: str) -> str:
    return path if folder in ("", ".") else f"{folder}/{path}"


def _by_format(entries: list[ImageEntry]) -> dict[str, int]:
    """Usable images per format ("dicom", "nifti", "raster")."""
    return dict(sorted(Counter(e.format for e in entries).items()))


def _part_summary(scan: Scan) -> dict[str, int]:
    summary = {
        "usable_images": len(scan.entries),
        "patients": len(scan.patients),
        "files_skipped": len(scan.skipped),
    }
    if scan.labels is not None:
        summary |= {
            "anomalous": int((scan.labels == 1).sum()),
            "healthy": int((scan.labels == 0).sum()),
            "unlabelled": int((scan.labels == -1).sum()),
            "with_mask": int(scan.has_mask.sum()) if scan.has_mask is not None else 0,
        }
    return summary
