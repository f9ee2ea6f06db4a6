"""Offline evaluation: contact sheets of samples and prompt-attribute accuracy on shapes."""

from t2i.eval.attributes import attribute_accuracy, normalize_attrs
from t2i.eval.grid import contact_sheet, write_contact_sheet

__all__ = ["attribute_accuracy", "normalize_attrs", "contact_sheet", "write_contact_sheet"]
