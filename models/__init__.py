"""SQLAlchemy ORM of the fragjobs catalog: the only place its tables are declared."""

from models.catalog import (
    FRAGMENT_PLACEMENTS,
    FRAGMENT_STATUSES,
    JOB_STATUSES,
    Base,
    BaseModelRow,
    FragmentRow,
    GenerationJobRow,
    ImageRow,
    ProfileRow,
    TaskDeliveryRow,
    UTCDateTime,
    ValidationRow,
    metadata,
    utcnow,
)

__all__ = [
    "FRAGMENT_PLACEMENTS",
    "FRAGMENT_STATUSES",
    "JOB_STATUSES",
    "Base",
    "BaseModelRow",
    "FragmentRow",
    "GenerationJobRow",
    "ImageRow",
    "ProfileRow",
    "TaskDeliveryRow",
    "UTCDateTime",
    "ValidationRow",
    "metadata",
    "utcnow",
]
