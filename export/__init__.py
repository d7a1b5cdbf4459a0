"""SavedModel export with explicit serving signatures, in TF Serving's layout."""

from export.saved_model import export_for_serving, next_version

__all__ = ["export_for_serving", "next_version"]
