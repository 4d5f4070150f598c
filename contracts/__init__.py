"""cairn's event contracts: typed payloads, the CloudEvents envelope, subjects and schemas."""

from contracts.envelope import (
    CONTENT_TYPE,
    OLDER_TYPES,
    TYPES,
    ContractError,
    Envelope,
    decode,
    decode_document,
    derive_id,
    envelope_model,
    event_type_of,
    new_event,
)
from contracts.events import *  # noqa: F403
from contracts.events import ANY_SERVICE, ENDPOINT, PAYLOADS, PRODUCERS, UPSTREAM
from contracts.runs import TERMINAL_TYPES, ends_run, type_ends_run
from contracts.subjects import (
    dead_letter_subject,
    event_type_for,
    is_dead_letter,
    replay_namespace,
    stream_filter,
    subject_for,
)
from contracts.types import *  # noqa: F403
