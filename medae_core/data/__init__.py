"""Reading medical images (DICOM, NIfTI, PNG/JPEG) into normalised arrays, by site and patient."""

from medae_core.data.dataset import (
    ImageEntry,
    Scan,
    Site,
    Skipped,
    check_data,
    count_reasons,
    input_warnings,
    list_files,
    load_site,
    read_checked,
    read_labels,
    scan_folder,
    site_folders,
    split_patients,
)
from medae_core.data.readers import Slice, UnusableFile, file_format, read_file, read_mask, to_square

__all__ = [
    "ImageEntry",
    "Scan",
    "Site",
    "Skipped",
    "Slice",
    "UnusableFile",
    "check_data",
    "count_reasons",
    "input_warnings",
    "list_files",
    "file_format",
    "load_site",
    "read_checked",
    "read_file",
    "read_labels",
    "read_mask",
    "scan_folder",
    "site_folders",
    "split_patients",
    "to_square",
]
