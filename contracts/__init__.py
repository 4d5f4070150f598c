"""cairn's event contracts: typed payloads, the CloudEvents envelope, subjects and schemas."""

from contracts.envelope import (
    CONTENT_TYPE,
    TYPES,
    ContractError,
    Envelope,
    decode,
    derive_id,
    envelope_model,
    event_type_of,
    new_event,
)
from contracts.events import *  # noqa: F403
from contracts.events import PAYLOADS
from contracts.subjects import dead_letter_subject, event_type_for, subject_for
from contracts.types import *  # noqa: F403
