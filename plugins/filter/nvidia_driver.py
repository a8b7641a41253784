"""Filters of the nvidia_driver role: read what mokutil printed.

A kernel with Secure Boot enforced refuses a kernel module whose signing key is
not enrolled, and the driver then fails to load with no error at install time.
These pure functions turn mokutil's text into a decision the role can act on.
"""

from __future__ import annotations

# `mokutil --sb-state` results.
ENFORCED = "enabled"  # the kernel will refuse modules signed with an unknown key
DISABLED = "disabled"
VALIDATION_DISABLED = "validation-disabled"  # shim does not validate: modules load unsigned
NO_EFI = "no-efi"  # legacy BIOS boot, or a container without efivarfs
UNKNOWN = "unknown"

# `mokutil --test-key FILE` results.
ENROLLED = "enrolled"
PENDING = "pending"  # imported, waits for a reboot and a confirmation at the console
NOT_ENROLLED = "not-enrolled"


def secure_boot_state(output: str) -> str:
    """State from `mokutil --sb-state` stdout+stderr (its exit code says little)."""
    text = output.strip()
    if "SecureBoot validation is disabled in shim" in text:
        return VALIDATION_DISABLED
    if "SecureBoot enabled" in text:
        return ENFORCED
    if "SecureBoot disabled" in text:
        return DISABLED
    if (
        "EFI variables are not supported on this system" in text
        or "doesn't support Secure Boot" in text
        or "Failed to read SecureBoot" in text
    ):
        return NO_EFI
    return UNKNOWN


def mok_key_state(output: str) -> str:
    """State from `mokutil --test-key FILE` stdout+stderr."""
    text = output.strip()
    if "already in the enrollment request" in text:
        return PENDING
    if "is already enrolled" in text:
        return ENROLLED
    return NOT_ENROLLED


class FilterModule:
    """nvidia_driver_secure_boot_state, nvidia_driver_mok_key_state."""

    def filters(self) -> dict:
        return {
            "nvidia_driver_secure_boot_state": secure_boot_state,
            "nvidia_driver_mok_key_state": mok_key_state,
        }
