"""Exception types. Each message says what went wrong and what to do about it."""


class MedaeError(Exception):
    """Base class for every error medae raises on purpose."""


class ConfigError(MedaeError):
    """A configuration file or option is invalid."""


class DataError(MedaeError):
    """A data folder cannot be used (for example: no usable image in it)."""


class NoUsableImagesError(DataError):
    """A folder holds no image that can be read."""


class BundleError(MedaeError):
    """A model bundle is missing, incomplete or from an incompatible version."""


class PrivacyError(MedaeError):
    """Base class for privacy accounting errors."""


class BudgetExceededError(PrivacyError):
    """Training would spend more privacy budget than the site allows."""


class LedgerError(PrivacyError):
    """A privacy ledger is missing, corrupted or inconsistent."""


class SitePolicyError(PrivacyError):
    """A run asks a site for something its own policy forbids (e.g. training without DP)."""
