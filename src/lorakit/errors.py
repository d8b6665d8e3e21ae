"""Every error lorakit raises on purpose derives from :class:`LorakitError`.

Each subclass names one kind of mistake, so callers can catch exactly what they
can handle; every message names the thing at fault and says what would fix it.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of all lorakit errors."""


class ConfigError(LorakitError, ValueError):
    """A LoraConfig (or a CLI option that builds one) has an invalid value."""


class UnsupportedFeatureError(ConfigError):
    """An adapter file uses a PEFT feature (a LoRA variant, an initialisation, ...) lorakit does not implement."""


class TargetError(LorakitError, ValueError):
    """target_modules / exclude_modules do not fit the model (e.g. an entry matches nothing)."""


class AdapterNameError(LorakitError, KeyError):
    """An adapter name is unknown, or already taken."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else ""


class MergeError(LorakitError, RuntimeError):
    """Merging or unmerging cannot proceed (e.g. the merged weight would not be finite)."""


class AdapterFileError(LorakitError, OSError):
    """An adapter directory or file is missing, unreadable, corrupt or in an unsupported format."""


class AdapterMismatchError(LorakitError, ValueError):
    """An adapter's contents do not fit the model: keys, shapes, or base-model fingerprint."""


class UnsupportedModuleError(LorakitError, TypeError):
    """A targeted module is of a type lorakit cannot adapt."""


class SegmentError(LorakitError, ValueError):
    """The tensors handed to a segmented (mixed-adapter) LoRA op do not fit together."""


class QuantizationError(LorakitError, ValueError):
    """A model, checkpoint or option cannot be quantised or loaded as asked."""


class LorakitWarning(UserWarning):
    """Base class of the warnings lorakit emits."""


class PlainLoraVariantWarning(LorakitWarning):
    """An adapter uses a PEFT LoRA variant that changes only training (VeLoRA, MonteCLoRA): lorakit computes
    its outputs exactly but trains it as plain LoRA."""
