"""Order event models and the parser that turns a message body into a typed event.

A body is a JSON object, the envelope: `eventType`, `timestamp` (ISO 8601 with a UTC
offset), `version`, `payload` (with `orderId`) and `metadata` (`source`,
`correlationId`). Each event type has its own payload model and envelope class, so a
handler can be annotated with the class it receives (`event: OrderCreated`).

Validation is strict for money and ids: amounts are finite non-negative numbers (strings
are not coerced), quantities are integers >= 1, ids are non-empty strings without
whitespace of at most 128 characters. Fields that a model does not declare are kept
(`extra="allow"`), so producers can add fields without breaking consumers.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from consumer.errors import ConsumerError

RejectReason = Literal["MalformedBody", "SchemaValidationFailed", "UnknownEventType"]

SUPPORTED_MAJOR_VERSIONS = frozenset({1})
DEFAULT_MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_DEPTH = 32
MAX_DESCRIPTION_CHARS = 1000
_ISO_DATE_PREFIX = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]")


def _require_iso_text(value: Any) -> Any:
    # Lax pydantic would read a number or a string of digits as Unix time.
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_DATE_PREFIX.match(value):
        raise ValueError("must be an ISO 8601 date-time string with a UTC offset")
    return value


IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_require_iso_text)]

# The largest difference accepted between totalAmount and the sum of quantity * price:
# one hundredth of a currency unit, so that rounding to cents by the producer passes.
TOTAL_AMOUNT_TOLERANCE = Decimal("0.01")

# ISO 3166-1 alpha-2 codes officially assigned (249 codes). User-assigned codes such as
# XK are not included.
ISO_COUNTRY_CODES = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN
    BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ
    DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL
    GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM
    JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME
    MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP
    NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD
    SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO
    TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
    """.split()
)

# orderId becomes the session id, and azure-servicebus 7.15.0 rejects session ids longer
# than 128 characters.
Identifier = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=128, pattern=r"^\S+$")
]
Text = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=1024, pattern=r"\S")
]
Money = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
PositiveMoney = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
CurrencyCode = Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Z]{3}$")]
Quantity = Annotated[int, Field(strict=True, ge=1)]


class _Model(BaseModel):
    """Base of every event model: camelCase aliases, names accepted, extras kept."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="allow", frozen=True
    )


class LineItem(_Model):
    """One product line of an order."""

    product_id: Identifier
    quantity: Quantity
    price: Money


class Address(_Model):
    """Shipping address; `country` is an ISO 3166-1 alpha-2 code such as `DE`."""

    street: Text
    city: Text
    country: str

    @field_validator("country")
    @classmethod
    def _check_country(cls, value: str) -> str:
        if value not in ISO_COUNTRY_CODES:
            raise ValueError(
                f"country {_preview(value, 8)} is not an ISO 3166-1 alpha-2 code "
                "(two upper-case letters, e.g. 'DE')"
            )
        return value


def _check_total(items: list[LineItem] | None, total: float | None) -> None:
    """Raise `ValueError` if `total` differs from the items' sum by more than a cent."""
    if items is None or total is None:
        return
    expected = sum(
        (Decimal(str(item.price)) * item.quantity for item in items), Decimal(0)
    )
    if abs(expected - Decimal(str(total))) > TOTAL_AMOUNT_TOLERANCE:
        raise ValueError(
            f"totalAmount {total} does not match the sum of quantity * price "
            f"({expected}); the accepted difference is {TOTAL_AMOUNT_TOLERANCE}"
        )


class Payload(_Model):
    """Fields every payload has: the order the event belongs to."""

    order_id: Identifier


class OrderCreatedPayload(Payload):
    """A new order with its lines, total and shipping address."""

    customer_id: Identifier
    items: Annotated[list[LineItem], Field(min_length=1)]
    total_amount: Money
    shipping_address: Address

    @model_validator(mode="after")
    def _check_total_amount(self) -> OrderCreatedPayload:
        _check_total(self.items, self.total_amount)
        return self


class OrderUpdatedPayload(Payload):
    """A change to an order: new lines, total or address, each optional."""

    items: Annotated[list[LineItem], Field(min_length=1)] | None = None
    total_amount: Money | None = None
    shipping_address: Address | None = None

    @model_validator(mode="after")
    def _check_total_amount(self) -> OrderUpdatedPayload:
        _check_total(self.items, self.total_amount)
        return self


class OrderCancelledPayload(Payload):
    """Cancellation of an order, with the reason such as `customer_request`."""

    reason: Text


class PaymentPayload(Payload):
    """A money movement of a payment: amount in `currency` (ISO 4217 code)."""

    payment_id: Identifier
    amount: PositiveMoney
    currency: CurrencyCode


# Authorization (amount reserved), capture and refund payloads carry the same fields.
PaymentAuthorizedPayload = PaymentCapturedPayload = PaymentPayload
PaymentRefundedPayload = PaymentPayload


class PaymentFailedPayload(Payload):
    """A payment attempt failed, with the reason such as `card_declined`."""

    payment_id: Identifier
    reason: Text


class FulfillmentStartedPayload(Payload):
    """A warehouse started picking and packing the order."""

    warehouse_id: Identifier


class OrderShippedPayload(Payload):
    """The order left the warehouse with `carrier` under `trackingNumber`."""

    carrier: Text
    tracking_number: Identifier


class OrderDeliveredPayload(Payload):
    """The carrier delivered the order at `deliveredAt`."""

    delivered_at: IsoDatetime


class CustomerNotifiedPayload(Payload):
    """A message sent to the customer over `channel` using `template`."""

    customer_id: Identifier
    channel: Text
    template: Text


class Metadata(_Model):
    """Where the event comes from and the id that links related operations."""

    source: Text
    correlation_id: Identifier


PayloadT = TypeVar("PayloadT", bound=Payload)


class Event(_Model, Generic[PayloadT]):
    """Envelope common to all event types; subclasses fix `eventType` and payload."""

    event_type: str
    timestamp: IsoDatetime
    version: str
    payload: PayloadT
    metadata: Metadata

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        supported = ", ".join(
            f"{major}.x" for major in sorted(SUPPORTED_MAJOR_VERSIONS)
        )
        match = re.fullmatch(r"(\d{1,6})(\.\d{1,6}){0,2}", value)
        if match is None or int(match.group(1)) not in SUPPORTED_MAJOR_VERSIONS:
            raise ValueError(
                f"version {_preview(value, 20)} is not supported; "
                f"supported versions: {supported}"
            )
        return value

    @property
    def order_id(self) -> str:
        """The order this event belongs to (`payload.orderId`)."""
        return self.payload.order_id


class OrderCreated(Event[OrderCreatedPayload]):
    """ORDER_CREATED event."""

    event_type: Literal["ORDER_CREATED"] = "ORDER_CREATED"


class OrderUpdated(Event[OrderUpdatedPayload]):
    """ORDER_UPDATED event."""

    event_type: Literal["ORDER_UPDATED"] = "ORDER_UPDATED"


class OrderCancelled(Event[OrderCancelledPayload]):
    """ORDER_CANCELLED event."""

    event_type: Literal["ORDER_CANCELLED"] = "ORDER_CANCELLED"


class PaymentAuthorized(Event[PaymentAuthorizedPayload]):
    """PAYMENT_AUTHORIZED event."""

    event_type: Literal["PAYMENT_AUTHORIZED"] = "PAYMENT_AUTHORIZED"


class PaymentCaptured(Event[PaymentCapturedPayload]):
    """PAYMENT_CAPTURED event."""

    event_type: Literal["PAYMENT_CAPTURED"] = "PAYMENT_CAPTURED"


class PaymentFailed(Event[PaymentFailedPayload]):
    """PAYMENT_FAILED event."""

    event_type: Literal["PAYMENT_FAILED"] = "PAYMENT_FAILED"


class PaymentRefunded(Event[PaymentRefundedPayload]):
    """PAYMENT_REFUNDED event."""

    event_type: Literal["PAYMENT_REFUNDED"] = "PAYMENT_REFUNDED"


class FulfillmentStarted(Event[FulfillmentStartedPayload]):
    """FULFILLMENT_STARTED event."""

    event_type: Literal["FULFILLMENT_STARTED"] = "FULFILLMENT_STARTED"


class OrderShipped(Event[OrderShippedPayload]):
    """ORDER_SHIPPED event."""

    event_type: Literal["ORDER_SHIPPED"] = "ORDER_SHIPPED"


class OrderDelivered(Event[OrderDeliveredPayload]):
    """ORDER_DELIVERED event."""

    event_type: Literal["ORDER_DELIVERED"] = "ORDER_DELIVERED"


class CustomerNotified(Event[CustomerNotifiedPayload]):
    """CUSTOMER_NOTIFIED event: a communication sent to the customer."""

    event_type: Literal["CUSTOMER_NOTIFIED"] = "CUSTOMER_NOTIFIED"


EVENT_TYPES: dict[str, type[Event[Any]]] = {
    "ORDER_CREATED": OrderCreated,
    "ORDER_UPDATED": OrderUpdated,
    "ORDER_CANCELLED": OrderCancelled,
    "PAYMENT_AUTHORIZED": PaymentAuthorized,
    "PAYMENT_CAPTURED": PaymentCaptured,
    "PAYMENT_FAILED": PaymentFailed,
    "PAYMENT_REFUNDED": PaymentRefunded,
    "FULFILLMENT_STARTED": FulfillmentStarted,
    "ORDER_SHIPPED": OrderShipped,
    "ORDER_DELIVERED": OrderDelivered,
    "CUSTOMER_NOTIFIED": CustomerNotified,
}


class EventRejected(ConsumerError):
    """A message body that can never become an event; the message is dead-lettered.

    `reason` is the dead-letter reason (`MalformedBody`, `SchemaValidationFailed` or
    `UnknownEventType`) and `description` says what is wrong, at most 1,000 characters.
    """

    def __init__(self, reason: RejectReason, description: str) -> None:
        self.reason: RejectReason = reason
        self.description = _bound(description)
        super().__init__(f"{reason}: {self.description}")


def _preview(value: str, limit: int = 64) -> str:
    """Return `value` quoted, cut to `limit` characters so errors never echo much."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _bound(text: str, limit: int = MAX_DESCRIPTION_CHARS) -> str:
    if len(text) <= limit:
        return text
    suffix = " ... (truncated)"
    return text[: limit - len(suffix)] + suffix


# Tokens that matter for nesting: an escape pair, a quote or a bracket. One pass over
# them is linear in the body size, whatever the body contains.
_DEPTH_TOKEN = re.compile(r'\\.|["\[\]{}]', re.DOTALL)


def json_depth(text: str) -> int:
    """Return the deepest nesting of objects and arrays in `text`, without parsing it.

    Brackets inside string literals are ignored. The top-level object counts as 1.
    """
    depth = 0
    deepest = 0
    in_string = False
    for match in _DEPTH_TOKEN.finditer(text):
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string or token[0] == "\\":
            continue
        elif token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_finite_float(literal: str) -> float:
    # json.loads turns a literal past the double range, such as 1e400, into inf.
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {_preview(literal)} is outside the range of a double")
    return value


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_preview(key)} in a JSON object")
        result[key] = value
    return result


def loads_strict(text: str) -> Any:
    """Parse JSON `text` like `json.loads`, but stricter, as message bodies are parsed.

    Raises `ValueError` for NaN, Infinity and -Infinity, which are not JSON, for a
    number outside the double range such as 1e400, which `json.loads` turns into
    infinity, and for duplicate keys, of which `json.loads` keeps the last. The nesting
    depth is not bounded, so check `json_depth` first on untrusted text.
    """
    return json.loads(
        text,
        parse_constant=_reject_constant,
        parse_float=_parse_finite_float,
        object_pairs_hook=_reject_duplicate_keys,
    )


def decode_body(
    body: bytes | str,
    *,
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> dict[str, Any]:
    """Decode a message body to a JSON object, raising `EventRejected("MalformedBody")`.

    Size and nesting depth are checked before the JSON parser runs, so a hostile body
    cannot make the parser recurse or allocate much. NaN, Infinity and duplicate keys
    are rejected.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if len(raw) > max_bytes:
        raise EventRejected(
            "MalformedBody", f"body is {len(raw)} bytes, larger than {max_bytes} bytes"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EventRejected(
            "MalformedBody",
            f"body is not valid UTF-8: {error.reason} at byte {error.start}",
        ) from None
    depth = json_depth(text)
    if depth > max_depth:
        raise EventRejected(
            "MalformedBody",
            f"JSON nesting depth {depth} exceeds the limit of {max_depth}",
        )
    try:
        value = loads_strict(text)
    except ValueError as error:
        raise EventRejected(
            "MalformedBody", f"body is not valid JSON: {error}"
        ) from None
    if not isinstance(value, dict):
        raise EventRejected(
            "MalformedBody", f"body must be a JSON object, got {_json_kind(value)}"
        )
    return value


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def format_validation_error(error: ValidationError) -> str:
    """Return `path: message` for each problem, `; `-separated, without input values."""
    problems = []
    for problem in error.errors(include_url=False, include_input=False):
        path = ".".join(str(part) for part in problem["loc"]) or "body"
        problems.append(f"{path}: {problem['msg']}")
    return _bound("; ".join(problems))


def validate_event(data: dict[str, Any]) -> Event[Any]:
    """Validate a decoded envelope against the model of its `eventType`.

    Raises `EventRejected` with `UnknownEventType` when `eventType` is a string that
    names no known type, else `SchemaValidationFailed` with the field paths.
    """
    event_type = data.get("eventType")
    if isinstance(event_type, str) and event_type not in EVENT_TYPES:
        raise EventRejected(
            "UnknownEventType",
            f"unknown eventType {_preview(event_type)}; "
            f"known types: {', '.join(EVENT_TYPES)}",
        )
    # Only a missing or non-string eventType falls back to the generic envelope, so
    # the parametrized class is not built for every message.
    model: type[Event[Any]]
    if isinstance(event_type, str):
        model = EVENT_TYPES[event_type]
    else:
        model = Event[Payload]
    try:
        return model.model_validate(data)
    except ValidationError as error:
        description = format_validation_error(error)
    raise EventRejected("SchemaValidationFailed", description)


def parse_event(
    body: bytes | str,
    *,
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Event[Any]:
    """Parse and validate a message body into the event class of its `eventType`.

    Raises `EventRejected` with reason `MalformedBody`, `UnknownEventType` or
    `SchemaValidationFailed`; an unsupported `version` is a schema failure on `version`.
    """
    data = decode_body(body, max_bytes=max_bytes, max_depth=max_depth)
    return validate_event(data)


def event_to_json(event: Event[Any]) -> bytes:
    """Serialize an event to the JSON wire format (camelCase names, extras included).

    Fields whose value is None are left out, so an absent optional field stays absent.
    """
    return event.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")
