"""Detector types: one module per algorithm family, all with the interface of detectors.base.

Types are imported on first use, so a type whose dependencies are missing (TensorFlow, for
example) does not stop the others from loading.
"""

import importlib

# Detector type name -> "module:class".
_TYPES = {
    "seasonal": "detectors.seasonal:SeasonalDetector",
    "tenant": "detectors.tenant_model:TenantTypeDetector",
    "equipment": "detectors.equipment_model:EquipmentTypeDetector",
}


def detector_type_names() -> list[str]:
    """Return the configurable detector type names, sorted."""
    return sorted(_TYPES)


def detector_class(type_name: str):
    """Import and return the class implementing ``type_name``."""
    try:
        target = _TYPES[type_name]
    except KeyError:
        raise ValueError(
            f"unknown detector type {type_name!r}: expected one of {', '.join(detector_type_names())}"
        ) from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def is_multi_query(type_name: str) -> bool:
    """True for types that read a mapping of queries (``queries``) instead of one ``query``."""
    return bool(getattr(detector_class(type_name), "multi_query", False))


def params_model(type_name: str):
    """Return the pydantic model that validates a detector type's ``params``."""
    return detector_class(type_name).Params
